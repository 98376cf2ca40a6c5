"""SamplingParams.logprobs: each sampled token's log-probability and its most likely alternatives,
against transformers + PEFT's log-softmax of the same positions."""
import pytest
import torch

from engine import InvalidRequestError, SamplingParams, model_runner
from engine.testing.reference import load_reference_model
from tests.engine.helpers import PROMPTS, lora, make_engine


def reference_logprobs(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), V]: the reference's log-softmax at each generated position."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(dim=-1)


def test_greedy_logprobs_and_alternatives_match_the_reference_with_and_without_adapters(checkpoints, adapters):
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt, max_loras=2, max_lora_rank=16)
    reqs = [lora(adapters, "qwen3_moe", "b"), None, lora(adapters, "qwen3_moe", "a")]
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3), reqs)
    for prompt, out, name in zip(PROMPTS, outs, ["b", None, "a"]):
        ref = load_reference_model(ckpt, None if name is None else adapters["qwen3_moe"][name])
        expected = reference_logprobs(ref, prompt, out["token_ids"])
        assert len(out["logprobs"]) == len(out["token_ids"]) == 6
        for position, (token, (chosen, alternatives)) in enumerate(zip(out["token_ids"], out["logprobs"])):
            assert chosen == pytest.approx(expected[position, token].item(), abs=1e-4)
            top = expected[position].topk(3)
            assert [t for t, _ in alternatives] == top.indices.tolist()
            assert [v for _, v in alternatives] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert alternatives[0][0] == token  # greedy: the sampled token is the most likely


def test_logprobs_are_the_models_own_whatever_the_temperature_and_penalties(checkpoints):
    """vLLM's default: the distribution before temperature, penalties and bias."""
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt)
    params = SamplingParams(max_tokens=5, temperature=1.7, seed=3, repetition_penalty=1.5, logit_bias={7: 5.0},
                            ignore_eos=True, logprobs=0)
    prompt = PROMPTS[0]
    out = engine.generate([prompt], params)[0]
    expected = reference_logprobs(load_reference_model(ckpt), prompt, out["token_ids"])
    for position, (token, (chosen, alternatives)) in enumerate(zip(out["token_ids"], out["logprobs"])):
        assert chosen == pytest.approx(expected[position, token].item(), abs=1e-4)
        assert alternatives == []


def test_only_the_requests_that_ask_get_logprobs(checkpoints):
    engine = make_engine(checkpoints["qwen3_moe"])
    for rid, logprobs in (("with", 2), ("without", None)):
        engine.add_request(rid, PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logprobs=logprobs))
    seen = {"with": [], "without": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert all(len(o.logprobs) == len(o.token_ids_delta) for o in seen["with"] if o.token_ids_delta)
    assert all(len(e[1]) == 2 for o in seen["with"] for e in o.logprobs or [])
    assert all(o.logprobs is None for o in seen["without"])


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0])
@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
def test_logprobs_outside_zero_to_twenty_alternatives_are_refused(name, bad):
    with pytest.raises(InvalidRequestError, match=name):
        SamplingParams(**{name: bad})


def reference_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: the reference's log-softmax before each prompt token after the first."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(dim=-1)


def assert_prompt_logprobs(entries, prompt, expected, k, tol=1e-4):
    assert [token for token, _, _ in entries] == prompt
    assert entries[0][1:] == (None, [])
    for position, (token, chosen, alternatives) in enumerate(entries[1:]):
        assert chosen == pytest.approx(expected[position, token].item(), abs=tol)
        top = expected[position].topk(k)
        assert [t for t, _ in alternatives] == top.indices.tolist()
        assert [v for _, v in alternatives] == pytest.approx(top.values.tolist(), abs=tol)


# whole prompts in a step (their logits 3 rows at a time, too); chunks of 5 tokens; chunks
# launched before the step ahead is read back
@pytest.mark.parametrize("budget, ahead, rows", [(64, False, None), (64, False, 3), (5, False, None), (5, True, None)])
def test_prompt_logprobs_match_the_reference_with_and_without_adapters_whole_or_chunked(
        checkpoints, adapters, budget, ahead, rows, monkeypatch):
    if rows is not None:
        monkeypatch.setattr(model_runner, "PROMPT_LOGPROB_ROWS", rows)
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt, max_loras=2, max_lora_rank=16, max_num_batched_tokens=budget,
                         async_eager_steps=ahead)
    reqs = [lora(adapters, "qwen3_moe", "c"), None, lora(adapters, "qwen3_moe", "a")]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=2)
    outs = engine.generate(PROMPTS, params, reqs)
    for prompt, out, name in zip(PROMPTS, outs, ["c", None, "a"]):
        ref = load_reference_model(ckpt, None if name is None else adapters["qwen3_moe"][name])
        assert_prompt_logprobs(out["prompt_logprobs"], prompt, reference_prompt_logprobs(ref, prompt), 2)
        assert out["logprobs"] == []  # the sampled tokens' were not asked for


def test_prompt_logprobs_skip_the_prefix_cache_and_survive_preemption(checkpoints):
    """A prompt whose blocks are cached is computed whole all the same (every position's logits
    are needed), and a sequence preempted and recomputed reports each position once."""
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt, num_kv_blocks=12, max_model_len=40)
    prompts = [list(range(10 + i, 24 + i)) for i in range(3)]
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # prompts[0]'s blocks cached
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=0)
    outs = engine.generate(prompts, params)
    assert engine.num_preemptions > 0 and engine.stats()["prefix_cache_hits"] == 0
    ref = load_reference_model(ckpt)
    for prompt, out in zip(prompts, outs):
        assert_prompt_logprobs(out["prompt_logprobs"], prompt, reference_prompt_logprobs(ref, prompt), 0)


@pytest.mark.gpu
def test_gpu_logprobs_through_decode_graphs_and_async_steps_match_the_reference(checkpoints, adapters):
    """fp32 on the GPU kernels with the engine's defaults there (decode graphs, async
    scheduling: the logprobs come back with the tokens, a step behind)."""
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt, device="cuda", dtype="float32", max_loras=2, max_lora_rank=16)
    reqs = [lora(adapters, "qwen3_moe", "b"), None, lora(adapters, "qwen3_moe", "a")]
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2), reqs)
    for prompt, out, name in zip(PROMPTS, outs, ["b", None, "a"]):
        ref = load_reference_model(ckpt, None if name is None else adapters["qwen3_moe"][name])
        expected = reference_logprobs(ref, prompt, out["token_ids"])
        assert len(out["logprobs"]) == 8
        for position, (token, (chosen, alternatives)) in enumerate(zip(out["token_ids"], out["logprobs"])):
            assert chosen == pytest.approx(expected[position, token].item(), abs=1e-3)
            assert [v for _, v in alternatives] == pytest.approx(expected[position].topk(2).values.tolist(), abs=1e-3)


@pytest.mark.gpu
def test_gpu_prompt_logprobs_beside_graph_steps_match_the_reference(checkpoints, adapters):
    """fp32 on the GPU with its defaults: a prompt-logprob request's steps run eagerly beside
    requests whose steps replay graphs, and its rows' logits come PROMPT_LOGPROB_ROWS at a time."""
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt, device="cuda", dtype="float32", max_loras=2, max_lora_rank=16)
    prompts = [list(range(3, 60)), PROMPTS[1], PROMPTS[2]]
    reqs = [lora(adapters, "qwen3_moe", "b"), None, lora(adapters, "qwen3_moe", "a")]
    for prompt, req, k in zip(prompts, reqs, (3, None, 0)):
        engine.add_request(f"p{len(prompt)}", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                                      prompt_logprobs=k), req)
    firsts = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            firsts.setdefault(out.request_id, out)
    for prompt, name, k in zip(prompts, ["b", None, "a"], (3, None, 0)):
        entries = firsts[f"p{len(prompt)}"].prompt_logprobs
        if k is None:
            assert entries is None
            continue
        ref = load_reference_model(ckpt, None if name is None else adapters["qwen3_moe"][name])
        assert_prompt_logprobs(entries, prompt, reference_prompt_logprobs(ref, prompt), k, tol=1e-3)


def test_a_launch_that_raises_and_is_retried_scores_every_prompt_position(checkpoints, monkeypatch):
    """A step launched ahead whose launch raises (logged; it runs after the step before is read
    back) scores its prompt positions when it does run."""
    engine = make_engine(checkpoints["qwen3_moe"], max_num_batched_tokens=6, async_eager_steps=True)
    real, calls = model_runner.sample, []

    def sample_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a transient failure while launching")
        return real(*args, **kwargs)
    monkeypatch.setattr(model_runner, "sample", sample_failing_once)
    prompt = list(range(40, 60))
    engine.add_request("other", [5, 6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    engine.add_request("echoed", prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0))
    firsts = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            firsts.setdefault(out.request_id, out)
    assert len(calls) > 3
    expected = reference_prompt_logprobs(load_reference_model(checkpoints["qwen3_moe"]), prompt)
    assert_prompt_logprobs(firsts["echoed"].prompt_logprobs, prompt, expected, 0)
