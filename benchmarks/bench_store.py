"""Adapter store throughput: upload, cold fetch and disk-cache hit of a ~300 MB adapter.

    .venv/bin/python benchmarks/bench_store.py [--mb 300] [--out bench_store.json]

Writes a synthetic Qwen3-MoE base config and a per-expert PEFT LoRA adapter (bf16,
random values) with numpy, starts moto's standalone S3 server (`moto_server`) on a
free loopback port, and times through `adapter_store`:
- validate: header, keys, shapes, finiteness alone;
- put: validation + sha256 + upload (multipart), end to end;
- cold fetch: parallel ranged download into an empty DiskCache + sha256 verification;
- cache hit: DiskCache.fetch of the same version again (no request to the store).
The same is done against a LocalStore on local disk. Prints a table last, writes JSON with provenance.

    .venv/bin/python benchmarks/bench_store.py --list-adapters 1000 [--out bench_store_list.json]

times instead one tenant's listing (`/v1/models`, `moeplex-adapters list`) over that many stored
adapters (their manifests and two small files each, written directly), on both backends:
`list_adapters` against the walk of one adapter at a time it replaced (a listing of its versions
and a read of its share mark and its newest manifest, ~3 sequential requests per adapter on S3).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from adapter_store import DiskCache, StoreLimits, open_store
from adapter_store.validate import validate_adapter

try:  # run as a script (benchmarks/ is sys.path[0]) or imported from the repository root
    from provenance import provenance
except ImportError:
    from benchmarks.provenance import provenance

LAYER_SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_attention_heads=16,
                   num_key_value_heads=4, head_dim=128)
RANK = 8


def write_base_config(path: Path, num_layers: int, num_experts: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen3_moe", "num_hidden_layers": num_layers, "num_experts": num_experts,
              "intermediate_size": 6144, **LAYER_SHAPE}
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_adapter(path: Path, num_layers: int, num_experts: int, seed: int = 0) -> Path:
    """A per-expert bf16 LoRA adapter written straight in the safetensors layout."""
    path.mkdir(parents=True, exist_ok=True)
    d, i = LAYER_SHAPE["hidden_size"], LAYER_SHAPE["moe_intermediate_size"]
    io = {"gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    rng = np.random.default_rng(seed)
    header, blobs, offset = {}, [], 0
    for layer in range(num_layers):
        for expert in range(num_experts):
            for module, (fan_in, fan_out) in io.items():
                base = f"base_model.model.model.layers.{layer}.mlp.experts.{expert}.{module}"
                for side, shape in (("A", (RANK, fan_in)), ("B", (fan_out, RANK))):
                    values = rng.standard_normal(shape, dtype=np.float32) * 0.02
                    blob = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # fp32 -> bf16
                    header[f"{base}.lora_{side}.weight"] = {
                        "dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
                    blobs.append(blob)
                    offset += len(blob)
    raw = json.dumps(header).encode()
    with open(path / "adapter_model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for blob in blobs:
            f.write(blob)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": list(io),
              "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def measure(store, adapter: Path, base: Path, work: Path, hits: int) -> dict:
    size = sum(f.stat().st_size for f in adapter.iterdir())
    t0 = time.perf_counter()
    validate_adapter(adapter, base, StoreLimits())
    t_validate = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = store.put("bench", "big", adapter, base)
    t_put = time.perf_counter() - t0
    cache = DiskCache(work / f"cache-{type(store).__name__}", 4 * size)
    t0 = time.perf_counter()
    cache.fetch(store, info)
    t_cold = time.perf_counter() - t0
    hit_times = []
    for _ in range(hits):
        t0 = time.perf_counter()
        cache.fetch(store, info)
        hit_times.append(time.perf_counter() - t0)
    mb = size / 1e6
    return {"backend": type(store).__name__, "size_mb": round(mb, 1), "validate_s": round(t_validate, 3),
            "put_s": round(t_put, 3),
            "put_mb_s": round(mb / t_put, 1), "cold_fetch_s": round(t_cold, 3),
            "cold_fetch_mb_s": round(mb / t_cold, 1),
            "cache_hit_ms_median": round(1e3 * statistics.median(hit_times), 3)}


def measure_listing(store, count: int, repeats: int = 3) -> dict:
    from adapter_store.store import MANIFEST_FILE
    from adapter_store.validate import ADAPTER_FILES
    from adapter_store.versions import new_version, version_key
    for i in range(count):
        prefix = version_key("bench", f"adapter-{i:05d}", new_version())
        files = {}
        for name in ADAPTER_FILES:
            store._write_bytes(f"{prefix}/{name}", b"{}")
            files[name] = {"size": 2, "sha256": "0" * 64}
        store._write_bytes(f"{prefix}/{MANIFEST_FILE}", json.dumps({"format": 1, "files": files}).encode())

    def walk():  # the listing before list_adapters read whole trees: one adapter at a time
        return [info for name in store._list_children("tenants/bench/adapters")
                for info in store._latest("bench", name)]
    times = {}
    for label, run in (("per_adapter_walk", walk), ("list_adapters", lambda: store.list_adapters("bench"))):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            listed = run()
            best = min(best, time.perf_counter() - t0)
        assert len(listed) == count, (label, len(listed))
        times[label] = best
    return {"backend": type(store).__name__, "adapters": count,
            "per_adapter_walk_s": round(times["per_adapter_walk"], 3),
            "list_adapters_s": round(times["list_adapters"], 3),
            "speedup": round(times["per_adapter_walk"] / times["list_adapters"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=300, help="adapter size in MB (approximate)")
    parser.add_argument("--hits", type=int, default=20)
    parser.add_argument("--list-adapters", type=int, default=0, metavar="N",
                        help="time one tenant's listing over N adapters instead (see above)")
    parser.add_argument("--out", default="bench_store.json")
    args = parser.parse_args()
    per_layer_expert = 3 * 2 * RANK * (LAYER_SHAPE["hidden_size"] + LAYER_SHAPE["moe_intermediate_size"])
    num_experts = 64
    num_layers = max(1, round(args.mb * 1e6 / (per_layer_expert * num_experts)))
    for var, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(var, value)
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    proc, endpoint = start_moto()
    try:
        import boto3
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        stores = [open_store("s3://bench/moeplex", endpoint_url=endpoint, region="us-east-1"),
                  open_store(str(work / "local-store"))]
        if args.list_adapters:
            rows = [measure_listing(store, args.list_adapters) for store in stores]
        else:
            base = write_base_config(work / "base", num_layers, num_experts)
            adapter = write_adapter(work / "adapter", num_layers, num_experts)
            rows = [measure(store, adapter, base, work, args.hits) for store in stores]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    record = {"provenance": provenance(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
              f"{platform.system()} {platform.release()}", "python": platform.python_version(), "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2))
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))


if __name__ == "__main__":
    main()
