"""Presence / frequency penalties (OpenAI) and the repetition penalty (transformers, vLLM)
against independent references: a step-by-step loop over the transformers model's logits with
the OpenAI formula, and transformers' own generate(repetition_penalty=...)."""
import pytest
import torch

from engine import SamplingParams
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import PROMPTS, make_engine


@pytest.fixture
def qwen(checkpoints):
    return checkpoints["qwen3_moe"]


def openai_penalised_greedy(model, prompt: list[int], steps: int, frequency: float, presence: float) -> list[int]:
    out = []
    for _ in range(steps):
        logits = reference_logits(model, prompt + out)[-1].double()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).double()
        logits = logits - frequency * counts - presence * (counts > 0).double()
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 2.0), (0.7, 0.8), (-0.5, 0.0)])
def test_presence_and_frequency_penalties_match_the_openai_formula(qwen, frequency, presence):
    model = load_reference_model(qwen)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                            frequency_penalty=frequency, presence_penalty=presence)
    got = make_engine(qwen).generate(PROMPTS, params)
    want = [openai_penalised_greedy(model, p, 10, frequency, presence) for p in PROMPTS]
    assert [o["token_ids"] for o in got] == want
    plain = make_engine(qwen).generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o["token_ids"] for o in plain] != want  # the penalty changes something here


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers_generate(qwen, penalty):
    model = load_reference_model(qwen)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=penalty)
    got = [o["token_ids"] for o in make_engine(qwen).generate(PROMPTS, params)]
    for prompt, tokens in zip(PROMPTS, got):
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             repetition_penalty=penalty)
        assert tokens == ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("mode", [dict(async_scheduling=False), dict(async_scheduling=True),
                                  dict(async_scheduling=True, async_eager_steps=True)], ids=["sync", "async", "ahead"])
def test_penalised_and_plain_sequences_share_a_batch(qwen, mode):
    """Each sequence gets what it gets alone; the penalty rows do not leak into the others, and a
    step with a penalty is not launched before the tokens it reads are back on the host."""
    penalised = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, frequency_penalty=1.0,
                               repetition_penalty=1.2)
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = [make_engine(qwen).generate([p], params)[0]["token_ids"]
             for p, params in zip(PROMPTS, (penalised, plain, penalised))]
    engine = make_engine(qwen, **mode)
    for i, (p, params) in enumerate(zip(PROMPTS, (penalised, plain, penalised))):
        engine.add_request(f"r{i}", p, params)
    got = {f"r{i}": [] for i in range(3)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.token_ids_delta
    assert [got[f"r{i}"] for i in range(3)] == alone


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_out_of_range_penalties_raise(kwargs, fragment):
    from engine.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match=fragment):
        SamplingParams(**kwargs)


def test_logit_bias_moves_the_given_logits(qwen):
    """A bias of +100 makes greedy pick that token every step; -100 on the tokens greedy picks
    gives the reference's greedy over the biased logits (a loop over the transformers logits)."""
    forced = make_engine(qwen).generate(PROMPTS[:2], SamplingParams(
        max_tokens=5, temperature=0, ignore_eos=True, logit_bias={7: 100.0}))
    assert [o["token_ids"] for o in forced] == [[7] * 5] * 2
    plain = make_engine(qwen).generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    banned = {t: -100.0 for t in plain[0]["token_ids"][:2]}
    got = make_engine(qwen).generate([PROMPTS[0]], SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True, logit_bias=banned))[0]["token_ids"]
    model, out = load_reference_model(qwen), []
    for _ in range(6):
        logits = reference_logits(model, PROMPTS[0] + out)[-1].double()
        for t, b in banned.items():
            logits[t] += b
        out.append(int(logits.argmax()))
    assert got == out and not set(got) & set(banned)
