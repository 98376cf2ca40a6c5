"""benchmarks/serve_clients.py: jobs, per-request timing summaries, greedy equality (CPU)."""
import asyncio

import pytest

from benchmarks.serve_clients import Result, Run, direct_run, greedy_equality, make_jobs


def test_jobs_spread_over_tenants_and_adapters_with_distinct_seeded_prompts():
    jobs = make_jobs(10, tenants=3, adapters=4, prompt_tokens=32, max_tokens=5, vocab_size=1000, seed=7)
    assert [j.tenant for j in jobs[:4]] == ["tenant0", "tenant1", "tenant2", "tenant0"]
    assert [j.adapter for j in jobs[:5]] == ["adapter0", "adapter1", "adapter2", "adapter3", "adapter0"]
    assert len({tuple(j.prompt) for j in jobs}) == 10
    assert all(len(j.prompt) == 32 and max(j.prompt) < 1000 for j in jobs)
    assert jobs == make_jobs(10, 3, 4, 32, 5, 1000, seed=7)
    assert jobs[0].prompt != make_jobs(1, 3, 4, 32, 5, 1000, seed=8)[0].prompt


def test_a_shared_prefix_is_the_tenants_own_and_the_rest_of_each_prompt_its_own():
    jobs = make_jobs(6, tenants=2, adapters=1, prompt_tokens=40, max_tokens=5, vocab_size=1000, seed=3,
                     shared_prefix=32)
    heads = [tuple(j.prompt[:32]) for j in jobs]
    assert heads[0] == heads[2] == heads[4] != heads[1] == heads[3] == heads[5]
    assert len({tuple(j.prompt[32:]) for j in jobs}) == 6 and all(len(j.prompt) == 40 for j in jobs)
    assert heads[0] == tuple(make_jobs(1, 2, 1, 40, 5, 1000, seed=9, shared_prefix=32)[0].prompt[:32])


def test_no_prompt_of_a_serve_benchmark_run_repeats_another_past_the_shared_prefix():
    import argparse

    from benchmarks.bench_serve import Workload
    opts = argparse.Namespace(tenants=3, adapters=4, prompt_tokens=24, max_tokens=6, burst_tokens=2, seed=0,
                              requests=12, sequential=4, burst=8, shared_prefix_tokens=16)
    work = Workload.draw(opts, vocab_size=500, base="tiny")
    every = work.measured + work.sequential + work.warmup + work.burst
    assert len({tuple(j.prompt[16:24]) for j in every}) == len(every) == 28
    assert [(j.index, j.adapter, j.max_tokens) for j in work.warmup] == [
        (-1, "adapter0", 2), (-2, "adapter1", 2), (-3, "adapter2", 2), (-4, "adapter3", 2)]


def test_summary_tpot_is_decode_time_over_tokens_after_the_first():
    run = Run(wall_s=2.0)
    run.results[0] = Result(started=0.0, first=0.5, last=1.5, num_tokens=11)  # 0.1 s a token
    run.results[1] = Result(started=0.0, first=0.2, last=0.2, num_tokens=1)   # no TPOT
    run.fail("boom")
    s = run.summary()
    assert s["tokens"] == 12 and s["tokens_per_s"] == 6.0 and s["errors"] == 1
    assert s["tpot_p50_ms"] == pytest.approx(100.0) and s["ttft_p99_ms"] == pytest.approx(500.0)


def test_greedy_equality_counts_mismatches_and_missing_ids():
    served, direct = Run(), Run()
    for i, (a, b) in enumerate([([1, 2], [1, 2]), ([1, 3], [1, 2]), ([], [5])]):
        served.results[i] = Result(0.0, token_ids=a)
        direct.results[i] = Result(0.0, token_ids=b)
    g = greedy_equality(served, direct)
    assert (g["compared"], g["equal"], g["mismatches"], g["served_ids_missing"]) == (3, 1, 1, 1)
    assert g["mismatch_samples"] == [{"request": 1, "first_diff_at": 1, "served_len": 2, "direct_len": 2}]


def test_direct_run_ids_equal_the_synchronous_engine(tiny_checkpoint, tmp_path):
    from engine import AsyncLLMEngine, EngineConfig, LLMEngine, LoRARequest, SamplingParams
    from engine.testing import make_peft_adapter

    checkpoint = tiny_checkpoint()
    adapter = make_peft_adapter(checkpoint, tmp_path / "a", rank=4, seed=1)
    config = dict(model=str(checkpoint), device="cpu", max_loras=2, max_model_len=128)
    jobs = make_jobs(4, tenants=2, adapters=1, prompt_tokens=6, max_tokens=5, vocab_size=300, seed=0)
    engine = AsyncLLMEngine(EngineConfig(**config))
    try:
        run = asyncio.run(direct_run(engine, {"adapter0": adapter}, jobs, 4, "t"))
    finally:
        engine.shutdown()
    oracle = LLMEngine(EngineConfig(**config))
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    lora = LoRARequest(lora_name="ops/adapter0", lora_path=str(adapter))
    want = oracle.generate([j.prompt for j in jobs], params, loras=[lora] * len(jobs))
    assert run.errors == 0
    assert [run.results[j.index].token_ids for j in jobs] == [w["token_ids"] for w in want]
    assert all(run.results[j.index].num_tokens == 5 for j in jobs)


def test_with_no_adapters_every_request_names_the_base_model():
    jobs = make_jobs(3, tenants=2, adapters=0, prompt_tokens=4, max_tokens=2, vocab_size=50, seed=1, base="tiny")
    assert [j.adapter for j in jobs] == ["tiny"] * 3
