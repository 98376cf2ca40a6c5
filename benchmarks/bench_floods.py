"""One tenant floods the service: another tenant's latency, and the front processes' memory.

    .venv/bin/python benchmarks/bench_floods.py [--floods pattern_uploads big_prompts ...] [--out F]

The floods are those a red team sent (issue 16's list), against the moeplex app on loopback
(tiny random Qwen3-MoE on the CPU, one engine replica, 4 adapter slots, api-key mode, a local
store, uploads allowed up to 512 MiB as a production model's adapters need):

| flood | what the `hog` tenant sends |
|---|---|
| `pattern_uploads` | 8 uploads at once, each config with 3000 rank_pattern keys (42 KiB) |
| `big_prompts` | 8 completions at once, each with a 1 MB prompt |
| `chunked_bodies` | 3 uploads at once, each a 700 MiB chunked body (no Content-Length) |
| `big_header` | 1 upload whose weights declare a 95 MiB safetensors header |
| `slot_hog` | 24 long streams (200 tokens) over 12 of its adapters, again and again |
| `base_hog` | the same streams on the base model: what sharing the batch and the host costs |

While a flood runs (in a separate process, started and importing before the clock starts, so
its client work does not hold this one's GIL),
the `victim` tenant sends one 8-token completion at a time on its own adapter; its p99 latency
is compared with its p99 before any flood. The resident memory of the Serve proxy and the
ingress replica (and HAProxy, where Serve runs it) is sampled every 0.2 s: idle before the
flood, the peak during it, and what is left `--settle-s` after it. Target (issue 16): victim
p99 within 2x of unloaded, proxy and ingress peaks within +200 MB of idle and given back.
Prints a table last and writes JSON with provenance.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deployments.server_timing import parse as parse_server_timing

try:  # run as a script (benchmarks/ is sys.path[0]) or imported as benchmarks.bench_floods
    from provenance import provenance, write_results
    from serve_clients import quantile
except ImportError:
    from benchmarks.provenance import provenance, write_results
    from benchmarks.serve_clients import quantile

FLOODS = ("pattern_uploads", "big_prompts", "chunked_bodies", "big_header", "slot_hog", "base_hog")
KEYS = {"victim": "sk-victim-bench", "hog": "sk-hog-bench"}
BASE = "tiny-moe"
HOG_ADAPTERS = 12
UPLOAD_LIMIT = 512 << 20
ROLES = (("ProxyActor", "proxy"), ("Ingress", "ingress"), ("haproxy", "haproxy"))
MiB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floods", nargs="+", choices=FLOODS, default=list(FLOODS))
    parser.add_argument("--baseline-probes", type=int, default=40)
    parser.add_argument("--min-probes", type=int, default=10, help="victim requests per flood, "
                        "at least (more while the flood lasts)")
    parser.add_argument("--victim-prompt-chars", type=int, default=0, metavar="N",
                        help="the victim's prompt repeated to N characters (past 2048 it is tokenised on "
                        "the long-input threads the big prompts use; with the tiny model's tokenizer a "
                        "character is about 0.6 tokens: raise max_model_len with --app-args)")
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--slot-hog-s", type=float, default=20.0)
    parser.add_argument("--device", default="cpu", help="the engine replica's device: on cuda a step "
                        "costs about the same at any batch, so the victim's latency shows the "
                        "scheduler and the front, not CPU compute shared with the flood")
    parser.add_argument("--model", default=None, help="the served model instead of the tiny random "
                        "one, e.g. dummy:qwen3-30b-a3b (adapters of rank 16 on every target drawn "
                        "at its shapes, benchmarks/serve_adapters.py): on a GPU a step then costs "
                        "what a real model's does, not the host's per-token work")
    parser.add_argument("--hf-overrides", default=None, help='JSON for --model, e.g. \'{"num_hidden_layers": 8}\'')
    parser.add_argument("--app-args", nargs="*", default=[], metavar="KEY=VALUE",
                        help="AppArgs fields over the benchmark's (e.g. max_adapters_per_replica=64)")
    parser.add_argument("--py-spy", default=None, metavar="DIR", help="sample the ingress replicas, the "
                        "engine replica and its engine core with py-spy (on PATH) through each flood: "
                        "DIR/<flood>_<role>_<pid>.txt, collapsed stacks of the threads on a CPU "
                        "(benchmarks/spy_summary.py reads them)")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


# ---- the floods (each runs in its own process) --------------------------------------------

def _headers(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def _multipart(fields: dict[str, str], files: list[tuple[str, bytes | None]], boundary: str,
               big_file_bytes: int = 0):
    """A multipart/form-data body as a generator: fields, then files; a file whose bytes are
    None is `big_file_bytes` of zeros sent 1 MiB at a time (the body is never whole in memory)."""
    def gen():
        for name, value in fields.items():
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   f"{value}\r\n").encode()
        for filename, data in files:
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                   f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
            if data is not None:
                yield data
            else:
                chunk, left = bytes(MiB), big_file_bytes
                while left > 0:
                    yield chunk[:min(MiB, left)]
                    left -= MiB
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()
    return gen()


def _post_upload(url: str, name: str, config: bytes, weights: bytes | None, big: int = 0) -> str:
    import httpx

    boundary = "moeplexflood"
    body = _multipart({"name": name}, [("adapter_config.json", config),
                                       ("adapter_model.safetensors", weights)], boundary, big)
    headers = {**_headers("hog"), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    try:
        return str(httpx.post(f"{url}/v1/adapters", headers=headers, content=body,
                              timeout=300).status_code)
    except httpx.HTTPError as exc:  # the server may answer 413 and close while we still send
        return type(exc).__name__


def _in_threads(count: int, fn) -> list[str]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: fn(i), range(count)))


def flood_pattern_uploads(url: str, adapter_dir: str, _opts) -> list[str]:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    config["rank_pattern"] = {f"model.layers.{i}.nomatch_{i}": 2 for i in range(3000)}
    raw = json.dumps(config).encode()
    weights = (Path(adapter_dir) / "adapter_model.safetensors").read_bytes()
    return _in_threads(8, lambda i: _post_upload(url, f"patterns-{i}", raw, weights))


def flood_big_prompts(url: str, _adapter_dir: str, _opts) -> list[str]:
    import httpx

    prompt = "hello world " * (MiB // 12)

    def one(_i):
        try:
            return str(httpx.post(f"{url}/v1/completions", headers=_headers("hog"), timeout=300,
                                  json={"model": BASE, "prompt": prompt, "max_tokens": 8}).status_code)
        except httpx.HTTPError as exc:
            return type(exc).__name__
    return _in_threads(8, one)


def flood_chunked_bodies(url: str, adapter_dir: str, _opts) -> list[str]:
    config = (Path(adapter_dir) / "adapter_config.json").read_bytes()
    return _in_threads(3, lambda i: _post_upload(url, f"chunked-{i}", config, None, 700 * MiB))


def flood_big_header(url: str, adapter_dir: str, _opts) -> list[str]:
    config = (Path(adapter_dir) / "adapter_config.json").read_bytes()
    size = 95 * MiB
    header = b'{"__metadata__":{"pad":"' + b"a" * (size - 27) + b'"}}'
    weights = struct.pack("<Q", len(header)) + header
    return [_post_upload(url, "big-header", config, weights)]


def flood_slot_hog(url: str, _adapter_dir: str, opts, base: bool = False) -> list[str]:
    import httpx

    deadline = time.monotonic() + opts.slot_hog_s

    def one(i):
        statuses = []
        while time.monotonic() < deadline:
            body = {"model": BASE if base else f"hog-{i % HOG_ADAPTERS}", "prompt": "tell me a long story",
                    "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", headers=_headers("hog"),
                                  json=body, timeout=300) as response:
                    for _ in response.iter_lines():
                        pass
                    statuses.append(str(response.status_code))
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)
        return ",".join(statuses)
    return [s for joined in _in_threads(24, one) for s in joined.split(",") if s]


def flood_base_hog(url: str, adapter_dir: str, opts) -> list[str]:
    return flood_slot_hog(url, adapter_dir, opts, base=True)


def _flood_main(name: str, url: str, adapter_dir: str, opts, queue, go) -> None:
    import httpx  # noqa: F401 - imported before the start signal, not on the victim's clock

    queue.put("ready")
    go.wait()
    started = time.perf_counter()
    statuses = globals()[f"flood_{name}"](url, adapter_dir, opts)
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    queue.put({"statuses": counts, "wall_s": round(time.perf_counter() - started, 2)})


# ---- measuring -----------------------------------------------------------------------------

class MemorySampler:
    """RSS in MB of the front processes by role, every `period_s`, in a thread."""

    def __init__(self, period_s: float = 0.2):
        import psutil
        self._psutil, self._period = psutil, period_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> dict[str, float]:
        rss: dict[str, float] = {}
        for proc in self._psutil.process_iter():
            try:
                line = " ".join(proc.cmdline()) or proc.name()
                role = next((r for needle, r in ROLES if needle in line), None)
                if role is not None:
                    rss[role] = rss.get(role, 0.0) + proc.memory_info().rss / MiB
            except Exception:  # noqa: BLE001 - gone, or not ours to read
                continue
        return rss

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.current()))
            time.sleep(self._period)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def peak(self, since: float, until: float) -> dict[str, float]:
        peak: dict[str, float] = {}
        for t, rss in self.samples:
            if since <= t <= until:
                for role, mb in rss.items():
                    peak[role] = max(peak.get(role, 0.0), mb)
        return peak


SLOWEST_KEPT = 8


VICTIM_PROMPT = "the quiet tenant asks"


def probe(client, url: str, phases: list | None = None) -> float:
    """One victim request (8 tokens on its adapter): seconds, or raises on a non-200. Its
    Server-Timing phases (ms; `front`: the client's time less the ingress's `total`, i.e. the
    proxy and reading the body) go to `phases`."""
    started = time.perf_counter()
    response = client.post(f"{url}/v1/completions", headers=_headers("victim"), json={
        "model": "style", "prompt": VICTIM_PROMPT, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"victim request: {response.status_code} {response.text[:200]}")
    if phases is not None:
        timing = parse_server_timing(response.headers.get("server-timing", ""))
        if "total" in timing:
            timing["front"] = round(1e3 * seconds - timing["total"], 1)
        phases.append(timing)
    return seconds


def phase_quantiles(phases: list[dict]) -> dict:
    """p50 / p99 / max ms of each Server-Timing phase over the victim's requests."""
    names = sorted({name for p in phases for name in p})
    out = {}
    for name in names:
        values = sorted(p[name] for p in phases if name in p)
        out[name] = [round(quantile(values, 0.5), 1), round(quantile(values, 0.99), 1), values[-1]]
    return out


def latency(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "p50_ms": round(1e3 * quantile(ordered, 0.5), 1),
            "p99_ms": round(1e3 * quantile(ordered, 0.99), 1),
            "max_ms": round(1e3 * ordered[-1], 1) if ordered else None}


def run_flood(name: str, url: str, adapter_dir: Path, opts, client, sampler: MemorySampler,
              baseline_p99_ms: float) -> dict:
    spawn = multiprocessing.get_context("spawn")
    queue, go = spawn.Queue(), spawn.Event()
    proc = spawn.Process(target=_flood_main, args=(name, url, str(adapter_dir), opts, queue, go))
    proc.start()
    if queue.get(timeout=120) != "ready":  # the process's start-up is no part of the flood
        raise RuntimeError(f"flood {name} did not start")
    time.sleep(1.0)
    idle = sampler.current()
    counters_before = engine_counters(client, url)
    spies = start_py_spy(opts.py_spy, name, opts.slot_hog_s) if opts.py_spy else []
    started = time.monotonic()
    go.set()
    times, errors, sent_at, phases = [], [], [], []
    while proc.is_alive() or len(times) + len(errors) < opts.min_probes:
        sent = time.monotonic() - started
        try:
            times.append(probe(client, url, phases))
            sent_at.append(sent)
        except Exception as exc:  # noqa: BLE001 - counted, and the first few kept
            errors.append(str(exc)[:200])
    ended = time.monotonic()
    proc.join()
    for spy in spies:
        spy.wait(timeout=60)
    counters_after = engine_counters(client, url)
    flood = queue.get(timeout=10) if not queue.empty() else {"statuses": {}, "wall_s": None}
    time.sleep(opts.settle_s)
    after, peak = sampler.current(), sampler.peak(started, ended)
    victim = latency(times)
    # when the slowest requests were sent (s after the flood's go): a tail at the flood's start is
    # its first loads, one spread over it is its steady state
    # and where their time went (Server-Timing phases, ms: deployments/server_timing.py)
    slowest = sorted(zip(times, sent_at, phases), key=lambda r: r[0], reverse=True)[:SLOWEST_KEPT]
    victim.update(errors=len(errors), error_samples=errors[:3],
                  p99_over_unloaded=round(victim["p99_ms"] / baseline_p99_ms, 2),
                  slowest=[{"ms": round(1e3 * t, 1), "sent_s": round(at, 2), "phases": p}
                           for t, at, p in slowest],
                  phases_p50_p99_max_ms=phase_quantiles(phases))
    memory = {role: {"idle_mb": round(idle.get(role, 0.0)), "peak_mb": round(peak.get(role, 0.0)),
                     "after_mb": round(after.get(role, 0.0)),
                     "peak_over_idle_mb": round(peak.get(role, 0.0) - idle.get(role, 0.0))}
              for role in sorted(set(idle) | set(peak))}
    delta = lambda key: counters_after[key] - counters_before[key]  # noqa: E731
    engine = {"gc_collections": delta("gc_collections"), "gc_pause_ms": round(1e3 * delta("gc_pause_seconds"), 1),
              "gc_longest_pause_ms_so_far": round(1e3 * counters_after["gc_longest_pause_seconds"], 1),
              # the engine loop's turns over engine.turns.SLOW_TURN_S (each in the replica's log)
              "slow_turns": delta("slow_turns"),
              "longest_turn_ms_so_far": round(1e3 * counters_after["longest_turn_seconds"], 1),
              # the engine replica's event loop, which streams every request: a `route` tail
              # that lines up with lags here is the replica's loop, else the ingress's or Serve's
              "replica_loop_lags_over_100ms": delta("replica_loop_lags_over_100ms"),
              "replica_loop_longest_lag_ms_so_far": round(1e3 * counters_after["replica_loop_longest_lag_seconds"], 1),
              **{name: round(delta(key), 3) for key, name in SLOT_COUNTERS.items()}}
    return {"flood": flood, "victim": victim, "memory": memory, "engine": engine}


# processes py-spy samples (--py-spy), by a needle of their command line (Serve names its replicas'
# processes); the engine core is the engine replica's child
SPY_ROLES = (("ServeReplica:moeplex:Ingress", "ingress"), ("ServeReplica:moeplex:LLMServer", "replica"))


def py_spy_targets() -> list[tuple[str, int]]:
    """(role, pid) of the processes --py-spy samples: each ingress replica, the engine replica and
    its children (the engine core, role "core")."""
    import psutil
    targets = []
    for proc in psutil.process_iter():
        try:
            line = " ".join(proc.cmdline()) or proc.name()
            role = next((r for needle, r in SPY_ROLES if needle in line), None)
            if role is not None:
                targets.append((role, proc.pid))
                if role == "replica":
                    targets += [("core", child.pid) for child in proc.children()]
        except Exception:  # noqa: BLE001 - gone, or not ours to read
            continue
    return targets


def py_spy_binary() -> str:
    """py-spy on PATH or beside this Python (a virtual environment's bin/, not on PATH when run
    as .venv/bin/python)."""
    beside = Path(sys.executable).parent / "py-spy"
    found = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if found is None:
        raise SystemExit("--py-spy needs py-spy: pip install py-spy (benchmarks/gpu_deps.sh installs it)")
    return found


def start_py_spy(out_dir: str, flood: str, seconds: float) -> list:
    """py-spy over the flood's first `seconds` in each target process; the caller waits for them.
    --nonblocking: sampling never stops the process, so it does not add to the latency measured."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    spies, seconds = [], str(max(1, round(seconds)))
    for role, pid in py_spy_targets():
        stem = Path(out_dir) / f"{flood}_{role}_{pid}"
        with open(f"{stem}.log", "w") as log:  # py-spy's own messages (a refused ptrace, say)
            spies.append(subprocess.Popen(
                [py_spy_binary(), "record", "--pid", str(pid), "--duration", seconds, "--rate", "200", "--format",
                 "raw", "--threads", "--nonblocking", "--output", f"{stem}.txt"],
                stdout=log, stderr=subprocess.STDOUT))
    return spies


# engine.stats() key -> its name in a flood's "engine" counters: a victim tail that lines up with
# slot preemptions and loads is the adapter slots', not the serving stack's
# (and with the host tier's page-locking: seconds in the driver, images left pageable)
SLOT_COUNTERS = {"lora_slot_loads": "slot_loads", "lora_slot_preemptions": "slot_preemptions",
                 "lora_evictions": "evictions", "lora_host_loads": "host_loads", "num_preemptions": "preemptions",
                 "lora_host_pin_seconds": "host_pin_seconds", "lora_host_unpinned_images": "host_unpinned_images"}


def engine_counters(client, url: str) -> dict:
    """The engine's garbage-collector and adapter-slot counters from /ready (no key needed; its
    answer may be up to a second old): a tail in the victim's latency that lines up with long
    pauses there is the collector's, not the flood's."""
    stats = client.get(f"{url}/ready", timeout=30).json()["engine"]
    return {key: stats[key] for key in ("gc_collections", "gc_pause_seconds", "gc_longest_pause_seconds",
                                        "slow_turns", "longest_turn_seconds", "replica_loop_lags_over_100ms",
                                        "replica_loop_longest_lag_seconds", *SLOT_COUNTERS)}


def setup_service(workdir: Path, device: str = "cpu", model: str | None = None, hf_overrides: str | None = None,
                  app_args: dict[str, str] | None = None):
    """Ray + Serve on loopback with the app (the engine replica on `device`; the tiny random
    checkpoint, or `model` with `hf_overrides`; AppArgs fields in app_args over the benchmark's);
    returns (url, victim adapter dir)."""
    import httpx
    import ray
    from ray import serve

    from deployments.app import build_app, set_ray_env_defaults
    from deployments.args import AppArgs
    from deployments.auth import hash_key

    keys = workdir / "keys.json"
    keys.write_text(json.dumps({"tenants": {t: {"key_sha256": [hash_key(k)]}
                                            for t, k in KEYS.items()}}))
    names = ["style", *(f"hog-{i}" for i in range(HOG_ADAPTERS))]
    common = dict(served_model_name=BASE, store=str(workdir / "store"), api_keys=str(keys),
                  cache_dir=str(workdir / "cache"), num_replicas=1, device=device, max_model_len=512,
                  max_num_seqs=32, max_loras=4, max_adapter_bytes=UPLOAD_LIMIT, max_adapters_per_tenant=64)
    common.update(app_args or {})
    if model is None:
        from engine.testing import make_peft_adapter, make_tiny_checkpoint
        checkpoint = make_tiny_checkpoint(workdir / "ckpt", "qwen3_moe", seed=0)
        adapters = {name: make_peft_adapter(checkpoint, workdir / name, seed=seed) for seed, name in enumerate(names)}
        args = AppArgs(model=str(checkpoint), **common)
    else:
        import torch

        from deployments.model_files import ensure_model
        from engine.testing import read_config
        try:
            from serve_adapters import RandomAdapterWriter
        except ImportError:
            from benchmarks.serve_adapters import RandomAdapterWriter
        overrides = json.loads(hf_overrides) if hf_overrides else None
        args = AppArgs(model=model, hf_overrides=overrides, **common)
        config = {**read_config(ensure_model(args)), **(overrides or {})}
        writer = RandomAdapterWriter(config, 16)
        adapters = {name: writer.write(workdir / name, seed=seed + 1) for seed, name in enumerate(names)}
        del writer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the engine replica's memory plan reads what is free
    set_ray_env_defaults()
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=str(workdir / "ray"),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="moeplex", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    for name, path in adapters.items():
        tenant = "victim" if name == "style" else "hog"
        files = [("files", (f, (path / f).read_bytes()))
                 for f in ("adapter_config.json", "adapter_model.safetensors")]
        response = httpx.post(f"{url}/v1/adapters", headers=_headers(tenant), data={"name": name},
                              files=files, timeout=600)
        if response.status_code != 201:
            raise RuntimeError(f"upload {name}: {response.status_code} {response.text}")
    return url, adapters["style"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def print_table(results: dict) -> None:
    base = results["baseline"]
    print(f"\nvictim unloaded: p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms (n={base['n']})")
    head = ("flood", "flood statuses", "victim p99 ms", "x unloaded", "victim errors",
            "proxy +MB peak/after", "ingress +MB peak/after", "engine GC ms (collections)",
            "slot loads / preemptions", "engine slow turns")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in results["floods"].items():
        cells = [name, " ".join(f"{k}:{v}" for k, v in sorted(r["flood"]["statuses"].items())),
                 r["victim"]["p99_ms"], r["victim"]["p99_over_unloaded"], r["victim"]["errors"]]
        for role in ("proxy", "ingress"):
            m = r["memory"].get(role)
            cells.append("-" if m is None else f"{m['peak_over_idle_mb']} / {m['after_mb'] - m['idle_mb']}")
        cells.append(f"{r['engine']['gc_pause_ms']} ({r['engine']['gc_collections']})")
        cells.append(f"{r['engine']['slot_loads']} / {r['engine']['slot_preemptions']}")
        cells.append(r["engine"]["slow_turns"])
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for name, r in results["floods"].items():
        for slow in r["victim"]["slowest"][:3]:
            phases = " ".join(f"{k} {v}" for k, v in slow["phases"].items())
            print(f"{name}: {slow['ms']} ms, sent at {slow['sent_s']} s: {phases}")


def main(argv=None) -> int:
    global VICTIM_PROMPT
    opts = parse_args(argv)
    if opts.victim_prompt_chars:
        VICTIM_PROMPT = (f"{VICTIM_PROMPT} " * (opts.victim_prompt_chars // len(VICTIM_PROMPT) + 1))[
            :opts.victim_prompt_chars]
    if opts.py_spy:
        py_spy_binary()  # before minutes of set-up
    # `timeout` (benchmarks/gpu.sh) ends a run with SIGTERM: exit through the finally below, so
    # Serve and its HAProxy go too (a stray one keeps ports 8404 and 9101 from the next start)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="moeplex-floods-"))
    sampler = None
    try:
        import httpx
        import ray
        from ray import serve

        url, victim_adapter = setup_service(workdir, opts.device, opts.model, opts.hf_overrides,
                                              dict(item.split("=", 1) for item in opts.app_args))
        sampler = MemorySampler()
        sampler.start()
        with httpx.Client(timeout=300) as client:
            for _ in range(5):  # warm: the victim's adapter in a slot, compiled paths
                probe(client, url)
            baseline = latency([probe(client, url) for _ in range(opts.baseline_probes)])
            floods = {name: run_flood(name, url, victim_adapter, opts, client, sampler,
                                      baseline["p99_ms"])
                      for name in opts.floods}
        results = {"provenance": provenance(list(argv if argv is not None else sys.argv)),
                   "config": {**vars(opts), "upload_limit_bytes": UPLOAD_LIMIT,
                              "ray_env": {k: v for k, v in os.environ.items()
                                          if k.startswith("RAY_SERVE_")}},
                   "baseline": baseline, "floods": floods}
        write_results(results, opts.out, "floods")
        print_table(results)
        return 0
    finally:
        if sampler is not None:
            sampler.stop()
        try:
            serve.shutdown()
            ray.shutdown()
        except Exception:  # noqa: BLE001 - nothing was started
            pass
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
