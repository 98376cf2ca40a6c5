"""Serve path benchmark: N streaming clients over M tenants through HTTP vs the engine alone.

    .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--concurrency 32] \
        [--tenants 8] [--adapters 4] [--max-tokens 16] [--replicas 1] [--resolve-ttl S] [--s3] \
        [--out bench_serve.json]

Starts Ray and the moeplex app on loopback (development mode, local adapter store or, with
--s3, a moto S3 server it starts on loopback, the
embedded tiny checkpoint unless --model), uploads `--adapters` PEFT adapters over HTTP as
an operator tenant and shares them, then fires a burst of `--requests` streaming
completions from `--concurrency` concurrent clients; request i comes from tenant i % M
and uses adapter i % A. It records the time to first token, completion tokens (usage)
and errors. The same burst then goes straight into an AsyncLLMEngine in this process
(no Ray, no HTTP), so the difference is the overhead of the HTTP + Serve path.
Prints a table last and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["The quick brown fox", "Tenants upload LoRA adapters", "Mixture of experts models",
           "Hello world! How are you today?", "def main(): return 42"]


@dataclass
class Burst:
    """What one burst measured (seconds; TTFT per request that produced a token)."""

    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        ttft = sorted(self.ttft)
        return {"requests_ok": len(ttft), "errors": self.errors, "tokens": self.tokens,
                "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else 0.0,
                "ttft_p50_ms": round(1e3 * _quantile(ttft, 0.50), 1),
                "ttft_p99_ms": round(1e3 * _quantile(ttft, 0.99), 1),
                "error_samples": self.error_samples[:5]}

    def fail(self, message: str) -> None:
        self.errors += 1
        self.error_samples.append(message[:200])


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def plan(num_requests: int, num_tenants: int, num_adapters: int) -> list[tuple[str, str, str]]:
    """(tenant, adapter, prompt) of each request of the burst."""
    return [(f"tenant{i % num_tenants}", f"adapter{i % num_adapters}", PROMPTS[i % len(PROMPTS)])
            for i in range(num_requests)]


async def _http_request(client: httpx.AsyncClient, url: str, job, max_tokens: int, burst: Burst):
    tenant, adapter, prompt = job
    body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started, first = time.perf_counter(), None
    async with client.stream("POST", f"{url}/v1/completions", json=body,
                             headers={"X-Tenant-Id": tenant}) as response:
        if response.status_code != 200:
            burst.fail(f"{response.status_code}: {(await response.aread()).decode()}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                burst.fail(json.dumps(chunk["error"]))
                return
            # The first chunk carries the first token (its text may be empty while the
            # detokenizer holds an incomplete UTF-8 sequence, as with the tiny model).
            if first is None and chunk.get("choices"):
                first = time.perf_counter()
            if chunk.get("usage"):
                burst.tokens += chunk["usage"]["completion_tokens"]
    if first is not None:
        burst.ttft.append(first - started)


async def _run_pool(jobs, concurrency: int, one) -> float:
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker():
        while not queue.empty():
            await one(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def http_burst(url: str, jobs, concurrency: int, max_tokens: int) -> Burst:
    burst = Burst()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(job):
            try:
                await _http_request(client, url, job, max_tokens, burst)
            except Exception as exc:  # noqa: BLE001 - counted, not fatal
                burst.fail(f"{type(exc).__name__}: {exc}")
        burst.wall_s = await _run_pool(jobs, concurrency, one)
    return burst


async def direct_burst(engine, adapter_dirs: dict, jobs, concurrency: int,
                       max_tokens: int) -> Burst:
    from engine import LoRARequest, SamplingParams

    burst, counter = Burst(), iter(range(10 ** 9))

    async def one(job):
        _, adapter, prompt = job
        lora = LoRARequest(lora_name=f"ops/{adapter}", lora_path=str(adapter_dirs[adapter]))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        started, first = time.perf_counter(), None
        try:
            async for out in engine.generate(prompt, params, request_id=f"d{next(counter)}",
                                             lora=lora):
                if first is None and out.token_ids_delta:
                    first = time.perf_counter()
                if out.finished:
                    burst.tokens += out.num_output_tokens
        except Exception as exc:  # noqa: BLE001
            burst.fail(f"{type(exc).__name__}: {exc}")
            return
        if first is not None:
            burst.ttft.append(first - started)

    burst.wall_s = await _run_pool(jobs, concurrency, one)
    return burst


def make_adapters(model_dir: Path, out: Path, count: int) -> dict[str, Path]:
    from engine.testing import make_peft_adapter

    return {f"adapter{i}": make_peft_adapter(model_dir, out / f"adapter{i}", rank=8, seed=i + 1)
            for i in range(count)}


def upload_and_share(url: str, args, adapter_dirs: dict[str, Path]) -> None:
    """Upload every adapter as the operator tenant `ops`, then share it with all tenants."""
    store = args.open_store()
    for name, path in adapter_dirs.items():
        files = [("files", (f, (path / f).read_bytes()))
                 for f in ("adapter_config.json", "adapter_model.safetensors")]
        response = httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files,
                              headers={"X-Tenant-Id": "ops"}, timeout=120)
        response.raise_for_status()
        store.share("ops", name)


def run_served(args, adapter_dirs, jobs, opts) -> tuple[Burst, Burst, float]:
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(include_dashboard=False, num_cpus=max(4, os.cpu_count() or 1),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(opts.threads)}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        serve.run(build_app(args), name="moeplex-bench", route_prefix="/")
        startup_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}"
        upload_and_share(url, args, adapter_dirs)
        warm = plan(len(adapter_dirs), opts.tenants, len(adapter_dirs))
        asyncio.run(http_burst(url, warm, len(warm), opts.max_tokens))
        burst = asyncio.run(http_burst(url, jobs, opts.concurrency, opts.max_tokens))
        alone = asyncio.run(http_burst(url, jobs[:opts.sequential], 1, opts.max_tokens))
        return burst, alone, startup_s
    finally:
        serve.shutdown()
        ray.shutdown()


def run_direct(args, model_dir, adapter_dirs, jobs, opts) -> tuple[Burst, Burst]:
    import torch

    from engine import AsyncLLMEngine

    torch.set_num_threads(opts.threads)
    engine = AsyncLLMEngine(args.engine_config(model_dir))
    try:
        warm = plan(len(adapter_dirs), opts.tenants, len(adapter_dirs))
        asyncio.run(direct_burst(engine, adapter_dirs, warm, len(warm), opts.max_tokens))
        burst = asyncio.run(direct_burst(engine, adapter_dirs, jobs, opts.concurrency,
                                         opts.max_tokens))
        alone = asyncio.run(direct_burst(engine, adapter_dirs, jobs[:opts.sequential], 1,
                                         opts.max_tokens))
        return burst, alone
    finally:
        engine.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--sequential", type=int, default=20,
                        help="requests sent one at a time after the burst (latency overhead)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--model", default=None, help="checkpoint dir (default: tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolve-ttl", type=float, default=None,
                        help="AppArgs.adapter_resolve_ttl_s (0: the ingress resolves on every request)")
    parser.add_argument("--s3", action="store_true",
                        help="adapter store on a moto S3 server this run starts on loopback")
    parser.add_argument("--out", default="bench_serve.json")
    return parser.parse_args(argv)


def start_s3() -> tuple[subprocess.Popen, str]:
    """moto_server on a free loopback port with bucket `adapters`; returns (process, endpoint)."""
    import boto3
    for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)  # Ray's local workers inherit these
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="adapters")
            return proc, url
        except Exception:  # not listening yet
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"moto_server did not come up on {url}")


def print_table(results: dict) -> None:
    rows = [("path (requests, concurrency)", "ok", "errors", "tokens", "wall s", "tok/s", "TTFT p50 ms", "TTFT p99 ms")]
    for name in ("served", "direct", "served_sequential", "direct_sequential"):
        r = results[name]
        rows.append((name, r["requests_ok"], r["errors"], r["tokens"], r["wall_s"],
                     r["tokens_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    o = results["overhead"]
    print(f"overhead of HTTP + Serve: burst TTFT p50 +{o['ttft_p50_ms']} ms, throughput "
          f"x{o['throughput_ratio']} of the engine alone; one request at a time: TTFT p50 "
          f"+{o['sequential_ttft_p50_ms']} ms")


def main(argv=None) -> int:
    opts = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="moeplex-bench-"))
    extra, moto = {}, None
    if opts.resolve_ttl is not None:
        extra["adapter_resolve_ttl_s"] = opts.resolve_ttl
    if opts.s3:
        moto, url = start_s3()
        extra.update(store="s3://adapters/bench", store_endpoint_url=url, store_region="us-east-1")
    try:
        return _run(opts, workdir, extra)
    finally:
        if moto is not None:
            moto.terminate()


def _run(opts, workdir: Path, extra: dict) -> int:
    from deployments.args import AppArgs
    from deployments.model_files import ensure_model

    args = AppArgs(model=opts.model, cache_dir=str(workdir / "cache"), device=opts.device,
                   num_replicas=opts.replicas, max_loras=max(4, opts.adapters),
                   max_concurrent_requests_per_tenant=max(32, opts.concurrency), **extra)
    model_dir = ensure_model(args)
    adapter_dirs = make_adapters(model_dir, workdir / "adapters", opts.adapters)
    jobs = plan(opts.requests, opts.tenants, opts.adapters)
    served, served_alone, startup_s = run_served(args, adapter_dirs, jobs, opts)
    direct, direct_alone = run_direct(args, model_dir, adapter_dirs, jobs, opts)
    results = {"config": {**vars(opts), "model_dir": str(model_dir), "store": args.store_uri(),
                          "adapter_resolve_ttl_s": args.adapter_resolve_ttl_s},
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "serve_startup_s": round(startup_s, 1),
               "served": served.summary(), "direct": direct.summary(),
               "served_sequential": served_alone.summary(),
               "direct_sequential": direct_alone.summary()}
    results["overhead"] = {
        "sequential_ttft_p50_ms": round(results["served_sequential"]["ttft_p50_ms"]
                                        - results["direct_sequential"]["ttft_p50_ms"], 1),
        "ttft_p50_ms": round(results["served"]["ttft_p50_ms"] - results["direct"]["ttft_p50_ms"], 1),
        "throughput_ratio": round(results["served"]["tokens_per_s"]
                                  / max(results["direct"]["tokens_per_s"], 1e-9), 3)}
    Path(opts.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    errors = served.errors + direct.errors + served_alone.errors + direct_alone.errors
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
