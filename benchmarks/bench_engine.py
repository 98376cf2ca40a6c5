"""Engine benchmark: Qwen3-30B-A3B shapes, dummy weights, 64 concurrent requests (GPU).

Cases: (a) no adapters, (b) one adapter for all, (c) 16 distinct adapters, (d) 64 distinct
adapters over 16 slots (cache churn), each with the virtual-expert kernels ("fused") and with
one MoE call per adapter ("loop"); the decode step against its roofline (weight bytes touched
/ copy bandwidth measured here); adapter slot load time against pinned PCIe bandwidth; and
transformers + PEFT `generate` at 8 layers, batch 16, prompt 128 next to this engine at the
same shapes with 16 mixed adapters. Prints a table last and writes JSON with provenance.

Each mode is an EngineConfig (MODES: fields over the defaults), built as an engine of its own,
so what a mode measures is a configuration a user can deploy.

    python benchmarks/bench_engine.py --out bench_engine.json            # H100/H200
    python benchmarks/bench_engine.py --tiny --out /tmp/tiny.json        # CPU smoke run
"""
import argparse
import gc
import json
import statistics
import sys
import time

import torch

from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from engine.lora.adapter import LoRAAdapter, LoRAFactors
from engine.models.presets import QWEN3_30B_A3B, QWEN3_235B_A22B
import kernels.pdl
from kernels.moe import dense_gemm, dense_launch
from kernels.moe import launch as moe_launch

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.bench_engine
    from provenance import provenance
except ImportError:
    from benchmarks.provenance import provenance

TINY = dict(QWEN3_30B_A3B, vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=12, num_experts_per_tok=4)

# mode -> EngineConfig fields over the defaults (virtual experts, decode graphs, async scheduling,
# and on CUDA prefill graphs with the Triton prefill attention)
MODES = {
    "fused": {},
    "fused_sync": {"async_scheduling": False},  # each step read back before the next is scheduled
    "fused_eager_ahead": {"async_eager_steps": True},  # prefill and mixed steps launched ahead too
    "fused_eager_prefill": {"prefill_graphs": False},  # decode graphs only
    "fused_eager": {"enforce_eager": True},  # no CUDA graphs
    # one MoE call per adapter in the batch; it syncs with the host per layer, so it runs eagerly
    "loop": {"lora_mode": "loop", "enforce_eager": True},
    # The modes below are the defaults with one kernel switch changed: module settings read at each
    # launch, not EngineConfig fields, so main_engine_cases sets them around the mode's engine
    # (SWITCHES) and puts the defaults back after. A mode that names the switch's default value
    # measures the defaults, which keeps a same-process A/B meaningful once a switch is turned on.
    "fused_no_pdl": {},  # programmatic dependent launch off (kernels/pdl.py)
    # the dense projections' base GEMM and LoRA in one launch up to 64 tokens (kernels/moe/dense_gemm.py)
    "fused_dense_gemm": {},
    # the row path's gate/up delta added into gate_up in place (kernels/moe/launch.py "rows-inplace"),
    # or by rank slices the activation adds ("rows"), at every decode size one token included
    "fused_rows_inplace": {},
    "fused_rows_into": {},
    # the dense projections' split-path shrink on a second stream beside cuBLAS (kernels/moe/dense_launch.py)
    "fused_dense_side": {},
}
ROW_MODES = {"fused_rows_inplace": "rows-inplace", "fused_rows_into": "rows"}  # past one token and at one
# (module, attribute) -> {mode: value}; modes not named keep the module's value at start
SWITCHES = {
    (kernels.pdl, "ENABLED"): {"fused_no_pdl": False},
    (dense_gemm, "ENABLED"): {"fused_dense_gemm": True},
    (moe_launch, "ROWS_AUTO"): ROW_MODES,
    (moe_launch, "ROWS_ONE_TOKEN"): ROW_MODES,
    (dense_launch, "SIDE_STREAM"): {"fused_dense_side": True},
}


def switch_to(mode: str, defaults: dict) -> None:
    """Set every SWITCHES setting to `mode`'s value, or to its value in `defaults`."""
    for (module, name), by_mode in SWITCHES.items():
        setattr(module, name, by_mode.get(mode, defaults[module, name]))


def hf_config(shape: dict, layers: int):
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(**{**shape, "num_hidden_layers": layers}, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6})


def layer_bytes(shape: dict, slots: int, rank: int, kv_tokens: int) -> tuple[int, int]:
    """(bytes per decoder layer: weights + LoRA pools + KV, fixed bytes: embeddings + head), bf16."""
    d, i, e = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    weights = 3 * e * i * d + 2 * d * q + 2 * d * kv + e * d
    pools = slots * (e * (2 * rank * d + 2 * i * rank + rank * i + d * rank) + rank * (4 * d + 2 * q + 4 * kv))
    return 2 * (weights + pools + 2 * kv_tokens * kv), 2 * 2 * shape["vocab_size"] * d


def pick_layers(shape: dict, slots: int, rank: int, kv_tokens: int, ranks: int = 1) -> int:
    """Layers that fit one GPU, or each of `ranks` GPUs holding 1/ranks of every layer."""
    if not torch.cuda.is_available():
        return shape["num_hidden_layers"]
    per_layer, fixed = layer_bytes(shape, slots, rank, kv_tokens)
    per_layer //= ranks
    budget = torch.cuda.get_device_properties(0).total_memory * 0.88 - fixed - (6 << 30)
    return max(1, min(shape["num_hidden_layers"], int(budget // per_layer)))


def copy_bandwidth(device: torch.device) -> float:
    """Device copy rate, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    return 2 * 5 * src.numel() / (time.perf_counter() - start)


def pcie_bandwidth() -> float:
    """Pinned host-to-device bytes per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * src.numel() / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_adapter(engine: LLMEngine, rank: int, seed: int, targets: str = "both",
                   shared_outer: bool = False) -> LoRAAdapter:
    """An adapter on attention q/k/v/o and every expert's gate/up/down (targets "both"), or on
    one of them ("attention", "experts"), packed as the host tier holds it (pinned on CUDA).
    shared_outer: gate/up A and down B one matrix for all experts of a layer (Megatron-Bridge's
    export), which the adapter heap keeps once."""
    spec, dtype = engine.spec, engine.runner.dtype
    gen = torch.Generator().manual_seed(seed)
    d, i, e = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim

    def pair(*shape_ab, shared: str = ""):
        (a_shape, b_shape) = shape_ab
        one = lambda shape: (torch.randn(1, *shape[1:], generator=gen) * 0.02).to(dtype).expand(shape)  # noqa: E731
        own = lambda shape: (torch.randn(shape, generator=gen) * 0.02).to(dtype)  # noqa: E731
        return LoRAFactors((one if shared == "A" else own)(a_shape), (one if shared == "B" else own)(b_shape), shared)
    adapter = LoRAAdapter(f"base-{seed}")
    for layer in range(spec.num_layers):
        if targets in ("attention", "both"):
            for name, (inp, out) in {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}.items():
                adapter.dense[(layer, name)] = pair((rank, inp), (out, rank))
        if targets in ("experts", "both"):
            for name, (inp, out) in {"gate": (d, i), "up": (d, i), "down": (i, d)}.items():
                half = ("B" if name == "down" else "A") if shared_outer else ""
                adapter.moe[(layer, name)] = pair((e, rank, inp), (e, out, rank), shared=half)
    return engine.runner.slot_pools.pack(adapter)  # one pinned compact image, as the host tier holds them


def install(engine: LLMEngine, names: list[str], bases: list[LoRAAdapter]) -> None:
    """Put named adapters in the host tier (sharing a few random tensors to spare host memory)."""
    manager = engine.lora_manager
    manager.host_capacity = max(manager.host_capacity, len(names) + len(bases))
    for k, name in enumerate(names):
        base = bases[k % len(bases)]
        manager.host[name] = base.renamed(name)


class TritonCompiles:
    """Counts Triton JIT compilations (in-memory cache misses) through triton's jit_cache_hook: a
    measured run that compiles measures the compiler too."""

    def __init__(self):
        self.names: list[str] = []
        self.active = False  # no triton, or one without the hook: counts stay 0
        try:
            from triton import knobs
            self.active = hasattr(knobs.runtime, "jit_cache_hook")
            if self.active:
                knobs.runtime.jit_cache_hook = self._hook
        except ImportError:
            pass

    def _hook(self, *args, **kwargs) -> bool:
        self.names.append(str(kwargs.get("repr", "?")).split("[")[0])
        return False  # compile as usual

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


COMPILES = TritonCompiles()


def run_case(engine: LLMEngine, adapters: list[str | None], prompt_len: int, output_len: int, seed: int) -> dict:
    """All requests arrive at once; returns throughput, TTFT, TPOT, decode step times and the
    Triton compilations the run triggered."""
    COMPILES.take()
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for k, name in enumerate(adapters):
        prompt = torch.randint(0, engine.spec.vocab_size, (prompt_len,), generator=gen).tolist()
        lora = None if name is None else LoRARequest(name, "/in-host-tier")
        engine.add_request(f"req-{seed}-{k}", prompt, params, lora)
    first, last, decode_steps, num_adapters = {}, {}, [], []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        step = engine.last_step
        if step["num_seqs"] and step["num_tokens"] == step["num_seqs"]:
            decode_steps.append(now - t0)
            num_adapters.append(step["num_adapters"])
        for out in outputs:
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
    total = time.perf_counter() - start
    ttft = [first[r] - start for r in first]
    tpot = [(last[r] - first[r]) / (output_len - 1) for r in first] if output_len > 1 else [0.0]
    return {"output_tok_per_s": len(adapters) * output_len / total, "seconds": total,
            "ttft_ms_mean": 1e3 * statistics.mean(ttft), "ttft_ms_p99": 1e3 * sorted(ttft)[int(0.99 * (len(ttft) - 1))],
            "tpot_ms_mean": 1e3 * statistics.mean(tpot),
            "decode_step_ms_median": 1e3 * statistics.median(decode_steps) if decode_steps else None,
            "decode_steps": len(decode_steps), "max_adapters_in_a_step": max(num_adapters, default=0),
            "triton_compiles": sorted(COMPILES.take())}


def decode_roofline_ms(engine: LLMEngine, batch: int, context: int, copy_bw: float) -> dict:
    """Bytes a decode step must read: attention + router + the experts the batch is expected to
    touch (uniform routing), lm_head, and the KV cache; over the copy bandwidth (read-only)."""
    s, b = engine.spec, engine.runner.dtype.itemsize
    d, i, e, k = s.hidden_size, s.moe_intermediate_size, s.num_experts, s.top_k
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    touched = e * (1 - (1 - k / e) ** batch)
    per_layer = (2 * d * q + 2 * d * kv + e * d + touched * 3 * i * d) * b
    weights = s.num_layers * per_layer + s.vocab_size * d * b
    kv_bytes = s.num_layers * batch * context * 2 * kv * b
    read_bw = copy_bw  # as the issue defines the roofline: bytes touched / measured copy rate
    return {"weight_bytes": weights, "kv_bytes": kv_bytes, "experts_touched_per_layer": touched,
            "roofline_ms_weights": 1e3 * weights / read_bw, "roofline_ms_with_kv": 1e3 * (weights + kv_bytes) / read_bw}


def adapter_load(engine: LLMEngine, adapter: LoRAAdapter, pcie_bw: float | None) -> dict:
    """Time from handing a host-tier adapter to a slot until its copy event completes."""
    pools = engine.runner.slot_pools
    sync(engine.runner.device)
    start = time.perf_counter()
    event = pools.write(pools.num_slots - 1, 0, adapter)  # the heap's start: what a load copies is the same anywhere
    if event is not None:
        event.synchronize()
    seconds = time.perf_counter() - start
    out = {"adapter_bytes": adapter.num_bytes, "ready_ms": 1e3 * seconds}
    if pcie_bw:
        out["pcie_ms"] = 1e3 * adapter.num_bytes / pcie_bw
        out["ready_over_pcie"] = seconds / (adapter.num_bytes / pcie_bw)
    return out


def hf_baseline(shape: dict, layers: int, batch: int, prompt_len: int, output_len: int, rank: int,
                device: str = "cuda") -> dict:
    """transformers `generate` without adapters and with one PEFT adapter (attention + experts)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    config = hf_config(shape, layers)
    try:
        config._experts_implementation = "grouped_mm"
    except AttributeError:
        pass
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, shape["vocab_size"], (batch, prompt_len), device=device)
    result = {"layers": layers, "batch": batch, "prompt": prompt_len, "output": output_len}
    for label in ("base", "peft_one_adapter"):
        if label == "peft_one_adapter":
            model = get_peft_model(model, LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).eval()
        with torch.inference_mode():
            model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            sync(torch.device(device))
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
            sync(torch.device(device))
        result[f"{label}_tok_per_s"] = batch * output_len / (time.perf_counter() - start)
    del model
    return result


def profile_decode(engine: LLMEngine, adapters: list[str | None], path: str) -> str:
    """Top ops of 5 decode steps (torch.profiler) as `engine` runs them, and a Chrome trace at `path`."""
    from torch.profiler import ProfilerActivity, profile
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for k, name in enumerate(adapters):
        engine.add_request(f"prof-{k}", [1 + k % 100] * 32, params,
                           None if name is None else LoRARequest(name, "/in-host-tier"))
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            engine.step()
    prof.export_chrome_trace(path)
    while engine.has_unfinished_requests():
        engine.step()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    eager = engine.runner.graphs is None  # eager steps attribute every kernel; graph replays can hide them
    return prof.key_averages().table(sort_by=key, row_limit=40 if eager else 25)


# the measured run's prompt seed per case: b_one's adapter is one of c_16's, so with one seed for
# all, c_16's requests on it would find b_one's prompts in the prefix cache
CASE_SEEDS = {"a_none": 1, "b_one": 2, "c_16": 3, "d_64_over_16": 4}


def case_adapters(case: str, num_requests: int) -> list[str | None]:
    return {"a_none": [None] * num_requests,
            "b_one": ["t0/ad@v1"] * num_requests,
            "c_16": [f"t{k % 16}/ad@v1" for k in range(num_requests)],
            "d_64_over_16": [f"t{k % 64}/ad{k % 64}@v1" for k in range(num_requests)]}[case]


def make_engine(args, shape: dict, layers: int, slots: int, mode: str) -> LLMEngine:
    overrides = {name: getattr(args, name) for name in ("triton_prefill_attention", "prefill_graphs", "kv_heap_sharing")
                 if getattr(args, name, None) is not None}
    return LLMEngine(EngineConfig(
        hf_config=hf_config(shape, layers), load_format="dummy", device=args.device,
        max_loras=None if slots < 0 else slots,
        lora_layout=args.lora_layout, lora_rank_unit=args.lora_rank_unit,
        max_lora_rank=args.rank, max_cpu_loras=128, max_num_seqs=args.requests,
        max_model_len=args.prompt + args.output + args.block_size, block_size=args.block_size,
        max_num_batched_tokens=args.max_batched_tokens, seed=0, tensor_parallel_size=args.tp,
        expert_parallel_size=args.ep, **{**overrides, **MODES[mode]}))


def free_memory() -> None:
    """After the last reference to an engine is dropped: give its device memory back to the driver,
    which the next engine's memory plan reads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_machine(engine: LLMEngine, args, results: dict) -> list[LoRAAdapter]:
    """Copy and PCIe rates, the roofline, one slot load; returns the random adapters (packed
    slot images, valid for every mode's engine: the slot layout does not depend on the mode)."""
    device = engine.runner.device
    results["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
    pcie = pcie_bandwidth() if device.type == "cuda" else None
    results["pcie_h2d_GBps"] = pcie / 1e9 if pcie else None
    bases = [random_adapter(engine, args.rank, seed, shared_outer=args.adapter_format == "shared_outer")
             for seed in range(4)]
    results["adapter_load"] = adapter_load(engine, bases[0], pcie)
    results["roofline"] = decode_roofline_ms(engine, args.requests, args.prompt + args.output // 2,
                                             results["copy_bandwidth_GBps"] * 1e9)
    return bases


def slot_copies(engine: LLMEngine, before: dict | None = None) -> dict:
    """The adapter manager's slot copies so far (or since `before`): how many, their bytes, and
    the copier thread's seconds in the writes, issuing pieces and waiting for all but the last
    COPY_DEPTH of each image; bytes over those seconds (`issue_GBps`) is an upper bound on the
    rate the copies ran at (a write of one piece waits for nothing), to set beside the link's
    (measure_machine's pcie_h2d_GBps)."""
    stats = engine.lora_manager.stats if engine.lora_manager is not None else None
    now = {"loads": stats.slot_loads, "bytes": stats.bytes_loaded, "seconds": stats.slot_load_seconds} if stats else \
        {"loads": 0, "bytes": 0, "seconds": 0.0}
    if before is None:
        return now
    out = {k: now[k] - before[k] for k in now}
    out["issue_GBps"] = out["bytes"] / out["seconds"] / 1e9 if out["seconds"] else None
    return out


def run_mode(args, engine: LLMEngine, mode: str, results: dict) -> None:
    """Every case on one mode's engine: a short warm-up run of each case at the measured shapes
    (what it compiles, Triton specialisations the engine's start-up warm-up misses, lands in
    results["warmup_compiles"]), then the measured runs (each reports its own compiles, ideally none)."""
    for case in args.cases:
        warm = run_case(engine, case_adapters(case, args.requests), args.prompt, 8, seed=100 + CASE_SEEDS[case])
        results.setdefault("warmup_compiles", {})[f"{case}/{mode}"] = warm["triton_compiles"]
    for case in args.cases:
        before = slot_copies(engine)
        results["cases"][f"{case}/{mode}"] = run_case(
            engine, case_adapters(case, args.requests), args.prompt, args.output, seed=CASE_SEEDS[case])
        results["cases"][f"{case}/{mode}"]["slot_copies"] = slot_copies(engine, before)
        print(case, mode, json.dumps(results["cases"][f"{case}/{mode}"]), flush=True)
        with open(args.out, "w") as f:  # partial results survive a time limit
            json.dump(results, f, indent=2)
    if args.profile and mode in ("fused", "fused_eager"):  # the profile's decode steps: case c's adapters
        path = args.profile if mode == "fused" else args.profile.replace(".json", "") + ".eager.json"
        results.setdefault("profile_table", {})[mode] = profile_decode(
            engine, case_adapters("c_16", args.requests), path)
        print(f"5 decode steps, {mode}:", results["profile_table"][mode], sep="\n", flush=True)


def main_engine_cases(args, shape: dict, results: dict) -> None:
    kv_tokens = args.requests * (args.prompt + args.output)
    layers = args.layers or pick_layers(shape, max(args.slots, 16), args.rank, kv_tokens, max(args.tp, args.ep))
    results["layers"] = layers
    cases = args.cases + (["c_16"] if args.profile else [])  # the profile runs case c's adapters
    names = {n for c in cases for n in case_adapters(c, args.requests) if n}
    bases = None
    defaults = {key: getattr(*key) for key in SWITCHES}
    for mode in args.modes:
        COMPILES.take()
        switch_to(mode, defaults)
        results.setdefault("switches", {})[mode] = {f"{m.__name__}.{n}": getattr(m, n) for m, n in SWITCHES}
        engine = make_engine(args, shape, layers, args.slots, mode)
        pools = engine.runner.slot_pools
        if pools is not None and args.copy_chunk_mib is not None:
            pools.copy_chunk_bytes = int(args.copy_chunk_mib * 2**20)
        if pools is not None and args.copy_depth is not None:
            pools.COPY_DEPTH = args.copy_depth
        if pools is not None:
            results.setdefault("slot_copy_settings", {})[mode] = {
                "copy_chunk_bytes": pools.copy_chunk_bytes, "copy_depth": pools.COPY_DEPTH}
        results.setdefault("startup_compiles", {})[mode] = len(COMPILES.take()) if COMPILES.active else None
        results.setdefault("startup_seconds", {})[mode] = dict(engine.runner.startup_seconds)
        if bases is None:
            bases = measure_machine(engine, args, results)
        install(engine, sorted(names), bases)
        run_mode(args, engine, mode, results)
        results.setdefault("engine_stats", {})[mode] = engine.stats()
        engine.shutdown()
        del engine, pools  # the pools hold the heap and KV buffers: the next engine plans its memory after
        free_memory()
    switch_to("fused", defaults)


def main_vs_transformers(args, shape: dict, results: dict) -> None:
    """transformers + PEFT and this engine at the same shapes: 8 layers, batch 16, prompt 128."""
    prompt, output = (128, 128) if not args.tiny else (args.prompt, args.output)
    small = argparse.Namespace(**{**vars(args), "requests": 16, "prompt": prompt, "output": output})
    layers, ours, bases = min(args.hf_layers, shape["num_hidden_layers"]), {}, None
    for mode, cases in (("fused", ("a_none", "c_16")), ("fused_sync", ("c_16",))):
        engine = make_engine(small, shape, layers, 16, mode)
        bases = bases or [random_adapter(engine, args.rank, seed) for seed in range(4)]
        install(engine, case_adapters("c_16", 16), bases)
        for case in cases:  # warm-up at the measured shapes (see run_mode)
            run_case(engine, case_adapters(case, 16), prompt, 8, seed=99)
        for case in cases:
            key = case if mode == "fused" else f"{case}_sync"
            ours[key] = run_case(engine, case_adapters(case, 16), prompt, output, seed=2)["output_tok_per_s"]
        engine.shutdown()
        del engine
        free_memory()
    del bases
    hf = hf_baseline(shape, min(args.hf_layers, shape["num_hidden_layers"]), 16, prompt, output, args.rank,
                     args.device)
    results["vs_transformers"] = {**hf, "engine_no_adapter_tok_per_s": ours["a_none"],
                                  "engine_16_adapters_tok_per_s": ours["c_16"],
                                  "engine_16_adapters_sync_scheduling_tok_per_s": ours["c_16_sync"],
                                  "speedup_16_adapters_vs_peft": ours["c_16"] / hf["peft_one_adapter_tok_per_s"]}


def table(results: dict) -> str:
    # "vs a_none": throughput over, and the decode step's speed as a share of, the same mode's
    # a_none (issue targets: c_16 >= 0.85x throughput, decode step >= 0.88x)
    rows = ["| case | mode | out tok/s | vs a_none | TTFT ms | TPOT ms | decode step ms | step vs a_none "
            "| adapters/step |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["cases"].items():
        case, mode = key.split("/")
        base = results["cases"].get(f"a_none/{mode}", r)
        step, base_step = r["decode_step_ms_median"], base["decode_step_ms_median"]
        step_ratio = f"{base_step / step:.3f}" if step and base_step else "-"
        tok_ratio = r["output_tok_per_s"] / base["output_tok_per_s"]
        rows.append(f"| {case} | {mode} | {r['output_tok_per_s']:.0f} | {tok_ratio:.2f} | "
                    f"{r['ttft_ms_mean']:.0f} | {r['tpot_ms_mean']:.1f} | {step or 0:.1f} | {step_ratio} | "
                    f"{r['max_adapters_in_a_step']} |")
    roof = results.get("roofline", {})
    lines = ["", f"layers {results.get('layers')}, copy bandwidth {results.get('copy_bandwidth_GBps', 0):.0f} GB/s, "
             f"decode roofline {roof.get('roofline_ms_weights', 0):.2f} ms (weights) / "
             f"{roof.get('roofline_ms_with_kv', 0):.2f} ms (+KV)"]
    if roof and "a_none/fused" in results["cases"]:
        step = results["cases"]["a_none/fused"]["decode_step_ms_median"] or float("nan")
        lines.append(f"no-adapter decode step {step:.2f} ms = {roof['roofline_ms_weights'] / step:.0%} of roofline; "
                     f"roofline tok/s at batch {results['requests']}: {1e3 * results['requests'] / roof['roofline_ms_weights']:.0f}")
    if results.get("adapter_load"):
        lines.append(f"adapter load: {json.dumps(results['adapter_load'])}")
    if results.get("vs_transformers"):
        lines.append(f"vs transformers: {json.dumps(results['vs_transformers'])}")
    return "\n".join(rows + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_engine.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    parser.add_argument("--preset", choices=("qwen3-30b-a3b", "qwen3-235b-a22b"), default="qwen3-30b-a3b",
                        help="model shapes (random weights); --layers 0 fits as many layers as the GPUs hold")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size: GPUs of the replica, "
                        "attention split by heads (ranks 1..N-1 run as processes on cuda:1..N-1)")
    parser.add_argument("--ep", type=int, default=1, help="expert_parallel_size: experts split by expert")
    parser.add_argument("--layers", type=int, default=0, help="0: all 48 if they fit, else as many as fit")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--slots", type=int, default=16, help="max_loras; -1: the engine's default (the memory "
                        "rule: as many adapters as the GPU memory beside the KV cache holds)")
    parser.add_argument("--lora-layout", choices=("slots", "bytes"), default="bytes",
                        help="EngineConfig.lora_layout: the adapter heap (the default), or max-rank slot images")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-rank-unit", type=int, choices=(8, 16), default=None,
                        help="EngineConfig.lora_rank_unit (8 with --lora-layout bytes only; default: the engine's)")
    parser.add_argument("--adapter-format", choices=("per_expert", "shared_outer"), default="per_expert",
                        help="shared_outer: gate/up A and down B one matrix a layer (kept once in the heap)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--cases", nargs="*", default=["a_none", "b_one", "c_16", "d_64_over_16"])
    parser.add_argument("--modes", nargs="+", default=["fused", "fused_sync", "fused_eager", "loop"],
                        help="EngineConfigs, one engine each (MODES): fused = the defaults (virtual "
                             "experts, CUDA graphs, async scheduling); fused_sync: no async scheduling; "
                             "fused_eager_ahead: eager steps launched ahead too; fused_eager_prefill: no "
                             "prefill graphs; fused_eager: no graphs; loop: one MoE call per adapter; "
                             "fused_no_pdl: the defaults without programmatic dependent launch; fused_dense_gemm: "
                             "the defaults with the dense projections' base and LoRA in one launch; "
                             "fused_rows_inplace / fused_rows_into: the row path's gate/up delta added into "
                             "gate_up in place / by rank slices the activation adds; "
                             "fused_dense_side: the dense split path's shrink on a second stream beside cuBLAS")
    parser.add_argument("--hf-layers", type=int, default=8)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--triton-prefill-attention", action=argparse.BooleanOptionalAction, default=None,
                        help="EngineConfig.triton_prefill_attention for every mode (default: the engine's)")
    parser.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="EngineConfig.prefill_graphs for modes that keep graphs (default: the engine's)")
    parser.add_argument("--kv-heap-sharing", action=argparse.BooleanOptionalAction, default=None,
                        help="EngineConfig.kv_heap_sharing (default: the engine's)")
    parser.add_argument("--copy-chunk-mib", type=float, default=None,
                        help="SlotPools.copy_chunk_bytes in MiB (0: each image in one copy, but for splits where the "
                             "host arena's pinned pieces meet; default: the engine's)")
    parser.add_argument("--copy-depth", type=int, default=None,
                        help="SlotPools.COPY_DEPTH: slot-copy pieces in flight at once (default: the engine's)")
    parser.add_argument("--profile", default="", help="Chrome traces of 5 decode steps of case c: here from "
                        "mode fused, beside it (.eager.json) from mode fused_eager, when those modes run")
    args = parser.parse_args()
    copy_flags = [f for f in ("copy_chunk_mib", "copy_depth") if getattr(args, f) is not None]
    if copy_flags and args.tp * args.ep > 1:
        parser.error(f"{copy_flags} set the rank-0 SlotPools only: not with --tp/--ep over one GPU")
    if (args.copy_depth is not None and args.copy_depth < 1) or (args.copy_chunk_mib or 0) < 0:
        parser.error("--copy-depth >= 1 and --copy-chunk-mib >= 0")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}: choose from {list(MODES)}")
    args.device = "cpu" if args.tiny else "cuda"
    shape = TINY if args.tiny else {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3-235b-a22b": QWEN3_235B_A22B}[args.preset]
    results = {"provenance": provenance(sys.argv), "requests": args.requests, "prompt": args.prompt, "output": args.output, "rank": args.rank, "adapter_format": args.adapter_format,
               "slots": args.slots, "preset": "tiny" if args.tiny else args.preset, "tp": args.tp, "ep": args.ep, "device": torch.cuda.get_device_name() if not args.tiny else "cpu", "cases": {}}
    main_engine_cases(args, shape, results)
    if not args.skip_hf:  # with --tiny too: a CPU smoke run of the baseline's code path
        main_vs_transformers(args, shape, results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))


if __name__ == "__main__":
    main()
