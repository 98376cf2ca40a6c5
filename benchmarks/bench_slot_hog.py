"""One tenant's long requests over more adapters than slots, against another tenant's short
requests on its own adapter: the engine alone (no HTTP, no Serve), so that the victim's latency
under `bench_floods.py`'s slot_hog splits into what the engine's scheduling costs and what the
serving stack adds.

The hog keeps `--streams` requests of `--hog-tokens` tokens running over `--hog-adapters`
adapters (a new one as each finishes); every `--every` steps, once the hog has run
`--warm-steps` steps, the victim sends one request of `--victim-tokens` tokens on its adapter,
one at a time. Each victim request's latency is reported in steps and in ms, against the same
requests with no hog, with the engine's slot counters over the run. Adapters are random, rank
`--rank` on every target, installed in the host tier (the store and disk are bench_store's).

`--from-disk` writes one random PEFT adapter to a temporary directory and names it once per
adapter instead, so the host tier loads each (load, pack into its host image) while the hog
runs, as a replica does when new adapters arrive (the victim's adapter is loaded before the runs,
and its requests start with the hog's); the slowest steps of each run are reported: compare
those, since the loads' own length differs between the two ways of pinning.
`--torch-pinned` gives the host tier no arena (engine.lora.host_arena): its images are then
pinned by torch's allocator, a driver call per new image, as before that arena.

    python benchmarks/bench_slot_hog.py --out hog.json                        # H200, 8 layers
    python benchmarks/bench_slot_hog.py --from-disk [--torch-pinned]          # host loads in the hog
    python benchmarks/bench_slot_hog.py --tiny --out /tmp/hog.json            # CPU smoke run
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from engine.models.presets import QWEN3_30B_A3B

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.bench_slot_hog
    from bench_engine import TINY, hf_config, install, random_adapter
    from provenance import provenance, write_results
    from serve_adapters import RandomAdapterWriter
except ImportError:
    from benchmarks.bench_engine import TINY, hf_config, install, random_adapter
    from benchmarks.provenance import provenance, write_results
    from benchmarks.serve_adapters import RandomAdapterWriter

COUNTERS = ("lora_slot_preemptions", "lora_slot_loads", "lora_evictions", "lora_compactions", "num_preemptions",
            "lora_slot_misses", "lora_host_loads", "lora_host_pin_seconds", "lora_host_unpinned_images")


def run(engine: LLMEngine, opts, hog: bool, path: str = "/in-host-tier") -> dict:
    """Victim requests one at a time, with the hog's streams running (hog) or alone."""
    params = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    count = [0]

    def add(tenant: str, adapter: str, tokens: int, stream: int = 0) -> str:
        count[0] += 1
        rid = f"{tenant}-{count[0]}-{stream}"
        engine.add_request(rid, prompt, params(tokens), lora=LoRARequest(adapter, path), tenant=tenant)
        return rid

    def hog_adapter(stream: int) -> str:
        # paired: a stream keeps its adapter (bench_floods' client threads); else each new request
        # takes the next adapter in turn
        return f"hog-{(stream if opts.paired else count[0]) % opts.hog_adapters}"

    if hog:
        for k in range(opts.streams):
            add("hog", f"hog-{k % opts.hog_adapters}", opts.hog_tokens, k)
    before = engine.stats()
    steps = 0
    victim, sent_step, sent_at, latencies, step_ms = None, 0, 0.0, [], []
    while len(latencies) < opts.victims:
        began = time.perf_counter()
        outputs = engine.step()
        steps += 1
        now = time.perf_counter()
        step_ms.append((round(1e3 * (now - began), 2), steps))
        for out in outputs:
            if not out.finished:
                continue
            if out.request_id.startswith("hog"):
                stream = int(out.request_id.rsplit("-", 1)[1])
                add("hog", hog_adapter(stream), opts.hog_tokens, stream)
            elif out.request_id == victim:
                latencies.append((steps - sent_step, 1e3 * (now - sent_at)))
                victim = None
        if victim is None and steps >= (opts.warm_steps if hog else 0) and steps % opts.every == 0:
            victim, sent_step, sent_at = add("victim", "victim-style", opts.victim_tokens), steps, time.perf_counter()
    for seq in list(engine.scheduler.running) + [s for q in engine.scheduler.waiting.values() for s in q]:
        engine.abort(seq.request_id)
    while engine.has_unfinished_requests():
        engine.step()
    after = engine.stats()
    ms = sorted(m for _, m in latencies)
    return {"victim_steps": [s for s, _ in latencies], "victim_ms": [round(m, 2) for _, m in latencies],
            "victim_ms_p50": round(ms[len(ms) // 2], 2), "victim_ms_max": round(ms[-1], 2),
            "slowest_steps": [{"ms": m, "step": n} for m, n in sorted(step_ms, reverse=True)[:8]],
            "counters": {k: round(after[k] - before[k], 3) for k in COUNTERS}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--slots", type=int, default=4, help="EngineConfig.max_loras (bench_floods' app: 4)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--streams", type=int, default=24)
    ap.add_argument("--hog-adapters", type=int, default=12)
    ap.add_argument("--hog-tokens", type=int, default=200)
    ap.add_argument("--victim-tokens", type=int, default=8)
    ap.add_argument("--victims", type=int, default=20)
    ap.add_argument("--paired", action="store_true", help="each hog stream keeps one adapter, hog-(stream mod "
                    "adapters), as bench_floods' slot_hog client threads do: an adapter's streams end together")
    ap.add_argument("--every", type=int, default=5, help="steps between a victim's answer and its next request")
    ap.add_argument("--warm-steps", type=int, default=None, help="hog steps before the victim's first request "
                    "(default 50; 0 with --from-disk: the victim meets the hog's host loads)")
    ap.add_argument("--prefill-graphs", action="store_true", help="EngineConfig.prefill_graphs (start-up +40 s)")
    ap.add_argument("--from-disk", action="store_true", help="adapters loaded from disk into the host tier while "
                    "the runs go (not installed there first)")
    ap.add_argument("--torch-pinned", action="store_true", help="no host arena: host images pinned by torch's "
                    "allocator (the host tier before engine.lora.host_arena)")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args(argv)
    if opts.warm_steps is None:
        opts.warm_steps = 0 if opts.from_disk else 50
    cuda = torch.cuda.is_available() and not opts.tiny
    shape = TINY if opts.tiny else QWEN3_30B_A3B
    engine = LLMEngine(EngineConfig(
        model=None, load_format="dummy", hf_config=hf_config(shape, 2 if opts.tiny else opts.layers),
        device="cuda" if cuda else "cpu", max_loras=opts.slots, max_lora_rank=opts.rank,
        max_num_seqs=max(32, opts.streams + 1), max_model_len=1024, prefill_graphs=opts.prefill_graphs and cuda))
    manager = engine.lora_manager
    if opts.torch_pinned:
        manager.arena, engine.runner.slot_pools.align_bytes = None, 0
    with tempfile.TemporaryDirectory() as tmp:
        path = "/in-host-tier"
        if opts.from_disk:  # one file set, a name per adapter: each name is its own host load
            config = json.loads(engine.config.hf_config.to_json_string())
            path = str(RandomAdapterWriter(config, opts.rank, device="cpu").write(Path(tmp) / "adapter", seed=1))
            manager.host_capacity = max(manager.host_capacity, opts.hog_adapters + 1)
            # the victim's adapter loaded before the runs: its load is in neither run, the hog's are in its run
            engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2), [LoRARequest("victim-style", path)])
        else:
            images = [random_adapter(engine, opts.rank, k) for k in range(2)]
            install(engine, [f"hog-{k}" for k in range(opts.hog_adapters)] + ["victim-style"], images)
        result = {"provenance": provenance(list(sys.argv if argv is None else argv)), "config": vars(opts),
                  "alone": run(engine, opts, hog=False, path=path), "hog": run(engine, opts, hog=True, path=path)}
    stats = engine.stats()
    result["host_tier"] = {k: stats[k] for k in ("lora_host_pinned_bytes", "lora_host_bytes_used")}
    for name in ("alone", "hog"):
        r = result[name]
        print(f"{name:6s} victim ms p50 {r['victim_ms_p50']} max {r['victim_ms_max']}; steps "
              f"{sorted(r['victim_steps'])}; {r['counters']}; slowest steps ms "
              f"{[s['ms'] for s in r['slowest_steps']]}")
    write_results(result, opts.out, "bench_slot_hog")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
