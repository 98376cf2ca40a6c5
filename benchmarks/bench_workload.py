"""A multi-tenant trace on the engine: many adapters of mixed ranks and targets, Zipf popularity,
Poisson arrivals (GPU; `--tiny` on CPU in well under a minute).

256 adapters (default): ranks 8 / 16 / 32 / 64 in turn; a quarter on attention only (q/k/v/o),
a quarter on the experts only (gate/up/down), the rest on both. Popularity is Zipf (s = 1.0)
over a fixed random order of the adapters; arrivals are Poisson at `--load` (0.8) times the
requests per second the engine finishes without adapters (measured first, same lengths, all
requests at once); prompt and output lengths are log-uniform in [128, 2048] and [32, 512], fixed
seed. The same arrivals run twice, without adapters and with them. Reported for each: goodput
(output tokens of finished requests per second), TTFT and TPOT p50 / p99, and with adapters the
slowest TTFT of a request with an adapter, slot loads per second, the resident-hit rate (requests
whose adapter was in a GPU slot) and the bytes slot loads moved. Adapters are installed in the
host tier (the store, disk and PCIe paths are measured by bench_store.py and bench_engine.py).

    python benchmarks/bench_workload.py --out workload.json                 # H200, 48 layers
    python benchmarks/bench_workload.py --tiny --out /tmp/workload.json     # CPU smoke run

Where one process may not run both (a time limit per command), the runs split in two, back to
back on the same machine: `--runs none --out base.json`, then `--runs adapters --baseline
base.json`, which takes the first's arrival rate and compares against its no-adapter run (the
trace is a function of the arguments and the seed, so the arrivals are the same).
"""
import argparse
import json
import math
import random
import sys
import time

import torch

from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from engine.models.presets import QWEN3_30B_A3B

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.bench_workload
    from bench_engine import COMPILES, TINY, hf_config, install, random_adapter
    from provenance import provenance
except ImportError:
    from benchmarks.bench_engine import COMPILES, TINY, hf_config, install, random_adapter
    from benchmarks.provenance import provenance

RANKS = (8, 16, 32, 64)
BLOCK = 16  # KV block size (tokens), the engine's default
KINDS = ("attention", "experts", "both", "both")  # by adapter index // len(RANKS): a quarter each, half both


def adapter_class(index: int) -> tuple[int, str]:
    """(rank, targets) of adapter `index`."""
    return RANKS[index % len(RANKS)], KINDS[(index // len(RANKS)) % len(KINDS)]


def install_adapters(engine: LLMEngine, num_adapters: int) -> list[str]:
    """Names w0..w{n-1} in the host tier, sharing one packed image per (rank, targets) class."""
    classes = {(rank, targets): random_adapter(engine, rank, k, targets) for k, (rank, targets) in enumerate(
        sorted({adapter_class(k) for k in range(num_adapters)}))}
    names = [f"w{k}" for k in range(num_adapters)]
    period = len(RANKS) * len(KINDS)  # adapter_class(k) == adapter_class(k % period)
    install(engine, names, [classes[adapter_class(k)] for k in range(min(period, num_adapters))])
    return names


def make_trace(args) -> list[dict]:
    """Requests in arrival order: {"t" (s, filled in by `timed`), "prompt", "output", "adapter"}."""
    rng = random.Random(args.seed)
    order = list(range(args.adapters))
    rng.shuffle(order)  # popularity rank -> adapter, so popular adapters mix ranks and targets
    weights = [1.0 / (k + 1) ** args.zipf for k in range(args.adapters)]

    def log_uniform(low: int, high: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
    return [{"t": 0.0, "prompt": log_uniform(*args.prompt_range), "output": log_uniform(*args.output_range),
             "adapter": order[rng.choices(range(args.adapters), weights)[0]]} for _ in range(args.requests)]


def timed(trace: list[dict], rate: float, seed: int) -> list[dict]:
    """The trace with Poisson arrival times at `rate` requests per second."""
    rng, t = random.Random(seed + 1), 0.0
    out = []
    for request in trace:
        t += rng.expovariate(rate)
        out.append(dict(request, t=t))
    return out


def run_trace(engine: LLMEngine, trace: list[dict], names: list[str] | None, profile_at: float | None = None,
              profile_steps: int = 0, prompt_seed: int = 7) -> dict:
    """Open loop: each request enters the engine at its arrival time; names=None runs it without
    adapters. Latencies count from the arrival. With profile_steps, the first `profile_steps` steps
    after `profile_at` seconds run under torch.profiler (ProfileWindow). Prompts are random ids
    drawn from `prompt_seed`."""
    gen = torch.Generator().manual_seed(prompt_seed)
    COMPILES.take()  # what compiled before this run (start-up, the run before) is not this run's
    stats0, start = engine.stats(), time.perf_counter()
    arrived, first, last, pending, seqs = {}, {}, {}, list(enumerate(trace)), []
    steps, next_report, reported = [], PROGRESS_S, 0  # steps: (seconds, sequences, adapters, tokens) of each
    window = None  # the profiler while it runs, then its summary
    pending.reverse()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[-1][1]["t"] <= now:
            k, req = pending.pop()
            prompt = torch.randint(0, engine.spec.vocab_size, (req["prompt"],), generator=gen).tolist()
            lora = None if names is None else LoRARequest(names[req["adapter"]], "/in-host-tier")
            params = SamplingParams(max_tokens=req["output"], temperature=0, ignore_eos=True)
            seqs.append(engine.make_sequence(f"w-{k}", prompt, params, lora))
            engine.add_sequence(seqs[-1])
            arrived[f"w-{k}"] = req["t"]
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.05, pending[-1][1]["t"] - now)))
            continue
        if profile_steps and window is None and now >= profile_at:
            window = ProfileWindow(len(steps))
        began = time.perf_counter()
        outputs = engine.step()
        steps.append((time.perf_counter() - began, engine.last_step["num_seqs"], engine.last_step["num_adapters"],
                      engine.last_step["num_tokens"]))
        if isinstance(window, ProfileWindow) and len(steps) - window.first == profile_steps:
            window = window.summary(steps[window.first:])
        for out in outputs:
            now = time.perf_counter() - start
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
        if now >= next_report:  # a run cut short by its time limit still says how it went
            next_report += PROGRESS_S
            progress(engine, now, len(trace) - len(pending), len(last), steps[reported:])
            reported = len(steps)
    seconds = time.perf_counter() - start
    stats = {key: engine.stats()[key] - stats0[key]
             for key in ("lora_slot_hits", "lora_slot_misses", "lora_slot_loads", "lora_bytes_loaded",
                         "lora_compactions", "lora_bytes_compacted", "lora_kv_blocks_borrowed",
                         "lora_kv_blocks_returned", "num_preemptions")}
    outputs = {f"w-{k}": req["output"] for k, req in enumerate(trace)}
    ttft = sorted(first[r] - arrived[r] for r in first)
    tpot = sorted((last[r] - first[r]) / (outputs[r] - 1) for r in first if outputs[r] > 1)
    pct = lambda xs, p: 1e3 * xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    result = {"seconds": seconds, "finished": len(last), "goodput_tok_per_s": sum(outputs[r] for r in last) / seconds,
              "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99), "ttft_ms_max": 1e3 * ttft[-1],
              "tpot_ms_p50": pct(tpot, 0.5), "tpot_ms_p99": pct(tpot, 0.99),
              # engine.step() wall time (host and device, async scheduling overlapping them) and batch
              "steps": len(steps), "step_ms_p50": pct(sorted(t for t, *_ in steps), 0.5),
              "step_ms_p99": pct(sorted(t for t, *_ in steps), 0.99),
              "seqs_per_step": sum(step[1] for step in steps) / max(1, len(steps)),
              "adapters_per_step": sum(step[2] for step in steps) / max(1, len(steps)),
              "preemptions": stats["num_preemptions"],
              # Triton kernels compiled inside the run (the start-up warm-up misses them): their
              # compile time is in the steps and the queue behind them
              "triton_compiles": sorted(COMPILES.take()),
              # each step as [ms, sequences, adapters, tokens]: what a step costs by what it carries
              "step_log": [[round(1e3 * t, 3), n, a, k] for t, n, a, k in steps]}
    if isinstance(window, dict):
        result["profile"] = window
    if names is not None:
        lookups = stats["lora_slot_hits"] + stats["lora_slot_misses"]
        result.update(slot_loads_per_s=stats["lora_slot_loads"] / seconds,
                      resident_hit_rate=stats["lora_slot_hits"] / lookups if lookups else None,
                      bytes_moved=stats["lora_bytes_loaded"], heap_compactions=stats["lora_compactions"],
                      bytes_compacted=stats["lora_bytes_compacted"],
                      kv_blocks_borrowed=stats["lora_kv_blocks_borrowed"],
                      kv_blocks_returned=stats["lora_kv_blocks_returned"], **adapter_waits(seqs))
    return result


PROGRESS_S = 30.0  # seconds between progress lines


class ProfileWindow:
    """torch.profiler over a run of steps: what the device ran in them (kernel time by name, and
    the union of kernel intervals against the steps' wall time: below 1, the device waited)."""

    def __init__(self, first: int):
        from torch.profiler import ProfilerActivity, profile
        self.first = first
        # the device's activity only where there is one: host-side tracing would slow the steps it times
        activities = [ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def summary(self, steps: list) -> dict:
        self.prof.__exit__(None, None, None)
        kernels, spans = {}, []
        for evt in self.prof.events():
            if torch.cuda.is_available() and evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            start, end = evt.time_range.start, evt.time_range.end
            spans.append((start, end))
            calls, us = kernels.get(evt.name, (0, 0.0))
            kernels[evt.name] = (calls + 1, us + end - start)
        busy, reach = 0.0, float("-inf")
        for start, end in sorted(spans):  # the union of the intervals
            if end > reach:
                busy += end - max(start, reach)
                reach = end
        wall_ms = 1e3 * sum(t for t, *_ in steps)
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:40]
        return {"steps": len(steps), "wall_ms": wall_ms, "device_busy_ms": busy / 1e3,
                "kernel_ms": sum(us for _, us in kernels.values()) / 1e3,
                "seqs": sum(s[1] for s in steps), "tokens": sum(s[3] for s in steps),
                "top_kernels": [[name[:120], calls, round(us / 1e3, 3)] for name, (calls, us) in top]}


def progress(engine: LLMEngine, now: float, arrived: int, finished: int, recent: list) -> None:
    """One line on stderr: where the run is, and its steps since the last line."""
    s = engine.stats()
    mean = lambda k: sum(step[k] for step in recent) / max(1, len(recent))  # noqa: E731
    print(f"[{now:6.0f} s] arrived {arrived} finished {finished} running {s['running']} waiting {s['waiting']}  "
          f"step {1e3 * mean(0):.1f} ms, {mean(1):.1f} seqs, {mean(2):.1f} adapters  "
          f"heap {s['lora_heap_bytes'] / 1e9:.1f} GB ({s['kv_blocks_lent']} KV blocks lent)  "
          f"compactions {s['lora_compactions']}  preemptions {s['num_preemptions']}", file=sys.stderr, flush=True)


def adapter_waits(seqs: list) -> dict:
    """From each request's arrival until the scheduler first found its adapter in a ready slot
    (Sequence.adapter_ready; requests it never reached count to now): p99 and max, seconds."""
    now = time.perf_counter()
    waits = sorted((s.adapter_ready if s.adapter_ready is not None else now) - s.arrival for s in seqs if s.lora)
    if not waits:
        return {}
    return {"adapter_wait_s_p99": waits[min(len(waits) - 1, int(0.99 * len(waits)))], "adapter_wait_s_max": waits[-1]}


def capacity(engine: LLMEngine, trace: list[dict], count: int) -> float:
    """Requests per second the engine finishes without adapters: `count` requests at once, with
    prompts of their own (the measured runs' would be found in the prefix cache)."""
    head = [dict(req, t=0.0) for req in trace[:count]]
    return len(head) / run_trace(engine, head, None, prompt_seed=8)["seconds"]


def add_trace_args(ap: argparse.ArgumentParser) -> None:
    """The trace's options (make_trace's, and the batch size), shared with sim_workload.py."""
    ap.add_argument("--adapters", type=int, default=256)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[128, 2048])
    ap.add_argument("--output-range", type=int, nargs=2, default=[32, 512])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_workload.json")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, a short trace (smoke test)")
    ap.add_argument("--layers", type=int, default=48)
    add_trace_args(ap)
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate / no-adapter capacity")
    ap.add_argument("--max-loras", type=int, default=None, help="GPU slots (default: the memory budget)")
    ap.add_argument("--lora-layout", choices=("slots", "bytes"), default="bytes",
                    help="EngineConfig.lora_layout (bytes: mixed ranks and targets each take their own bytes)")
    ap.add_argument("--lora-rank-unit", type=int, choices=(8, 16), default=None,
                    help="EngineConfig.lora_rank_unit (8: a rank-8 adapter's experts take rank-8 bytes; "
                         "default: the engine's)")
    ap.add_argument("--prefix-caching", choices=["on", "off"], default="on",
                    help="EngineConfig.enable_prefix_caching (the trace's prompts share nothing: "
                         "what it changes is which free KV block a sequence gets, and host time)")
    ap.add_argument("--kv-tokens", type=int, default=None,
                    help="KV cache size in tokens (EngineConfig.num_kv_blocks; default: the memory rule's, "
                    "max_num_seqs full-length sequences): the adapter heap takes the memory it leaves")
    ap.add_argument("--runs", choices=("both", "none", "adapters"), default="both",
                    help="which runs of the same arrivals: both, or one (see --baseline)")
    ap.add_argument("--baseline", default="", help="with --runs adapters: an earlier --runs none JSON of the "
                    "same trace, whose arrival rate this run takes and whose run it compares against")
    ap.add_argument("--copy-chunk-mib", type=float, default=None,
                    help="SlotPools.copy_chunk_bytes in MiB (0: each adapter image in one copy; default: the engine's)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="profile this many steps of each run (torch.profiler): kernel time by name, device busy")
    ap.add_argument("--profile-at", type=float, default=60.0, help="seconds into each run the profiled steps start")
    args = ap.parse_args(argv)
    if args.runs == "adapters" and not args.baseline:
        raise SystemExit("--runs adapters needs --baseline: the no-adapter run it compares against")
    if args.tiny:
        args.layers, args.adapters, args.requests = 2, min(args.adapters, 32), min(args.requests, 120)
        args.prompt_range, args.output_range, args.max_loras = [8, 48], [4, 16], args.max_loras or 4
    baseline = _baseline(args) if args.baseline else None
    shape = TINY if args.tiny else QWEN3_30B_A3B
    engine = LLMEngine(EngineConfig(
        hf_config=hf_config(shape, args.layers), load_format="dummy", device="cpu" if args.tiny else "cuda",
        max_loras=args.max_loras, max_lora_rank=max(RANKS), max_cpu_loras=args.adapters, lora_layout=args.lora_layout,
        lora_rank_unit=args.lora_rank_unit, max_num_seqs=args.max_num_seqs,
        max_model_len=args.prompt_range[1] + args.output_range[1] + 16, seed=0,
        block_size=BLOCK, num_kv_blocks=None if args.kv_tokens is None else -(-args.kv_tokens // BLOCK),
        enable_prefix_caching=args.prefix_caching == "on"))
    if args.copy_chunk_mib is not None:
        engine.runner.slot_pools.copy_chunk_bytes = int(args.copy_chunk_mib * 2**20)
    names = install_adapters(engine, args.adapters)
    trace = make_trace(args)
    if baseline is not None:
        rate = baseline["arrival_rate_per_s"]
    else:
        rate = args.load * capacity(engine, trace, min(len(trace), 4 * args.max_num_seqs))
    arrivals = timed(trace, rate, args.seed)
    results = {"provenance": provenance(list(sys.argv if argv is None else argv)), "args": vars(args), "layers": args.layers,
               "kv_tokens": engine.runner.memory_plan.kv_tokens,
               "lora_slots": engine.runner.num_lora_slots, "slot_bytes": engine.runner.slot_pools.slot_bytes,
               "heap_bytes": engine.runner.memory_plan.heap_bytes, "arrival_rate_per_s": rate,
               "copy_chunk_bytes": engine.runner.slot_pools.copy_chunk_bytes}
    if args.runs in ("both", "none"):
        results["no_adapters"] = run_trace(engine, arrivals, None, args.profile_at, args.profile_steps)
    else:
        results["no_adapters"] = dict(baseline["no_adapters"], from_file=args.baseline,
                                      provenance=baseline["provenance"])
    if args.runs in ("both", "adapters"):
        results["adapters"] = run_trace(engine, arrivals, names, args.profile_at, args.profile_steps)
        base, lora = results["no_adapters"], results["adapters"]
        results["goodput_ratio"] = lora["goodput_tok_per_s"] / base["goodput_tok_per_s"]
        results["ttft_p99_ratio"] = lora["ttft_ms_p99"] / base["ttft_ms_p99"]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{args.requests} requests at {rate:.2f}/s over {args.adapters} adapters, {engine.runner.num_lora_slots} slots, "
          f"an adapter heap of {results['heap_bytes'] / 2**30:.2f} GiB (the largest adapter: "
          f"{results['slot_bytes'] / 2**20:.1f} MiB at rank {max(RANKS)})")
    print("run          goodput tok/s  TTFT p50/p99 ms   TPOT p50/p99 ms   max TTFT s  loads/s  hit rate  GB moved"
          "  adapter wait p99/max s")
    runs = [(label, results[key]) for label, key in (("no adapters", "no_adapters"), ("adapters", "adapters"))
            if key in results]
    for label, r in runs:
        extra = (f"{r['slot_loads_per_s']:8.2f}  {r['resident_hit_rate'] or 0:8.2f}  {r['bytes_moved'] / 1e9:8.2f}"
                 f"  {r.get('adapter_wait_s_p99', 0):.2f}/{r.get('adapter_wait_s_max', 0):.2f}"
                 if "bytes_moved" in r else "")
        print(f"{label:<12}{r['goodput_tok_per_s']:14.1f}  {r['ttft_ms_p50']:7.0f}/{r['ttft_ms_p99']:<7.0f}  "
              f"{r['tpot_ms_p50']:7.1f}/{r['tpot_ms_p99']:<7.1f}  {r['ttft_ms_max'] / 1e3:10.2f}  {extra}")
    if "goodput_ratio" in results:
        print(f"goodput {results['goodput_ratio']:.2f}x, TTFT p99 {results['ttft_p99_ratio']:.2f}x the no-adapter run")
    return 0


_TRACE_ARGS = ("tiny", "layers", "adapters", "requests", "zipf", "prompt_range", "output_range", "max_num_seqs", "seed",
               "kv_tokens")


def _baseline(args) -> dict:
    """The --baseline JSON, refused unless it ran the no-adapter run of the same trace."""
    if args.runs != "adapters":
        raise SystemExit("--baseline goes with --runs adapters")
    with open(args.baseline) as f:
        baseline = json.load(f)
    differ = [k for k in _TRACE_ARGS if baseline["args"].get(k) != getattr(args, k)]
    if differ or "no_adapters" not in baseline:
        raise SystemExit(f"{args.baseline} is not a no-adapter run of this trace (differs in {differ or 'its runs'})")
    return baseline


if __name__ == "__main__":
    sys.exit(main())
