"""The clients of bench_serve.py: the same jobs through HTTP (SSE) or into an AsyncLLMEngine.

Each request records when its first and last tokens arrived and the generated token ids
(vLLM's `return_token_ids` over HTTP, `token_ids_delta` from the engine), so both paths
give TTFT, TPOT and ids that can be compared request by request (greedy equality).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Job:
    index: int
    tenant: str
    adapter: str
    prompt: list[int]
    max_tokens: int


@dataclass(slots=True)
class Result:
    started: float
    first: float | None = None  # perf_counter time the first token arrived
    last: float | None = None
    token_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0  # usage.completion_tokens over HTTP; len(token_ids) in the engine

    def tpot(self) -> float | None:
        if self.first is None or self.num_tokens < 2:
            return None
        return (self.last - self.first) / (self.num_tokens - 1)


@dataclass
class Run:
    """What one set of jobs measured; `results` by job index (only requests that succeeded)."""

    results: dict[int, Result] = field(default_factory=dict)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def fail(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message[:300])

    def summary(self) -> dict:
        ok = list(self.results.values())
        tokens = sum(r.num_tokens for r in ok)
        ttft = sorted(r.first - r.started for r in ok if r.first is not None)
        tpot = sorted(t for r in ok if (t := r.tpot()) is not None)
        return {"requests_ok": len(ok), "errors": self.errors, "tokens": tokens,
                "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0,
                "ttft_p50_ms": _ms(quantile(ttft, 0.50)), "ttft_p99_ms": _ms(quantile(ttft, 0.99)),
                "tpot_p50_ms": _ms(quantile(tpot, 0.50)), "tpot_p99_ms": _ms(quantile(tpot, 0.99)),
                "error_samples": self.error_samples}


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted `values` (nan when empty)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(seconds: float) -> float:
    return round(1e3 * seconds, 2)


def make_jobs(count: int, tenants: int, adapters: int, prompt_tokens: int, max_tokens: int,
              vocab_size: int, seed: int, shared_prefix: int = 0, base: str = "base") -> list[Job]:
    """Request i: tenant i % T, adapter i % A (with no adapters, the base model `base`), its own
    seeded random token-id prompt; with `shared_prefix`, the prompt's first that many ids are its
    tenant's (a system prompt every request of the tenant repeats, seeded by the tenant alone),
    the rest its own."""
    jobs = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        system = random.Random(f"tenant{i % tenants}")
        head = [system.randrange(vocab_size) for _ in range(min(shared_prefix, prompt_tokens))]
        prompt = head + [rng.randrange(vocab_size) for _ in range(prompt_tokens - len(head))]
        jobs.append(Job(i, f"tenant{i % tenants}", f"adapter{i % adapters}" if adapters else base, prompt, max_tokens))
    return jobs


async def run_pool(jobs: list[Job], concurrency: int, one) -> float:
    """Run `one(job)` over `jobs` with at most `concurrency` in flight; return the wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker():
        while not queue.empty():
            await one(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(jobs))))))
    return time.perf_counter() - started


def completion_body(job: Job) -> dict:
    return {"model": job.adapter, "prompt": job.prompt, "max_tokens": job.max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def _http_one(client, url: str, job: Job, run: Run) -> None:
    result = Result(started=time.perf_counter())
    async with client.stream("POST", f"{url}/v1/completions", json=completion_body(job),
                             headers={"X-Tenant-Id": job.tenant}) as response:
        if response.status_code != 200:
            run.fail(f"{response.status_code}: {(await response.aread()).decode()}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                run.fail(json.dumps(chunk["error"]))
                return
            for choice in chunk.get("choices", ()):
                # The first chunk is sent with the first token even when it decodes to "".
                now = time.perf_counter()
                result.first = result.first or now
                result.last = now
                result.token_ids.extend(choice.get("token_ids") or ())
            if chunk.get("usage"):
                result.num_tokens = chunk["usage"]["completion_tokens"]
    run.results[job.index] = result


async def http_run(url: str, jobs: list[Job], concurrency: int) -> Run:
    import httpx

    run = Run()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800, connect=60), limits=limits) as client:
        async def one(job: Job):
            try:
                await _http_one(client, url, job, run)
            except Exception as exc:  # noqa: BLE001 - counted, not fatal
                run.fail(f"{type(exc).__name__}: {exc}")
        run.wall_s = await run_pool(jobs, concurrency, one)
    return run


def _http_run_in_process(url: str, jobs: list[Job], concurrency: int) -> Run:
    return asyncio.run(http_run(url, jobs, concurrency))


def http_run_procs(pool, url: str, jobs: list[Job], concurrency: int) -> Run:
    """`http_run` split over the processes of `pool` (a ProcessPoolExecutor): one Python process
    parsing every stream's SSE would bound the measurement instead of the server. Job i goes to
    process i % P; the wall time runs from the first request's start to the last token."""
    procs = max(1, min(pool._max_workers, len(jobs), concurrency))
    parts = [pool.submit(_http_run_in_process, url, jobs[k::procs], -(-concurrency // procs))
             for k in range(procs)]
    run = Run()
    for part in parts:
        done = part.result()
        run.results.update(done.results)
        run.errors += done.errors
        run.error_samples += done.error_samples[:5 - len(run.error_samples)]
    times = [(r.started, r.last or r.started) for r in run.results.values()]
    run.wall_s = max(t[1] for t in times) - min(t[0] for t in times) if times else 0.0
    return run


async def direct_run(engine, adapter_dirs: dict, jobs: list[Job], concurrency: int,
                     tag: str) -> Run:
    """The same jobs straight into `engine` (an AsyncLLMEngine), adapters from local dirs."""
    from engine import LoRARequest, SamplingParams

    run = Run()

    async def one(job: Job):
        lora = LoRARequest(lora_name=f"ops/{job.adapter}", lora_path=str(adapter_dirs[job.adapter])) \
            if job.adapter in adapter_dirs else None  # the base model's
        params = SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True)
        result = Result(started=time.perf_counter())
        try:
            async for out in engine.generate(job.prompt, params, request_id=f"{tag}-{job.index}",
                                             lora=lora, tenant=job.tenant):
                if out.token_ids_delta:
                    now = time.perf_counter()
                    result.first = result.first or now
                    result.last = now
                    result.token_ids.extend(out.token_ids_delta)
        except Exception as exc:  # noqa: BLE001 - counted, not fatal
            run.fail(f"{type(exc).__name__}: {exc}")
            return
        result.num_tokens = len(result.token_ids)
        run.results[job.index] = result

    run.wall_s = await run_pool(jobs, concurrency, one)
    return run


def greedy_equality(served: Run, direct: Run) -> dict:
    """Requests whose served token ids equal the engine-alone ids (both ran ok)."""
    both = sorted(set(served.results) & set(direct.results))
    missing = [i for i in both if not served.results[i].token_ids]
    mismatched = [i for i in both if i not in missing
                  and served.results[i].token_ids != direct.results[i].token_ids]
    samples = []
    for i in mismatched[:5]:
        a, b = served.results[i].token_ids, direct.results[i].token_ids
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        samples.append({"request": i, "first_diff_at": at, "served_len": len(a), "direct_len": len(b)})
    return {"compared": len(both), "equal": len(both) - len(mismatched) - len(missing),
            "mismatches": len(mismatched), "served_ids_missing": len(missing),
            "mismatch_samples": samples}
