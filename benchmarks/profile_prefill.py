"""Where the prefill phase of bench_engine's case b goes, with and without async scheduling (and
with eager steps launched ahead or not).

64 requests (prompt 512, 2 output tokens, one adapter for all) arrive at once, so the run is
the prefill phase: 16 steps of 2048 tokens, mixed with the first decodes. Per mode: a warm-up
run, a timed run (wall time of each step() call), and a profiled run (Chrome trace, GPU busy
fraction, the CUDA runtime calls the host spent longest in). Each mode is an EngineConfig
(MODES), built as an engine of its own. Decode steps run eagerly (enforce_eager: no graph
capture, a faster start; they are 1 of ~17 steps here) except in mode `graphs`, the engine's
defaults (prefill and decode graphs). Writes DIR/profile_prefill.json with provenance.

    python3 benchmarks/profile_prefill.py --out DIR [--layers 35] [--tiny] [--modes ...]
"""
import argparse
import gzip
import json
import os
import sys
import time

import torch

from engine import EngineConfig, LLMEngine

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.profile_prefill
    from bench_engine import (QWEN3_30B_A3B, TINY, case_adapters, free_memory, hf_config, install, random_adapter,
                              run_case)
    from provenance import provenance
except ImportError:
    from benchmarks.bench_engine import (QWEN3_30B_A3B, TINY, case_adapters, free_memory, hf_config, install,
                                         random_adapter, run_case)
    from benchmarks.provenance import provenance

# mode -> EngineConfig fields. async_eager launches prefill steps ahead too (the policy of commit
# 1e75882); async is the default policy (prefill steps launched after the read-back); torch_attn
# and triton_attn choose the prefill attention (EngineConfig.triton_prefill_attention)
EAGER = {"enforce_eager": True, "triton_prefill_attention": False}
MODES = {
    "async_eager": {**EAGER, "async_eager_steps": True},
    "sync": {**EAGER, "async_scheduling": False},
    "async": EAGER,
    "async_triton_attn": {**EAGER, "triton_prefill_attention": True},
    "graphs": {},  # the engine's defaults: on CUDA prefill graphs with the Triton prefill attention
}


def timed_steps(engine: LLMEngine, adapters: list, prompt: int, output: int) -> dict:
    from engine import LoRARequest, SamplingParams
    params = SamplingParams(max_tokens=output, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(5)
    for k, name in enumerate(adapters):
        ids = torch.randint(0, engine.spec.vocab_size, (prompt,), generator=gen).tolist()
        engine.add_request(f"t-{k}", ids, params, None if name is None else LoRARequest(name, "/in-host-tier"))
    steps, start = [], time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        steps.append(round(1e3 * (time.perf_counter() - t0), 2))
    return {"seconds": time.perf_counter() - start, "step_ms": steps}


def profiled(engine: LLMEngine, adapters: list, prompt: int, path: str) -> dict:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run_case(engine, adapters, prompt, 2, seed=7)
    prof.export_chrome_trace(path)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    os.remove(path)
    with gzip.open(path + ".gz") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    runtime: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime":
            runtime[e["name"]] = runtime.get(e["name"], 0.0) + e["dur"] / 1e3
    out = {"runtime_ms": dict(sorted(runtime.items(), key=lambda kv: -kv[1])[:8])}
    if gpu:
        span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
        out.update(gpu_span_ms=span / 1e3, gpu_busy_ms=sum(e["dur"] for e in gpu) / 1e3)
    return out


def make_engine(args, mode: str) -> LLMEngine:
    shape, device = (TINY, "cpu") if args.tiny else (QWEN3_30B_A3B, "cuda")
    return LLMEngine(EngineConfig(
        hf_config=hf_config(shape, min(args.layers, shape["num_hidden_layers"])), load_format="dummy",
        device=device, max_loras=16, max_lora_rank=16, max_cpu_loras=128, max_num_seqs=args.requests,
        max_model_len=args.prompt + 32, block_size=16, max_num_batched_tokens=2048 if not args.tiny else 64,
        seed=0, **MODES[mode]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=35)
    ap.add_argument("--tiny", action="store_true")
    # the first mode runs again at the end, so run-to-run differences show
    ap.add_argument("--modes", nargs="+", choices=list(MODES),
                    default=["async_eager", "sync", "async", "async_triton_attn", "async_eager"])
    args = ap.parse_args()
    args.requests, args.prompt = (6, 20) if args.tiny else (64, 512)
    os.makedirs(args.out, exist_ok=True)
    adapters, base = case_adapters("b_one", args.requests), None
    results = {"provenance": provenance(sys.argv),
               "device": torch.cuda.get_device_name() if not args.tiny else "cpu", "modes": {}}
    for mode in args.modes:
        engine = make_engine(args, mode)
        base = base or random_adapter(engine, 16, 0)  # a packed slot image fits every mode's pools
        install(engine, ["t0/ad@v1"], [base])
        run_case(engine, adapters, args.prompt, 2, seed=99)
        r = timed_steps(engine, adapters, args.prompt, 2)
        r["profile"] = profiled(engine, adapters, args.prompt, os.path.join(args.out, f"prefill_{mode}.json"))
        results["modes"].setdefault(mode, []).append(r)
        print(mode, json.dumps(r), flush=True)
        engine.shutdown()
        del engine
        free_memory()
    with open(os.path.join(args.out, "profile_prefill.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
