"""Host time of reading one adapter into the engine's form (engine.lora.adapter.load_adapter).

A random rank-`--rank` PEFT adapter on q/k/v/o and every expert's gate/up/down of a preset's
shapes (benchmarks/serve_adapters.py, bf16) at `--layers` layers, loaded `--repeats` times
into bf16 factors: parse, shape checks, scaling folded into B, expert stacking. The first load
meets fresh memory (what a replica's first request on an adapter pays); later ones reuse the
allocator's pages. This is the host tier's load before the slot image and the GPU copy
(LoRAManager._load_to_host then packs it); it scales with the layer count.

    python benchmarks/bench_adapter_load.py [--preset qwen3-30b-a3b] [--layers 4] [--out F]

`--step-loop S` also times a host-bound stand-in for the step loop (60 small torch ops, then a
1 ms pause) for S seconds alone and S seconds beside one thread loading the adapter again and
again, as the engine's loader threads do beside its step loop: how long the loads hold the GIL
from it. `--yield-every N` sets engine.lora.adapter's GIL yield (a huge N: none).
"""
import gc
import threading
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance, write_results
    from serve_adapters import RandomAdapterWriter, adapter_bytes
except ImportError:
    from benchmarks.provenance import provenance, write_results
    from benchmarks.serve_adapters import RandomAdapterWriter, adapter_bytes

from engine.lora import adapter as loader
from engine.lora.adapter import load_adapter
from engine.models.presets import get_preset
from engine.models.spec import load_spec


def beside_loads(path: Path, spec, opts) -> dict:
    """The step-loop stand-in's time per iteration (p50 / p99 / max ms), alone and beside a thread
    loading the adapter at `path` over and over (the start-up heap frozen, as the engine's is)."""
    gc.collect()
    gc.freeze()
    x = torch.zeros(8)

    def timed(seconds: float) -> dict:
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            for _ in range(60):
                x.add_(1.0)
            times.append(time.perf_counter() - started)
            time.sleep(0.001)
        times.sort()
        return {"n": len(times), **{k: round(1e3 * times[min(len(times) - 1, int(q * len(times)))], 3)
                                    for k, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}}

    def load_until_done():
        while not done.is_set():
            load_adapter("bench", path, spec, torch.bfloat16, opts.rank)

    alone = timed(opts.step_loop)
    done, every = threading.Event(), loader.YIELD_EVERY
    loader.YIELD_EVERY = opts.yield_every
    try:
        thread = threading.Thread(target=load_until_done)
        thread.start()
        beside = timed(opts.step_loop)
        done.set()
        thread.join()
    finally:
        loader.YIELD_EVERY = every
    return {"alone": alone, "beside_loads": beside}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-loop", type=float, default=0.0, help="seconds of the step-loop stand-in, alone and "
                   "beside a loading thread (0: not run)")
    p.add_argument("--yield-every", type=int, default=loader.YIELD_EVERY, help="tensors between GIL yields")
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    config = get_preset(opts.preset).config_dict()
    config["num_hidden_layers"] = opts.layers
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        RandomAdapterWriter(config, opts.rank, device="cpu").write(work / "adapter", seed=1)
        (work / "model").mkdir()
        (work / "model" / "config.json").write_text(json.dumps(config))
        spec = load_spec(work / "model")
        seconds = []
        for _ in range(opts.repeats):
            started = time.perf_counter()
            load_adapter("bench", work / "adapter", spec, torch.bfloat16, opts.rank)
            seconds.append(round(time.perf_counter() - started, 3))
        step_loop = beside_loads(work / "adapter", spec, opts) if opts.step_loop > 0 else None
    size = adapter_bytes(config, opts.rank)
    print(f"{opts.preset}, {opts.layers} layers, rank {opts.rank}: {size / 1e6:.0f} MB; "
          f"load_adapter s: {seconds} (first, then warm)")
    if step_loop is not None:
        print(f"step-loop stand-in, ms: alone {step_loop['alone']}; beside loads {step_loop['beside_loads']}")
    write_results({"provenance": provenance(list(sys.argv if argv is None else argv)),
                   "config": vars(opts), "adapter_bytes": size, "seconds": seconds, "step_loop": step_loop},
                  opts.out, "bench_adapter_load")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
