"""vLLM's min_p and min_tokens: min_p's cut against transformers' MinPLogitsWarper, min_tokens'
greedy outputs against transformers' generate with min_new_tokens."""
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper

from engine import InvalidRequestError, SamplingParams
from engine.sampler import apply_min_p
from engine.testing.reference import load_reference_model
from tests.engine.helpers import PROMPTS, make_engine


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_drops_the_tokens_transformers_drops(min_p):
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(0)) * 3
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    kept = apply_min_p(sorted_logits, torch.full((3,), min_p))
    mine = torch.empty_like(kept).scatter_(1, order, kept)  # back to vocabulary order
    reference = logits if min_p == 0 else MinPLogitsWarper(min_p)(None, logits.clone())
    assert torch.equal(torch.isinf(mine), torch.isinf(reference))
    assert torch.isinf(mine).sum(dim=-1).max() < 200  # the most likely token always stays


def test_min_p_of_one_samples_what_greedy_picks(checkpoints):
    engine = make_engine(checkpoints["qwen3_moe"])
    greedy = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    sampled = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.5, seed=5, min_p=1.0,
                                                      ignore_eos=True))
    free = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.5, seed=5, ignore_eos=True))
    assert [o["token_ids"] for o in sampled] == [o["token_ids"] for o in greedy]
    assert [o["token_ids"] for o in free] != [o["token_ids"] for o in greedy]  # the seed alone would not


def test_min_tokens_holds_back_an_end_token_as_transformers_min_new_tokens_does(checkpoints):
    ckpt = checkpoints["qwen3_moe"]
    engine, prompt = make_engine(ckpt), PROMPTS[0]
    first = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0]["token_ids"][0]
    ended = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first]))[0]
    assert ended["token_ids"] == [first] and ended["finish_reason"] == "stop"
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[first],
                                                   min_tokens=3))[0]
    expected = load_reference_model(ckpt).generate(
        torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=3, eos_token_id=[first], pad_token_id=0,
        do_sample=False)[0, len(prompt):].tolist()
    assert out["token_ids"] == expected and len(out["token_ids"]) >= 3
    assert first not in out["token_ids"][:3]


def test_a_stop_string_before_min_tokens_is_passed_and_one_after_it_ends_the_text(checkpoints):
    engine, prompt = make_engine(checkpoints["qwen3_moe"]), PROMPTS[1]
    plain = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    text = plain["text"]
    stop = next(c for c in text[1:] if c.strip() and c != "\ufffd")  # a character the output makes early
    early = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=stop))[0]
    assert early["finish_reason"] == "stop" and early["text"] == text[:text.index(stop)]
    held = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=stop,
                                                    min_tokens=12))[0]
    assert held["token_ids"] == plain["token_ids"] and held["text"].startswith(early["text"] + stop)


@pytest.mark.parametrize("fields", [{"min_p": -0.1}, {"min_p": 1.5}, {"min_tokens": 17}, {"min_tokens": -1}])
def test_min_p_outside_zero_one_and_min_tokens_past_max_tokens_are_refused(fields):
    with pytest.raises(InvalidRequestError, match=next(iter(fields))):
        SamplingParams(max_tokens=16, **fields)
