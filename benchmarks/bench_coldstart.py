"""Cold start: a real-size random HF checkpoint on disk -> engine ready (and Serve ready).

    python benchmarks/bench_coldstart.py [--preset olmoe-1b-7b] [--serve]   # GPU: ~14 GB bf16
    python benchmarks/bench_coldstart.py --tiny                            # CPU, < 1 minute

1. Writes the checkpoint with transformers' own `save_pretrained` (safetensors shards):
   the model is built on the meta device, materialised on the GPU and filled with random
   values, so making 14 GB takes about as long as writing it.
2. Measures the disk's read rate on the shard files with a cold page cache: through
   /proc/sys/vm/drop_caches when allowed, else by evicting the files' pages with
   posix_fadvise(DONTNEED) after an fsync (the JSON says which).
3. Starts an LLMEngine on it (page cache cold again) and reports start-up by part from
   `engine.runner.startup_seconds` when the engine exposes it, and the weight loading time
   against bytes / read rate. With --serve, also `serve.run(build_app(...))` until ready.
Prints a table last and writes JSON with provenance.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import torch

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.bench_coldstart
    from provenance import provenance, write_results
except ImportError:
    from benchmarks.provenance import provenance, write_results

TINY_OVERRIDES = {"hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8,
                  "num_experts_per_tok": 2, "vocab_size": 512}
_READ_CHUNK = 16 << 20


def write_checkpoint(out: Path, preset: str, overrides: dict, device: str) -> dict:
    """Random-weight HF checkpoint of `preset` in `out`; returns {"bytes", "files", "seconds"}."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.models.presets import get_preset
    from engine.tiny_model import write_dummy_model

    started = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    write_dummy_model(out, get_preset(preset).config_dict(), overrides)  # config + tokenizer
    config = AutoConfig.from_pretrained(str(out))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(str(out), max_shard_size="4GB")
    del model
    _free(device)
    files = sorted(out.glob("*.safetensors"))
    return {"bytes": sum(f.stat().st_size for f in files), "files": len(files),
            "seconds": round(time.perf_counter() - started, 2)}


# On a shared machine the whole-cache drop hurts everyone else: --no-drop-caches turns it off.
DROP_CACHES = True


def evict_page_cache(files: list[Path]) -> str:
    """Drop `files` from the page cache; return how ("drop_caches" or "fadvise_dontneed")."""
    os.sync()
    if DROP_CACHES:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:  # not root, or /proc/sys read-only in a container
            pass
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise_dontneed"


def read_rate(files: list[Path]) -> dict:
    """Bytes per second reading `files` start to end after evicting them from the cache."""
    method = evict_page_cache(files)
    buffer = bytearray(_READ_CHUNK)
    total, started = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    seconds = time.perf_counter() - started
    return {"method": method, "bytes": total, "seconds": round(seconds, 3),
            "bytes_per_s": total / seconds if seconds else float("inf")}


def engine_start(model_dir: Path, device: str, files: list[Path]) -> dict:
    from engine import EngineConfig, LLMEngine

    method = evict_page_cache(files)
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=device, max_model_len=2048))
    total = time.perf_counter() - started
    parts = dict(getattr(getattr(engine, "runner", None), "startup_seconds", None) or {})
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        shutdown()
    del engine
    _free(device)
    return {"cache_evicted_by": method, "total_s": round(total, 2),
            "parts_s": {k: round(v, 3) for k, v in parts.items()}}


def serve_start(model_dir: Path, device: str, files: list[Path], cache_dir: Path) -> dict:
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.args import AppArgs

    method = evict_page_cache(files)
    ray.init(include_dashboard=False)
    try:
        started = time.perf_counter()
        serve.run(build_app(AppArgs(model=str(model_dir), device=device, cache_dir=str(cache_dir))),
                  name="coldstart", route_prefix="/")
        return {"cache_evicted_by": method, "ready_s": round(time.perf_counter() - started, 2)}
    finally:
        serve.shutdown()
        ray.shutdown()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def print_table(results: dict) -> None:
    ckpt, disk, eng = results["checkpoint"], results["disk_read"], results["engine_start"]
    rows = [("checkpoint", f"{ckpt['bytes'] / 1e9:.2f} GB in {ckpt['files']} shards, "
                           f"written in {ckpt['seconds']} s"),
            ("disk read", f"{disk['bytes_per_s'] / 1e6:.0f} MB/s ({disk['method']})"),
            ("engine start", f"{eng['total_s']} s")]
    rows += [(f"  {part}", f"{seconds} s") for part, seconds in eng["parts_s"].items()]
    w = results["weights_vs_disk"]
    if w:
        rows.append(("weights vs disk", f"{w['weights_s']} s vs {w['read_s_at_disk_rate']} s "
                                        f"at the read rate (x{w['ratio']})"))
    if "serve_start" in results:
        rows.append(("serve.run ready", f"{results['serve_start']['ready_s']} s"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="olmoe-1b-7b", help="engine.models.presets name")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke run)")
    p.add_argument("--serve", action="store_true", help="also time serve.run(build_app(...))")
    p.add_argument("--dir", default=None, help="where the checkpoint goes (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="evict only the checkpoint's pages (fadvise), never the whole page cache")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global DROP_CACHES
    opts = parse_args(argv)
    DROP_CACHES = not opts.no_drop_caches
    device = "cpu" if opts.tiny or not torch.cuda.is_available() else "cuda"
    base = Path(opts.dir or f"/tmp/moeplex-coldstart-{os.getpid()}")
    model_dir = base / ("tiny" if opts.tiny else opts.preset)
    try:
        results = {"provenance": provenance(list(sys.argv if argv is None else argv)),
                   "config": {**vars(opts), "device": device}}
        results["checkpoint"] = write_checkpoint(model_dir, opts.preset,
                                                 TINY_OVERRIDES if opts.tiny else {}, device)
        files = sorted(model_dir.glob("*.safetensors"))
        results["disk_read"] = read_rate(files)
        results["engine_start"] = eng = engine_start(model_dir, device, files)
        weights_s = eng["parts_s"].get("weights")
        at_rate = results["checkpoint"]["bytes"] / results["disk_read"]["bytes_per_s"]
        results["weights_vs_disk"] = {} if weights_s is None else {
            "weights_s": weights_s, "read_s_at_disk_rate": round(at_rate, 3),
            "ratio": round(weights_s / at_rate, 2) if at_rate else None}
        if opts.serve:
            results["serve_start"] = serve_start(model_dir, device, files, base / "cache")
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
    write_results(results, opts.out, "bench_coldstart")
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
