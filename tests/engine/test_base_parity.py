"""Base-model numerics of our own modules against transformers, per family (CPU, fp32)."""
import pytest
import torch

from engine import SamplingParams
from engine.testing import FAMILIES
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import PROMPTS, assert_close, make_engine, step_logits


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(family, checkpoints):
    ref = load_reference_model(checkpoints[family])
    for mine, prompt in zip(step_logits(make_engine(checkpoints[family]), PROMPTS), PROMPTS):
        assert_close(mine, reference_logits(ref, prompt))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf_generate(family, checkpoints):
    ref = load_reference_model(checkpoints[family])
    engine = make_engine(checkpoints[family])
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                                do_sample=False)[0, len(prompt):].tolist()
        assert out["token_ids"] == expected
        assert out["finish_reason"] == "length"


@pytest.mark.parametrize("overrides", [
    dict(num_experts=5, num_experts_per_tok=1, norm_topk_prob=False, tie_word_embeddings=True),
    dict(num_experts=7, num_experts_per_tok=4, num_key_value_heads=1, decoder_sparse_step=2),
    dict(num_experts=3, num_experts_per_tok=3, num_key_value_heads=4, mlp_only_layers=[0]),
])
def test_qwen3_config_variants_match_transformers(overrides, tmp_path):
    from engine.testing.checkpoints import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(tmp_path / "ck", "qwen3_moe", seed=3, **overrides)
    ref = load_reference_model(ckpt)
    for mine, prompt in zip(step_logits(make_engine(ckpt), PROMPTS), PROMPTS):
        assert_close(mine, reference_logits(ref, prompt))


def test_olmoe_clip_qkv_and_mixtral_sliding_window_match(tmp_path):
    from engine.testing.checkpoints import make_tiny_checkpoint
    prompts = [list(range(40, 60)), [3, 4, 5]]
    for family, kw in (("olmoe", dict(clip_qkv=0.3)), ("mixtral", dict(sliding_window=5))):
        ckpt = make_tiny_checkpoint(tmp_path / family, family, seed=4, **kw)
        ref = load_reference_model(ckpt)
        for mine, prompt in zip(step_logits(make_engine(ckpt), prompts), prompts):
            assert_close(mine, reference_logits(ref, prompt))


def test_mixtral_sliding_window_decode_matches_hf_generate(tmp_path):
    from engine.testing.checkpoints import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(tmp_path / "mixtral", "mixtral", seed=5, sliding_window=6)
    ref = load_reference_model(ckpt)
    prompt = list(range(40, 52))
    out = make_engine(ckpt).generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                            do_sample=False)[0, len(prompt):].tolist()
    assert out["token_ids"] == expected
