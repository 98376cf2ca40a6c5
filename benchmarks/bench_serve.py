"""Served-path benchmark: the same token-id requests through HTTP + Serve and into the engine alone.

    python benchmarks/bench_serve.py                      # CPU smoke run: tiny model, HTTP uploads
    python benchmarks/bench_serve.py --model dummy:qwen3-30b-a3b \
        --hf-overrides '{"num_hidden_layers": 8}' --adapters 16 --rank 16 --tenants 16 \
        --concurrency 64 --requests 256 --prompt-tokens 512 --max-tokens 128 \
        --sequential 16 --burst 500                      # GPU, full size

Starts Ray and the moeplex app on loopback (local adapter store, or a moto S3 server with
--s3), makes `--adapters` random rank-`--rank` PEFT adapters on q/k/v/o and every expert's
gate/up/down (benchmarks/serve_adapters.py), and puts them in the store as the operator
tenant `ops`, shared with every tenant: over HTTP while they are small, straight through
`args.open_store().put(...)` (what the ingress does) when they are big. Request i comes from
tenant i % T with adapter i % A and a seeded random prompt of `--prompt-tokens` ids; every
request is greedy with `ignore_eos`, so it makes exactly `--max-tokens` tokens, and asks for
`return_token_ids`. Measured: the burst at `--concurrency` and `--sequential` requests one at
a time, served and then straight into an in-process AsyncLLMEngine (same args); greedy
equality of every request's ids between the two; `--burst` requests fired at once through
HTTP with short outputs, counting errors. Prints a table last and writes JSON with provenance.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.bench_serve
    from cpu_sampler import CpuSampler
    from provenance import provenance, write_results
    from serve_adapters import RandomAdapterWriter, adapter_bytes
    from serve_clients import Run, direct_run, greedy_equality, http_run, http_run_procs, make_jobs
except ImportError:
    from benchmarks.cpu_sampler import CpuSampler
    from benchmarks.provenance import provenance, write_results
    from benchmarks.serve_adapters import RandomAdapterWriter, adapter_bytes
    from benchmarks.serve_clients import (Run, direct_run, greedy_equality, http_run, http_run_procs,
                                          make_jobs)

OPERATOR = "ops"
HTTP_UPLOAD_LIMIT = 256 << 20  # bigger adapters go into the store directly
PUT_THREADS = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir, s3:// or dummy:<name> (default: tiny)")
    p.add_argument("--hf-overrides", default=None, help='JSON, e.g. \'{"num_hidden_layers": 8}\'')
    p.add_argument("--adapters", type=int, default=4, help="0: every request on the base model")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--shared-prefix-tokens", type=int, default=0,
                   help="the first this many prompt ids are the tenant's, the same in each of its "
                        "requests (what prefix caching saves); default: every prompt its own")
    p.add_argument("--sequential", type=int, default=4, help="requests sent one at a time")
    p.add_argument("--burst", type=int, default=64, help="requests fired at once through HTTP")
    p.add_argument("--burst-tokens", type=int, default=4, help="max_tokens of the burst's requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-loras", type=int, default=None, help="GPU adapter slots (AppArgs default)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine (CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--upload", choices=["auto", "http", "store"], default="auto")
    p.add_argument("--resolve-ttl", type=float, default=None, help="AppArgs.adapter_resolve_ttl_s")
    p.add_argument("--s3", action="store_true", help="adapter store on a moto S3 server on loopback")
    p.add_argument("--client-procs", type=int, default=None,
                   help="processes the HTTP clients run in (default: one per 16 streams, at most 8)")
    p.add_argument("--engine-process", type=int, choices=[0, 1], default=None,
                   help="AppArgs.engine_process (default: AppArgs')")
    p.add_argument("--ingress-replicas", type=int, default=None, help="AppArgs.ingress_replicas")
    p.add_argument("--stream-interval-ms", type=float, default=None, help="AppArgs.stream_interval_ms")
    p.add_argument("--variants", default=None,
                   help="JSON list of AppArgs overrides, each served and measured after the main "
                        "configuration in the same run, e.g. '[{\"engine_process\": false}]'")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    return p.parse_args(argv)


def app_args(opts, workdir: Path, extra: dict, total_adapter_bytes: int):
    from deployments.args import AppArgs

    if opts.hf_overrides:
        extra["hf_overrides"] = json.loads(opts.hf_overrides)
    if opts.max_loras is not None:
        extra["max_loras"] = opts.max_loras
    if opts.resolve_ttl is not None:
        extra["adapter_resolve_ttl_s"] = opts.resolve_ttl
    for name in ("engine_process", "ingress_replicas", "stream_interval_ms"):
        if getattr(opts, name) is not None:
            extra[name] = getattr(opts, name)
    in_flight = max(64, opts.concurrency)
    return AppArgs(
        model=opts.model, cache_dir=str(workdir / "cache"), device=opts.device,
        num_replicas=opts.replicas, max_lora_rank=max(16, opts.rank), max_num_seqs=in_flight,
        max_ongoing_requests=in_flight, max_model_len=max(2048, opts.prompt_tokens + opts.max_tokens + 16),
        max_concurrent_requests_per_tenant=max(32, opts.concurrency, opts.burst),
        # the replica's disk cache holds every adapter, so none is fetched twice
        disk_cache_bytes=max(8 << 30, int(1.25 * total_adapter_bytes)), **extra)


def model_config(args, model_dir: Path) -> dict:
    """The served model's config.json with `hf_overrides` applied (what adapters must fit)."""
    from engine.testing import read_config

    return {**read_config(model_dir), **(getattr(args, "hf_overrides", None) or {})}


def upload_over_http(opts, config: dict) -> bool:
    return opts.upload == "http" or (opts.upload == "auto" and
                                     adapter_bytes(config, opts.rank) <= HTTP_UPLOAD_LIMIT)


def put_adapters(args, url: str | None, opts, config: dict, workdir: Path) -> tuple[dict, dict]:
    """Write, store and share every adapter (over HTTP when `url`); ({name: AdapterInfo}, timings).

    Each adapter is deleted once stored: at 48 layers 16 adapters are 27 GB, and the disk also
    holds the store's copy and the replica's cache. Straight into the store, up to
    `PUT_THREADS` puts (validation, digest, copy: file and hashing work that leaves the GIL)
    run while the next adapter is drawn; 16 puts one after the other took 103 s at 48 layers.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import httpx

    store, writer = args.open_store(), RandomAdapterWriter(config, opts.rank)
    http = url is not None
    timings = {"generate_s": 0.0, "via": "http" if http else "store.put",
               "generated_on": writer.device}
    model_dir = None if http else args_model_dir(args)

    def put(name: str, path: Path) -> None:
        if http:
            files = [("files", (f, (path / f).read_bytes()))
                     for f in ("adapter_config.json", "adapter_model.safetensors")]
            response = httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files,
                                  headers={"X-Tenant-Id": OPERATOR}, timeout=600)
            response.raise_for_status()
        else:
            store.put(OPERATOR, name, path, model_dir, limits=args.store_limits(model_dir))
        store.share(OPERATOR, name)
        shutil.rmtree(path)  # the disk holds the store's copy and the replica's cache only

    begun, workers = time.perf_counter(), 1 if http else PUT_THREADS
    with ThreadPoolExecutor(workers) as pool:
        pending, running = [], set()
        for i in range(opts.adapters):
            name, started = f"adapter{i}", time.perf_counter()
            path = writer.write(workdir / "adapters" / name, seed=opts.seed * 1000 + i + 1)
            timings["generate_s"] += time.perf_counter() - started
            pending.append(pool.submit(put, name, path))
            running.add(pending[-1])
            if len(running) >= workers:  # no more drawn adapters on disk than puts running
                running = wait(running, return_when=FIRST_COMPLETED).not_done
        for future in pending:
            future.result()
    timings["total_s"] = time.perf_counter() - begun
    timings["store_s"] = timings["total_s"] - timings["generate_s"]  # what the puts added
    infos = {f"adapter{i}": store.resolve(OPERATOR, f"adapter{i}") for i in range(opts.adapters)}
    return infos, {k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()}


def args_model_dir(args) -> Path:
    from deployments.model_files import ensure_model
    return ensure_model(args)


def run_served(args, opts, work: Workload, config, workdir, stored) -> dict:
    """Serve the app, upload the adapters unless `stored`, then time the parts over HTTP; then
    each `--variants` configuration's burst, redeployed on the same Ray instance."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    import ray
    from ray import serve

    from deployments.app import set_ray_env_defaults

    set_ray_env_defaults()  # as `serve run` gets them: this process starts Ray itself
    ray.init(include_dashboard=False, num_cpus=max(4, os.cpu_count() or 1),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(opts.threads)}})
    procs = opts.client_procs or max(1, min(8, opts.concurrency // 16))
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
    try:
        list(pool.map(abs, range(procs)))  # the client processes start before the clock runs
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        out = deploy_and_measure(args, opts, url, pool)
        if stored is None:
            stored = put_adapters(args, url, opts, config, workdir)
        out["infos"], out["adapters"] = stored
        out.update(measure_burst(opts, url, pool, work))
        out["served_sequential"] = asyncio.run(http_run(url, work.sequential, 1))
        if work.burst:
            out["burst"] = http_run_procs(pool, url, work.burst, len(work.burst))
        out["variants"] = []
        for overrides in json.loads(opts.variants or "[]"):
            variant = deploy_and_measure(args.model_copy(update=overrides), opts, url, pool)
            variant.update(measure_burst(opts, url, pool, work), overrides=overrides)
            out["variants"].append(variant)
        return out
    finally:
        pool.shutdown()
        # no serve.shutdown(): in HAProxy mode the ingress drains >= 30 s, past the controller's
        # shutdown wait; ray.shutdown() ends every actor now, and the engine replica's core
        # process follows its replica (engine.core_process.watch_parent)
        ray.shutdown()


def deploy_and_measure(args, opts, url, pool) -> dict:
    from ray import serve

    from deployments.app import build_app

    started = time.perf_counter()
    serve.run(build_app(args), name="moeplex-bench", route_prefix="/")
    return {"startup_s": round(time.perf_counter() - started, 1)}


def measure_burst(opts, url, pool, work: Workload) -> dict:
    """Warm every adapter up, then the timed burst with the CPU use of each process by role."""
    started = time.perf_counter()
    asyncio.run(http_run(url, work.warmup, len(work.warmup)))
    warmup_s = round(time.perf_counter() - started, 1)
    sampler = CpuSampler()
    sampler.start()
    served = http_run_procs(pool, url, work.measured, opts.concurrency)
    return {"warmup_s": warmup_s, "served": served, "cpu_percent": sampler.stop()}


@dataclass(frozen=True)
class Workload:
    """The requests of a run, each set drawn with its own seed, so that no prompt repeats one
    measured before it (the prefix cache would find it) beyond `--shared-prefix-tokens`."""
    measured: list  # the timed burst at --concurrency
    sequential: list  # sent one at a time
    warmup: list  # one short request per adapter: each fetched and loaded before the clock runs
    burst: list  # fired at once, short outputs

    @classmethod
    def draw(cls, opts, vocab_size: int, base: str) -> "Workload":
        def jobs(count: int, max_tokens: int, seed: int) -> list:
            return make_jobs(count, opts.tenants, opts.adapters, opts.prompt_tokens, max_tokens, vocab_size,
                             seed, opts.shared_prefix_tokens, base)
        warmup = [replace(job, index=-1 - job.index) for job in jobs(max(1, opts.adapters), 2, opts.seed + 3)]
        return cls(jobs(opts.requests, opts.max_tokens, opts.seed), jobs(opts.sequential, opts.max_tokens,
                                                                          opts.seed + 2),
                   warmup, jobs(opts.burst, opts.burst_tokens, opts.seed + 1))


def run_direct(args, opts, work: Workload, infos) -> dict:
    import torch

    from adapter_store import DiskCache
    from engine import AsyncLLMEngine

    torch.set_num_threads(opts.threads)
    wait_for_free_gpu()
    # the served replica's disk cache already holds every adapter: a hit, no copy
    cache = DiskCache(args.cache_path("adapter-cache"), args.disk_cache_bytes)
    store = args.open_store()
    dirs = {name: cache.fetch(store, info) for name, info in infos.items()}
    engine = AsyncLLMEngine(args.engine_config(args_model_dir(args)))
    try:
        asyncio.run(direct_run(engine, dirs, work.warmup, len(work.warmup), "warm"))
        return {"direct": asyncio.run(direct_run(engine, dirs, work.measured, opts.concurrency, "burst")),
                "direct_sequential": asyncio.run(direct_run(engine, dirs, work.sequential,
                                                            1, "seq"))}
    finally:
        engine.shutdown()


def wait_for_free_gpu(timeout_s: float = 120.0, share: float = 0.9) -> None:
    """Until the served run's processes have given the GPU's memory back (a process ends
    some seconds after it is killed); the direct engine sizes its KV cache from what is free."""
    import torch

    if not torch.cuda.is_available():
        return
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        free, total = torch.cuda.mem_get_info()
        if free >= share * total:
            break
        time.sleep(0.5)
    print(f"GPU memory free {free / 2**30:.1f} of {total / 2**30:.1f} GiB after "
          f"{time.perf_counter() - started:.1f} s", flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, str]:
    """moto_server on a free loopback port with bucket `adapters`; returns (process, endpoint)."""
    import boto3
    for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)  # Ray's local workers inherit these
    url = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             url.rsplit(":", 1)[1]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="adapters")
            return proc, url
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"moto_server did not come up on {url}")


ROWS = ("served", "direct", "served_sequential", "direct_sequential", "burst")
COLUMNS = ("requests_ok", "errors", "tokens", "wall_s", "tokens_per_s", "ttft_p50_ms",
           "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def print_table(results: dict) -> None:
    rows = [("part", "ok", "errors", "tokens", "wall s", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
             "TPOT p50 ms", "TPOT p99 ms")]
    rows += [(name, *(results[name][c] for c in COLUMNS)) for name in ROWS if name in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    print(f"served / direct output tok/s: {results['served_over_direct']}; CPU % of a core by "
          f"process during the served burst: {results['cpu_percent']}")
    for v in results["variants"]:
        r = v["served"]
        print(f"variant {json.dumps(v['overrides'])}: {r['tokens_per_s']} tok/s = "
              f"{v['served_over_direct']}x direct, TTFT p50 {r['ttft_p50_ms']} ms, TPOT p50 "
              f"{r['tpot_p50_ms']} ms, errors {r['errors']}, CPU {v['cpu_percent']}")
    for key, what in (("greedy_equality", "burst"), ("greedy_equality_sequential", "one at a time")):
        g = results[key]
        print(f"greedy equality served vs direct, {what}: {g['equal']}/{g['compared']} equal, "
              f"{g['mismatches']} mismatched, {g['served_ids_missing']} without ids")
    a = results["adapters"]
    print(f"serve start-up {results['serve_startup_s']} s; {results['config']['adapters']} adapters "
          f"of {a['bytes_each'] / 1e9:.2f} GB: generated in {a['generate_s']} s, into the store "
          f"via {a['via']} in {a['store_s']} s")


def main(argv=None) -> int:
    opts = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="moeplex-bench-"))
    extra, moto = {}, None
    if opts.s3:
        moto, url = start_s3()
        extra.update(store="s3://adapters/bench", store_endpoint_url=url, store_region="us-east-1")
    try:
        return _run(opts, workdir, extra, argv if argv is not None else sys.argv)
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(opts, workdir: Path, extra: dict, argv) -> int:
    args = app_args(opts, workdir, dict(extra), 0)
    config = model_config(args, args_model_dir(args))
    each = adapter_bytes(config, opts.rank)
    args = app_args(opts, workdir, dict(extra), each * opts.adapters)
    work = Workload.draw(opts, config["vocab_size"], args.model_name())
    # Big adapters go into the store before Serve starts, while the GPU is still free to
    # draw their random values.
    stored = None if upload_over_http(opts, config) else put_adapters(args, None, opts, config, workdir)
    served = run_served(args, opts, work, config, workdir, stored)
    direct = run_direct(args, opts, work, served["infos"])
    runs: dict[str, Run] = {k: v for k, v in {**served, **direct}.items() if isinstance(v, Run)}
    results = {"provenance": provenance(list(argv)),
               "config": {**vars(opts), "store": args.store_uri(),
                          "model_layers": config.get("num_hidden_layers"),
                          # what run_served's Ray instance started with (set_ray_env_defaults)
                          "ray_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}},
               "serve_startup_s": served["startup_s"], "warmup_s": served["warmup_s"],
               "adapters": {**served["adapters"], "bytes_each": each},
               **{name: run.summary() for name, run in runs.items()},
               "cpu_percent": served["cpu_percent"],
               "variants": [{"overrides": v["overrides"], "startup_s": v["startup_s"],
                             "served": v["served"].summary(), "cpu_percent": v["cpu_percent"],
                             "greedy_equality": greedy_equality(v["served"], runs["direct"])}
                            for v in served["variants"]],
               "greedy_equality": greedy_equality(runs["served"], runs["direct"]),
               # one request at a time: the same batch shapes on both paths, so bitwise equal
               "greedy_equality_sequential": greedy_equality(runs["served_sequential"],
                                                             runs["direct_sequential"])}
    direct_rate = max(results["direct"]["tokens_per_s"], 1e-9)
    results["served_over_direct"] = round(results["served"]["tokens_per_s"] / direct_rate, 3)
    for v in results["variants"]:
        v["served_over_direct"] = round(v["served"]["tokens_per_s"] / direct_rate, 3)
    write_results(results, opts.out, "bench_serve")
    print_table(results)
    errors = sum(run.errors for run in runs.values()) + sum(v["served"].errors for v in served["variants"])
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
