"""CPU per request and per stream message of Serve's hops, by transport (no model, no GPU).

    python benchmarks/bench_serve_transport.py [--requests 400] [--concurrency 32]

The served path's host cost is Serve's: each stream message crosses the HTTP proxy and the
ingress once, and the ingress -> engine-replica hop once. This app has the same shape with no
engine: `Front` (FastAPI, streaming SSE, as the ingress) streams what `Back` (as the engine
replica) yields, `--chunks` messages a request. Each configuration runs in a fresh Ray instance
(the proxy reads its transport from the environment when it starts); the CPU seconds of the proxy,
Front and Back over the timed requests, divided by their number, give ms per request, and the
difference between a 1-message and an N-message run gives ms per message.

Configurations: `ray` = Ray object references on both hops (Serve's default), `grpc` = Serve's
gRPC transport on both (`RAY_SERVE_PROXY_USE_GRPC=1` and `_by_reference=False` with plain
pickle, what moeplex sets), `haproxy` = `grpc` behind Serve's HAProxy mode
(`RAY_SERVE_ENABLE_HA_PROXY=1`: the bundled haproxy forwards HTTP to the ingress replicas'
own servers, no Python proxy on the path). Prints a table and writes JSON with provenance.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.bench_serve_transport
    from provenance import provenance, write_results
except ImportError:
    from benchmarks.provenance import provenance, write_results

CONFIGS = {"ray": {"RAY_SERVE_PROXY_USE_GRPC": "0"}, "grpc": {"RAY_SERVE_PROXY_USE_GRPC": "1"},
           "haproxy": {"RAY_SERVE_PROXY_USE_GRPC": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}}
ROLES = (("HAProxyManager", "haproxy manager"), ("bin/haproxy", "haproxy"),
         ("ProxyActor", "proxy"), ("ServeReplica:transport:Front", "front"),
         ("ServeReplica:transport:Back", "back"))


def build_app(chunks: int, gap_s: float, grpc: bool):
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=512)
    class Back:
        async def generate(self, request: dict):
            for i in range(chunks):
                await asyncio.sleep(gap_s)
                yield {"text": " word" * 8, "token_ids": list(range(8)), "i": i}

    @serve.deployment(max_ongoing_requests=512)
    @serve.ingress(api)
    class Front:
        def __init__(self, back):
            if grpc:
                back = back.options(_by_reference=False, request_serialization="pickle",
                                    response_serialization="pickle")
            self._back = back

        @api.post("/gen")
        async def gen(self, body: dict):
            items = self._back.options(stream=True).generate.remote(body)

            async def events():
                async for item in items:
                    yield "data: " + json.dumps(item) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

    return Front.bind(Back.bind())


async def _clients(url: str, requests: int, concurrency: int) -> None:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one():
            async with gate:
                async with c.stream("POST", url + "/gen", json={"prompt": [1, 2, 3]}) as r:
                    r.raise_for_status()
                    async for _ in r.aiter_lines():
                        pass
        await asyncio.gather(*(one() for _ in range(requests)))


def _cpu_by_role() -> dict[str, float]:
    import psutil

    out = {role: 0.0 for _, role in ROLES}
    for proc in psutil.process_iter():
        try:
            line = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except Exception:  # noqa: BLE001 - gone, or not ours to read
            continue
        for needle, role in ROLES:
            if needle in line:
                out[role] += times.user + times.system
    return out


def run_one(config: str, chunks: int, requests: int, concurrency: int, gap_s: float) -> dict:
    """One configuration in this process (its environment already set): ms CPU per request."""
    import socket

    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(include_dashboard=False, num_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(chunks, gap_s, config != "ray"), name="transport", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_clients(url, 2 * concurrency, concurrency))  # warm every connection and path
        before, started = _cpu_by_role(), time.perf_counter()
        asyncio.run(_clients(url, requests, concurrency))
        wall = time.perf_counter() - started
        after = _cpu_by_role()
        return {"config": config, "chunks": chunks, "requests": requests, "wall_s": round(wall, 2),
                "ms_per_request": {r: round(1e3 * (after[r] - before[r]) / requests, 3) for r in after}}
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--chunks", type=int, default=20, help="stream messages a request (and 1)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="between two messages of a stream")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: config,chunks
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    if opts.one:
        config, chunks = opts.one.split(",")
        print(json.dumps(run_one(config, int(chunks), opts.requests, opts.concurrency,
                                 opts.gap_ms / 1e3)))
        return 0
    runs = []
    for config in opts.configs:
        for chunks in (1, opts.chunks):
            env = {**os.environ, **CONFIGS[config], "RAY_AUTH_MODE": "disabled"}
            done = subprocess.run([sys.executable, __file__, "--one", f"{config},{chunks}",
                                   "--requests", str(opts.requests), "--concurrency",
                                   str(opts.concurrency), "--gap-ms", str(opts.gap_ms)],
                                  env=env, capture_output=True, text=True, timeout=600)
            lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
            if done.returncode != 0 or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append(json.loads(lines[-1]))
    table = []
    for config in opts.configs:
        one, many = (next(r for r in runs if r["config"] == config and r["chunks"] == c)
                     for c in (1, opts.chunks))
        per_message = {role: round((many["ms_per_request"][role] - one["ms_per_request"][role])
                                   / (opts.chunks - 1), 3) for role in one["ms_per_request"]}
        table.append({"config": config, "ms_per_request_1_message": one["ms_per_request"],
                      "ms_per_message": per_message})
    results = {"provenance": provenance(list(argv if argv is not None else sys.argv)),
               "config": vars(opts), "runs": runs, "table": table}
    write_results(results, opts.out, "bench_serve_transport")
    print("config  role   ms CPU per request (1 message)  ms CPU per extra message")
    for row in table:
        for role in row["ms_per_message"]:
            print(f"{row['config']:6}  {role:5}  {row['ms_per_request_1_message'][role]:30.3f}"
                  f"  {row['ms_per_message'][role]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
