"""bench_workload's trace through the engine's own scheduler and adapter cache, with the GPU
replaced by a cost model (CPU, seconds): a model to compare heap policies before spending GPU
time on them, not a measurement.

What is real: the Scheduler (admission, prefetch, aging, slot-fair preemption), the BlockManager,
the LoRAManager (slots, LRU eviction, first-fit spans, compaction) and each adapter's image size
at Qwen3-30B-A3B shapes (SlotPools' layout: experts at the rank rounded up to `--rank-unit`, attention
at its rank). What is modelled: a step costs `--decode-ms` plus `--lora-ms` when it carries an adapter,
plus `--prefill-us-per-token` per prompt token it computes (times `--prefill-lora-factor` in a step
with adapters); a slot copy lands after its bytes at
`--pcie-gbps`, one copy at a time; a compaction costs its moved bytes twice (read and write) at
`--hbm-gbps`. The defaults are the H200 run of 2026-12-03 (benchmarks/RESULTS.md, "A multi-tenant
trace"): decode step 17.6 ms, 21.0 ms with adapters, 2048 prompt tokens ~60 ms.

    python benchmarks/sim_workload.py --heap-gb 47.3 --no-sharing             # as measured then
    python benchmarks/sim_workload.py --heap-gb 53.8 --no-sharing             # the heap takes the rest
    python benchmarks/sim_workload.py --heap-gb 53.8 --no-sharing --no-compaction
    python benchmarks/sim_workload.py                 # and borrows idle KV blocks (kv_heap_sharing)

`--fit A B C` / `--lora-fit A B C` price a step as workload_steps.py's fit of a run does (ms = A + B *
sequences + C * tokens past one a sequence), without and with adapters: a step's cost then grows
with its batch, which the flat costs above leave out. The H200 run of 2026-12-06 (b1b9aba):

    python benchmarks/sim_workload.py --rate 10.07 --heap-gb 53.53 --prefix-caching \\
        --fit 8.94 0.247 0.0204 --lora-fit 13.79 0.258 0.0295

`--lora-floor-gbps G` (with `--fit`, instead of `--lora-fit`) prices a step with adapters as the plain
fit plus the adapter bytes the step must read at G GB/s (lora_step_bytes): what the trace would give
with the LoRA kernels at their bytes floor.

    python benchmarks/sim_workload.py --rate 10.07 --heap-gb 53.53 --prefix-caching \\
        --fit 8.94 0.247 0.0204 --lora-floor-gbps 4000

Each run's JSON holds a timeline (running, waiting, KV blocks lent and free, once a modelled second).

`--case-d` runs bench_engine's case d instead of the trace: 64 requests at once, 512 prompt and
128 output tokens each, on 64 distinct rank-16 adapters on attention and every expert (1.69 GB
images), over the heap and KV cache of the H200 run of 2026-12-06 (502f72f): 2624 KV blocks, and
a heap of 65.61 GB (its 67.38 GB at the end less the 1122 KV blocks of 1.57 MB it had borrowed)
that borrows idle KV blocks as the engine's does; a step costs that run's decode medians, 16.4 ms
with adapters (at most 40 sequences a step) and 17.1 without (64), plus its prompt tokens. It
sets the heap, KV, batch, adapter and request options itself; the copy, HBM and prompt-token
rates still apply. `--case-d h100` is the H100 80GB run of 2026-12-06 (3737464) instead: 35
layers (1.23 GB images), a heap of 24.35 GB (its 25.84 GB less the 1304 KV blocks of 1.15 MB it had
borrowed), 15.2 ms a step with adapters (at most 21 sequences a step) and 17.47 without.

    python benchmarks/sim_workload.py --case-d --pcie-gbps 30   # the copies' rate in that run
    python benchmarks/sim_workload.py --case-d h100 --pcie-gbps 46
"""
import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.block_manager import BlockManager, step_reserve  # noqa: E402
from engine.lora.adapter import LoRAAdapter  # noqa: E402
from engine.lora.manager import LoRAManager  # noqa: E402
from engine.memory import kv_block_bytes, lora_slot_bytes  # noqa: E402
from engine.models.presets import QWEN3_30B_A3B  # noqa: E402
from engine.models.spec import spec_from_hf_config  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402
from engine.prefix_cache import PrefixCache  # noqa: E402
from engine.sequence import LoRARequest, Sequence  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kernels.weights import OFFSET_UNIT, RANK_UNIT  # noqa: E402

try:
    from bench_engine import hf_config
    from bench_workload import adapter_class, add_trace_args, make_trace, timed
    from provenance import provenance
except ImportError:
    from benchmarks.bench_engine import hf_config
    from benchmarks.bench_workload import adapter_class, add_trace_args, make_trace, timed
    from benchmarks.provenance import provenance

BLOCK = 16  # KV block (tokens)
# Qwen3-30B-A3B at 48 layers, the shapes the trace ran on
SPEC = spec_from_hf_config(hf_config(QWEN3_30B_A3B, 48))


CASE_D_CLASS = (16, "both")  # bench_engine's case d: rank 16 on attention and every expert
CASE_D = {"adapters": 64, "requests": 64, "max_num_seqs": 64, "prompt_range": [512, 512], "output_range": [128, 128],
          "kv_tokens": 2624 * BLOCK, "no_sharing": False, "rank_unit": 16, "prefix_caching": True}
# per card's run (docstring): layers, the heap of its own, decode step medians without and with adapters
CASE_D_RUNS = {"h200": {"layers": 48, "heap_gb": 65.61, "none_ms": 17.1, "lora_ms": 16.4},
               "h100": {"layers": 35, "heap_gb": 24.35, "none_ms": 17.47, "lora_ms": 15.2}}


def image_bytes(rank: int, targets: str, rank_unit: int = RANK_UNIT, case_d: str | None = None) -> int:
    """The heap image of an adapter of this class (engine.memory.lora_slot_bytes, bf16) at the shapes
    the run models (model_spec); rank_unit: what the experts' rank rounds up to
    (EngineConfig.lora_rank_unit, 16 or 8)."""
    return sum(factor_bytes(rank, targets, rank_unit, case_d))


@functools.lru_cache(maxsize=None)
def model_spec(case_d: str | None):
    """The shapes a run models: the trace's (SPEC), or case d's card's layers."""
    return spec_from_hf_config(hf_config(QWEN3_30B_A3B, CASE_D_RUNS[case_d]["layers"])) if case_d else SPEC


@functools.lru_cache(maxsize=None)
def factor_bytes(rank: int, targets: str, rank_unit: int, case_d: str | None) -> tuple[int, int]:
    """(attention, experts): the two parts of an adapter class's image (image_bytes)."""
    spec = model_spec(case_d)
    return (lora_slot_bytes(spec, rank, torch.bfloat16, "bytes", "attention") if targets != "experts" else 0,
            lora_slot_bytes(spec, rank, torch.bfloat16, "bytes", "experts", rank_unit) if targets != "attention" else 0)


class Clock:
    now = 0.0


class CopyDone:
    """A slot copy's CUDA event stand-in: passes once the modelled clock reaches its time."""

    def __init__(self, clock: Clock, at: float):
        self.clock, self.at = clock, at

    def query(self) -> bool:
        return self.clock.now >= self.at


class ModelPools:
    """SlotPools' interface to the LoRAManager, bytes only: copies finish on the modelled clock."""

    dtype, device = torch.bfloat16, torch.device("cpu")

    def __init__(self, clock: Clock, heap_bytes: int, num_slots: int, pcie_gbps: float, can_move: bool,
                 kv_bytes: int = 0, max_image_bytes: int = 0):
        """kv_bytes: the KV cache's, when it shares the heap's buffer (above the heap);
        max_image_bytes: the largest image (the KV run an idle heap keeps lendable)."""
        self.clock, self.num_slots, self.pcie, self.can_move = clock, num_slots, pcie_gbps * 1e9, can_move
        self.max_image_numel = max_image_bytes // 2
        self.heap_numel = heap_bytes // 2 // OFFSET_UNIT * OFFSET_UNIT
        self.storage = torch.empty(1, dtype=torch.bfloat16).expand(self.heap_numel + kv_bytes // 2)  # no memory
        self.stream = object()  # copies go through the manager's copier thread and report an event
        self.copies_free_at, self.moved_bytes = 0.0, 0

    def image_numel(self, adapter: LoRAAdapter) -> int:
        return adapter.packed.numel()

    def handed_over(self):
        return None  # no device steps to order after

    def write(self, slot: int, start: int, adapter: LoRAAdapter, after=None) -> CopyDone:
        self.copies_free_at = max(self.clock.now, self.copies_free_at) + adapter.packed.numel() * 2 / self.pcie
        return CopyDone(self.clock, self.copies_free_at)

    def move(self, slot: int, old: int, new: int, numel: int) -> None:
        self.moved_bytes += numel * 2

    def order_after(self, event: CopyDone) -> None:
        pass  # the model counts a step's time apart from the copies

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        return []


def lora_step_bytes(scheduled: list, rank_unit: int = RANK_UNIT, case_d: str | None = None) -> int:
    """The adapter bytes a step must read at least: each adapter in the step reads its attention
    factors once, and its experts' factors once for every expert its tokens are routed to (tokens
    routed uniformly at random: an adapter with t tokens in the step reaches E * (1 - (1 - k/E)^t)
    of the E experts, top-k each). What the LoRA kernels cost at their bytes floor, where one pass
    over each (adapter, expert) pair is all they read (no row re-reading its pair's factors). The
    experts count at the heap image's rank (rounded up to rank_unit): with the unit at 16 a rank-8
    adapter counts twice the bytes the kernels, which mask loads past its rank, read."""
    tokens: dict[str, int] = {}
    for seq, n in scheduled:
        if seq.lora is not None:
            tokens[seq.lora.lora_name] = tokens.get(seq.lora.lora_name, 0) + n
    spec = model_spec(case_d)
    total, e, k = 0.0, spec.num_experts, spec.top_k
    for name, t in tokens.items():
        attention, experts = factor_bytes(*(CASE_D_CLASS if case_d else adapter_class(int(name[1:]))), rank_unit, case_d)
        total += attention + experts * (1.0 - (1.0 - k / e) ** t)
    return int(total)


def lora_floor_seconds(args, scheduled: list) -> float:
    """--lora-floor-gbps: a step's adapter bytes (lora_step_bytes) at that rate; 0 without it."""
    if not args.lora_floor_gbps or all(seq.lora is None for seq, _ in scheduled):
        return 0.0
    return lora_step_bytes(scheduled, args.rank_unit, args.case_d) / (args.lora_floor_gbps * 1e9)


def step_seconds(args, scheduled: list, decode_ms: float | None) -> float:
    """A step's modelled cost before heap moves: the fit's (a + b * sequences + c * tokens past one a
    sequence) where --fit / --lora-fit give one, else the flat decode cost plus prompt tokens
    (--lora-floor-gbps adds lora_floor_seconds to --fit's price: simulate)."""
    adapters = any(seq.lora is not None for seq, _ in scheduled)
    fit = args.lora_fit if adapters and args.lora_fit else args.fit
    if fit:
        seqs, tokens = len(scheduled), sum(n for _, n in scheduled)
        return (fit[0] + fit[1] * seqs + fit[2] * (tokens - seqs)) / 1e3
    prefill = sum(n for seq, n in scheduled if n > 1)
    step_ms = decode_ms if decode_ms is not None else args.decode_ms + (args.lora_ms if adapters else 0.0)
    return step_ms / 1e3 + prefill * args.prefill_us_per_token * (args.prefill_lora_factor if adapters else 1.0) / 1e6


def simulate(args, trace: list[dict], with_adapters: bool, decode_ms: float | None = None) -> dict:
    """decode_ms: a step's cost before prompt tokens (None: --decode-ms, plus --lora-ms with adapters)."""
    clock = Clock()
    spec = model_spec(args.case_d)
    num_blocks, block_bytes = -(-args.kv_tokens // BLOCK), kv_block_bytes(spec, BLOCK, torch.bfloat16)
    shared = with_adapters and not args.no_sharing
    blocks = BlockManager(num_blocks, BLOCK, step_reserve(2048, BLOCK, args.max_num_seqs),
                          PrefixCache(BLOCK) if args.prefix_caching else None)
    largest = max(image_bytes(*(CASE_D_CLASS if args.case_d else adapter_class(k)), args.rank_unit, args.case_d)
                  for k in range(args.adapters))
    pools = ModelPools(clock, int(args.heap_gb * 1e9), args.max_num_seqs, args.pcie_gbps, not args.no_compaction,
                       (num_blocks + 1) * block_bytes if shared else 0, largest)
    manager = LoRAManager(pools, spec=None, max_rank=64, host_capacity=args.adapters + 1,
                          kv=blocks if shared else None, block_numel=block_bytes // 2)
    for k in range(args.adapters):  # every adapter already in the host tier, as bench_workload installs them
        numel = image_bytes(*(CASE_D_CLASS if args.case_d else adapter_class(k)), args.rank_unit, args.case_d) // 2
        manager.host[f"w{k}"] = LoRAAdapter(f"w{k}", packed=torch.empty(1, dtype=torch.bfloat16).expand(numel))
    max_len = args.prompt_range[1] + args.output_range[1] + 16
    sched = Scheduler(args.max_num_seqs, 2048, blocks, manager if with_adapters else None, max_len,
                      max_adapter_wait_steps=100, slot_reclaim_steps=8, max_staged_adapters=manager.host_capacity,
                      clock=lambda: clock.now)
    pending = list(reversed(list(enumerate(trace))))
    first, last, arrived, outputs, seqs = {}, {}, {}, {}, []
    steps, timeline, next_sample, floor_s = 0, [], 1.0, 0.0
    try:
        while pending or sched.has_unfinished():
            while pending and pending[-1][1]["t"] <= clock.now:
                k, req = pending.pop()
                lora = LoRARequest(f"w{req['adapter']}", "/in-host-tier") if with_adapters else None
                # a token of its own: no two requests share a block (the trace's prompts are random)
                seq = Sequence(k, f"w-{k}", [k + 2] * req["prompt"], SamplingParams(max_tokens=req["output"]),
                               lora, lora.owner if lora else "", clock.now)
                sched.add(seq)
                seqs.append(seq)
                arrived[seq.request_id], outputs[seq.request_id] = req["t"], req["output"]
            out = sched.schedule()
            if not out.scheduled:
                clock.now = min(pending[-1][1]["t"], clock.now + 0.005) if pending else clock.now + 0.005
                continue
            moved, pools.moved_bytes = pools.moved_bytes, 0
            floor = lora_floor_seconds(args, out.scheduled)  # 0 without --lora-floor-gbps (which needs --fit)
            floor_s += floor
            clock.now += step_seconds(args, out.scheduled, decode_ms) + floor + 2 * moved / (args.hbm_gbps * 1e9)
            if clock.now >= next_sample:  # the queue and the heap's borrowed blocks, once a modelled second
                timeline.append([round(clock.now, 2), len(sched.running), sched.num_waiting, blocks.lent,
                                 blocks.num_free_blocks])
                next_sample += 1.0
            sched.launched(out, [seq.num_computed_tokens + n == seq.num_tokens for seq, n in out.scheduled])
            for seq, token in sched.update_from_output(out, [0] * len(out.scheduled), clock.now):
                first.setdefault(seq.request_id, clock.now)
                last[seq.request_id] = clock.now
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    sched.finish(seq, "length")
            steps += 1
    finally:
        manager.shutdown()
    ttft = sorted(first[r] - arrived[r] for r in first)
    waits = sorted(s.adapter_ready - s.arrival for s in seqs if s.lora is not None)
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    tokens = sum(outputs[r] for r in last)
    return {"seconds": clock.now, "finished": len(last), "goodput_tok_per_s": tokens / clock.now, "ttft_s_p50": pct(ttft, 0.5),
            "ttft_s_p99": pct(ttft, 0.99), "ttft_s_max": ttft[-1], "steps": steps,
            "tokens_per_step": tokens / max(1, steps),
            "slot_loads": manager.stats.slot_loads, "compactions": manager.stats.compactions,
            "gb_compacted": manager.stats.bytes_compacted / 1e9, "evictions": manager.stats.evictions,
            "kv_blocks_borrowed": manager.stats.kv_blocks_borrowed, "kv_blocks_returned": manager.stats.kv_blocks_returned,
            "preemptions": sum(s.num_preemptions for s in seqs),
            **({"lora_floor_ms_a_step": 1e3 * floor_s / max(1, steps)} if args.lora_floor_gbps and with_adapters else {}),
            "timeline": {"columns": ["s", "running", "waiting", "kv_blocks_lent", "kv_blocks_free"], "rows": timeline},
            **({"adapter_wait_s_p99": pct(waits, 0.99), "adapter_wait_s_max": waits[-1]} if waits else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    add_trace_args(ap)
    ap.add_argument("--rate", type=float, default=9.84, help="arrivals per second (the H200 run's)")
    ap.add_argument("--heap-gb", type=float, default=53.8, help="adapter heap (GB); 47.3 in the H200 run")
    ap.add_argument("--kv-tokens", type=int, default=64 * 2576, help="KV cache tokens (64 full sequences)")
    ap.add_argument("--no-compaction", action="store_true")
    ap.add_argument("--prefix-caching", action="store_true", help="the engine's prefix cache in the block "
                    "manager (EngineConfig.enable_prefix_caching, on in the engine): with prompts that share "
                    "nothing, what it changes is which free KV block a sequence gets")
    ap.add_argument("--no-sharing", action="store_true", help="the heap keeps its own bytes (EngineConfig"
                    ".kv_heap_sharing=False): it borrows no KV blocks")
    ap.add_argument("--rank-unit", type=int, choices=(8, 16), default=8,
                    help="experts' rank rounded up to this (EngineConfig.lora_rank_unit; 8, its default)")
    ap.add_argument("--decode-ms", type=float, default=17.6)
    ap.add_argument("--lora-ms", type=float, default=3.4)
    ap.add_argument("--prefill-us-per-token", type=float, default=21.0)
    ap.add_argument("--prefill-lora-factor", type=float, default=1.0, help="a prompt token's cost in a step "
                    "with adapters over one without (1.0: the fit to the H200 run; the MoE layer's split LoRA "
                    "path measured 1.4-1.6x at 128-2048 tokens)")
    ap.add_argument("--fit", type=float, nargs=3, metavar=("A", "B", "C"), default=None,
                    help="a step without adapters costs A + B * sequences + C * tokens past one a sequence (ms; "
                    "workload_steps.py's fit of a run); replaces --decode-ms and --prefill-us-per-token")
    ap.add_argument("--lora-fit", type=float, nargs=3, metavar=("A", "B", "C"), default=None,
                    help="the same for a step that carries adapters (with --fit)")
    ap.add_argument("--lora-floor-gbps", type=float, default=None,
                    help="with --fit and no --lora-fit: a step with adapters costs --fit's price plus the adapter "
                    "bytes it must read (lora_step_bytes) at this rate (GB/s): the LoRA kernels at their bytes floor")
    ap.add_argument("--pcie-gbps", type=float, default=54.0)
    ap.add_argument("--hbm-gbps", type=float, default=3000.0)
    ap.add_argument("--case-d", nargs="?", const="h200", choices=sorted(CASE_D_RUNS), default=None,
                    help="bench_engine's case d instead of the trace, as that card's run had it (h200 when "
                    "bare); it sets the heap, KV, batch, adapter and request options (docstring)")
    args = ap.parse_args(argv)
    if args.lora_fit and not args.fit:
        ap.error("--lora-fit needs --fit: the run without adapters would be priced by the flat costs")
    if args.lora_floor_gbps and (args.lora_fit or not args.fit):
        ap.error("--lora-floor-gbps prices the steps with adapters as --fit's plus their bytes: give --fit, not --lora-fit")
    if args.case_d:
        for name, value in CASE_D.items():
            setattr(args, name, value)
        args.heap_gb = CASE_D_RUNS[args.case_d]["heap_gb"]
        trace = [{"t": 0.0, "prompt": args.prompt_range[0], "output": args.output_range[0], "adapter": k}
                 for k in range(args.requests)]
    else:
        trace = timed(make_trace(args), args.rate, args.seed)
    began = time.perf_counter()
    results = {"provenance": provenance(list(sys.argv if argv is None else argv)), "args": vars(args),
               "model": "cost model, not a measurement (see the docstring)",
               "no_adapters": simulate(args, trace, False, CASE_D_RUNS[args.case_d]["none_ms"] if args.case_d else None),
               "adapters": simulate(args, trace, True, CASE_D_RUNS[args.case_d]["lora_ms"] if args.case_d else None)}
    base, lora = results["no_adapters"], results["adapters"]
    results["goodput_ratio"] = lora["goodput_tok_per_s"] / base["goodput_tok_per_s"]
    results["ttft_p99_ratio"] = lora["ttft_s_p99"] / base["ttft_s_p99"]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"heap {args.heap_gb} GB, KV {args.kv_tokens} tokens, compaction {'off' if args.no_compaction else 'on'}, "
          f"sharing {'off' if args.no_sharing else 'on'}; "
          f"{time.perf_counter() - began:.0f} s of CPU")
    for label, r in (("no adapters", base), ("adapters", lora)):
        print(f"{label:<12} goodput {r['goodput_tok_per_s']:7.1f} tok/s  TTFT p50/p99/max {r['ttft_s_p50']:6.2f}/"
              f"{r['ttft_s_p99']:6.2f}/{r['ttft_s_max']:6.2f} s  tokens/step {r['tokens_per_step']:5.1f}  loads {r['slot_loads']}"
              f"  compactions {r['compactions']} ({r['gb_compacted']:.0f} GB)  preemptions {r['preemptions']}"
              f"  KV blocks borrowed/returned {r['kv_blocks_borrowed']}/{r['kv_blocks_returned']}"
              + (f"  LoRA bytes floor {r['lora_floor_ms_a_step']:.2f} ms a step" if "lora_floor_ms_a_step" in r else "")
              + (f"  adapter wait p99/max {r['adapter_wait_s_p99']:.1f}/{r['adapter_wait_s_max']:.1f} s"
                 if "adapter_wait_s_max" in r else ""))
    print(f"goodput {results['goodput_ratio']:.2f}x, TTFT p99 {results['ttft_p99_ratio']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
