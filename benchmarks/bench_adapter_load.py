"""Host time of reading one adapter into the engine's form (engine.lora.adapter.load_adapter).

A random rank-`--rank` PEFT adapter on q/k/v/o and every expert's gate/up/down of a preset's
shapes (benchmarks/serve_adapters.py, bf16) at `--layers` layers, loaded `--repeats` times
into bf16 factors: parse, shape checks, scaling folded into B, expert stacking. The first load
meets fresh memory (what a replica's first request on an adapter pays); later ones reuse the
allocator's pages. This is the host tier's load before the slot image and the GPU copy
(LoRAManager._load_to_host then packs it); it scales with the layer count.

    python benchmarks/bench_adapter_load.py [--preset qwen3-30b-a3b] [--layers 4] [--out F]
"""
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

from engine.lora.adapter import load_adapter
from engine.models.presets import get_preset
from engine.models.spec import load_spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
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
    size = adapter_bytes(config, opts.rank)
    print(f"{opts.preset}, {opts.layers} layers, rank {opts.rank}: {size / 1e6:.0f} MB; "
          f"load_adapter s: {seconds} (first, then warm)")
    write_results({"provenance": provenance(list(sys.argv if argv is None else argv)),
                   "config": vars(opts), "adapter_bytes": size, "seconds": seconds},
                  opts.out, "bench_adapter_load")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
