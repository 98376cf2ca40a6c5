"""Async scheduling: step n+1 is scheduled and launched before step n's tokens are read back.

Every case runs the same requests through an engine with async_scheduling on and one with it
off; the outputs must be equal token for token (the sync engine is the reference: its inputs
come from host-side token ids, the async one's from the device)."""
import pytest

from engine import LoRARequest, SamplingParams
from tests.engine.helpers import PROMPTS, make_engine, static_engine, wait_for_adapters


@pytest.fixture
def qwen(checkpoints):
    return checkpoints["qwen3_moe"]


def run(engine, requests) -> dict:
    """requests: (id, prompt, params, lora); returns id -> (token ids, text, finish reason)."""
    for rid, prompt, params, lora in requests:
        engine.add_request(rid, prompt, params, lora)
    got = {rid: [[], "", None] for rid, *_ in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id][0] += out.token_ids_delta
            got[out.request_id][1] += out.text_delta
            if out.finished:
                assert got[out.request_id][2] is None, "a request finished twice"
                got[out.request_id][2] = out.finish_reason
                assert out.num_output_tokens == len(got[out.request_id][0])
    return {rid: tuple(v[:2]) + (v[2],) for rid, v in got.items()}


def mixed_requests(adapters, stop_token: int) -> list:
    a, b = (LoRARequest(f"t{k}/{k}", str(adapters["qwen3_moe"][k])) for k in ("a", "b"))
    greedy = lambda n, **kw: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)  # noqa: E731
    long_prompt = list(range(40, 70))
    return [
        ("short", PROMPTS[0], greedy(2), None),
        ("greedy", PROMPTS[1], greedy(9), a),
        ("seeded", PROMPTS[2], SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=5,
                                              ignore_eos=True), b),
        ("stops", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_token]), None),
        ("long", long_prompt, greedy(5), a),  # chunked with the small token budget below
        ("one", [3, 4], greedy(1), b),
    ]


@pytest.mark.parametrize("engine_kw", [
    dict(max_num_batched_tokens=11),  # chunked prefill, prefill chunks mixed with decodes
    dict(num_kv_blocks=14, block_size=4, max_model_len=40),  # too few blocks: preemption
])
def test_async_outputs_equal_sync_outputs(qwen, adapters, engine_kw):
    base = make_engine(qwen).generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0))[0]
    stop_token = base["token_ids"][3]  # "stops" ends early; its step n+1 row is wasted
    stop_len = base["token_ids"].index(stop_token) + 1
    outs = []
    # sync; async with eager steps launched after the read-back (the default); async with every step
    # launched ahead (on CPU no step is a graph step, so only this one feeds tokens on the device)
    for kw in (dict(async_scheduling=False), dict(async_scheduling=True),
               dict(async_scheduling=True, async_eager_steps=True)):
        engine = make_engine(qwen, max_loras=2, **kw, **engine_kw)
        requests = mixed_requests(adapters, stop_token)
        # adapters resident first: with loads still in flight a busy machine would run the
        # requests one after the other, and the case with too few blocks would never preempt
        wait_for_adapters(engine, {lora for *_, lora in requests})
        outs.append(run(engine, requests))
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert engine.num_preemptions > 0 or "num_kv_blocks" not in engine_kw
    assert outs[1] == outs[0] and outs[2] == outs[0]
    assert outs[1]["stops"][2] == "stop" and len(outs[1]["stops"][0]) == stop_len < 12
    assert [len(outs[1][r][0]) for r in ("short", "greedy", "seeded", "long", "one")] == [2, 9, 7, 5, 1]


def test_steps_run_ahead_but_not_past_max_tokens(qwen):
    """Each step() leaves the next step launched; a sequence whose pending token is its last is
    not scheduled again, so max_tokens=5 costs exactly 5 rows (1 prefill + 4 decodes)."""
    engine = make_engine(qwen, async_scheduling=True, async_eager_steps=True)
    rows = []
    launch = engine.runner.launch
    engine.runner.launch = lambda scheduled, *a, **kw: rows.append(len(scheduled)) or launch(scheduled, *a, **kw)
    engine.add_request("r", PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    ahead = []
    while engine.has_unfinished_requests():
        engine.step()
        ahead.append(engine._in_flight is not None)
    assert rows == [1] * 5
    assert ahead[:4] == [True] * 4 and ahead[-1] is False


def test_abort_while_its_step_is_in_flight(qwen):
    solo = make_engine(qwen).generate([PROMPTS[2]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine = make_engine(qwen, async_scheduling=True, async_eager_steps=True)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request("gone", PROMPTS[0], params)
    engine.add_request("kept", PROMPTS[2], params)
    got = {"gone": [], "kept": []}
    for _ in range(2):
        for out in engine.step():
            got[out.request_id] += out.token_ids_delta
    assert engine._in_flight is not None
    assert engine.abort("gone").finish_reason == "abort"
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.token_ids_delta
    assert len(got["gone"]) == 2 and got["kept"] == solo[0]["token_ids"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_failures_found_ahead_are_reported_with_the_current_step(qwen, adapters, tmp_path):
    """A request whose adapter fails while the next step is scheduled ahead is reported by that
    step() call, once; aborting it afterwards finds nothing, and its id can be reused at once."""
    engine = make_engine(qwen, max_loras=2, async_scheduling=True, async_eager_steps=True)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("kept", PROMPTS[0], params)
    engine.step()  # "kept" prefilled, its first decode launched ahead
    engine.add_request("bad", PROMPTS[1], params, LoRARequest("t/missing", str(tmp_path / "none")))
    outs = []
    while not any(o.request_id == "bad" for o in outs):
        outs += engine.step()
    bad = [o for o in outs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finished and bad[0].error is not None
    assert engine.abort("bad") is None
    engine.add_request("bad", PROMPTS[1], params)  # the id is free again
    while engine.has_unfinished_requests():
        outs += engine.step()
    again = [o for o in outs if o.request_id == "bad" and o is not bad[0]]
    assert again[-1].finish_reason == "length" and sum(len(o.token_ids_delta) for o in again) == 6


def test_a_failed_launch_ahead_loses_no_tokens(qwen):
    """The step launched ahead raises once: the current step's tokens are still returned, and
    the run ends with the same tokens as an engine that never failed."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = make_engine(qwen).generate(PROMPTS[:2], params)
    engine = make_engine(qwen, async_scheduling=True, async_eager_steps=True)
    launch, calls, failed_at = engine.runner.launch, [], []

    def flaky(scheduled, prev=None, *a, **kw):
        calls.append(prev is not None)
        if sum(calls) == 2 and prev is not None:
            failed_at.append(len(calls))
            raise RuntimeError("injected launch failure")
        return launch(scheduled, prev, *a, **kw)
    engine.runner.launch = flaky
    assert [o["token_ids"] for o in engine.generate(PROMPTS[:2], params)] == [o["token_ids"] for o in expected]
    assert len(failed_at) == 1, "the injected failure never fired: no second step was launched ahead"
    # the failed step is launched again, after the read-back (prev=None), by the very next call
    assert calls[failed_at[0]] is False
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.gpu
def test_launching_a_step_never_waits_for_the_gpu(qwen, adapters):
    """Every launch (prefill, mixed, decode graph, with and without adapters) runs with CUDA's
    sync debug mode set to error: an op that blocks the host on the GPU (a Python-list index, a
    pageable copy, .item()) raises here instead of silently serialising the async steps."""
    import torch
    engine = make_engine(qwen, max_loras=2, device="cuda", dtype="bfloat16", max_num_batched_tokens=16)
    launch = engine.runner.launch

    def checked(*a, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(*a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    engine.runner.launch = checked
    lora = LoRARequest("t/b", str(adapters["qwen3_moe"]["b"]))
    params = SamplingParams(max_tokens=8, temperature=0.7, seed=1, ignore_eos=True)
    outs = engine.generate(PROMPTS + [list(range(40, 70))], params, [None, lora, None, lora])
    assert [len(o["token_ids"]) for o in outs] == [8] * 4


def test_only_decode_graph_steps_are_launched_ahead(checkpoints, adapters):
    """The default policy: a decode graph step (cheap to launch) goes out before the previous
    step is read back; a prefill or mixed step (host-bound) waits for the read-back. The static
    graph buffers run eagerly on CPU, so this covers the graph path's device-side token feed."""
    ckpt = checkpoints["qwen3_moe"]
    loras = [None, LoRARequest("t/b", str(adapters["qwen3_moe"]["b"])), None]
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    expected = make_engine(ckpt, max_num_seqs=5, max_loras=2, async_scheduling=False).generate(PROMPTS, params, loras)
    engine = static_engine(ckpt, max_loras=2, max_num_batched_tokens=12)
    launch, seen = engine.runner.launch, []

    def spy(scheduled, prev=None, *a, **kw):
        seen.append((prev is not None, engine.runner.is_graph_step(scheduled)))
        return launch(scheduled, prev, *a, **kw)
    engine.runner.launch = spy
    outs = engine.generate(PROMPTS, params, loras)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in expected]
    assert (True, True) in seen and (False, False) in seen and (True, False) not in seen
