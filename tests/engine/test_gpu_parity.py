"""The parity tests on CUDA in bf16 (Triton kernels), against the fp32 CPU reference within 2e-2."""
import pytest
import torch

from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.conftest import FAMILIES
from tests.engine.test_base_parity import PROMPTS, assert_close, make_engine, step_logits
from tests.engine.test_lora_parity import MIXED_PROMPTS, _wait_for_adapters, lora

pytestmark = pytest.mark.gpu
BF16 = dict(device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_bf16_mixed_step_matches_reference(family, checkpoints, adapters):
    ckpt = checkpoints[family]
    names = [None, "a", None, "b", "c"]
    engine = make_engine(ckpt, max_loras=4, max_lora_rank=16, **BF16)
    requests = [None if n is None else lora(adapters, family, n) for n in names]
    _wait_for_adapters(engine, requests)
    for mine, prompt, name in zip(step_logits(engine, MIXED_PROMPTS, requests), MIXED_PROMPTS, names):
        ref = load_reference_model(ckpt, None if name is None else adapters[family][name])
        assert_close(mine.float().cpu(), reference_logits(ref, prompt), rel=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_bf16_base_bitwise_with_and_without_adapters_loaded(family, checkpoints, adapters):
    ckpt = checkpoints[family]
    loaded = make_engine(ckpt, max_loras=3, max_lora_rank=16, **BF16)
    _wait_for_adapters(loaded, [lora(adapters, family, n) for n in "abc"])
    plain = step_logits(make_engine(ckpt, max_loras=0, **BF16), PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(step_logits(loaded, PROMPTS), plain))


def test_gpu_bf16_evict_reload_and_greedy_generation(checkpoints, adapters):
    from engine import SamplingParams
    ckpt = checkpoints["qwen3_moe"]
    engine = make_engine(ckpt, max_loras=1, max_lora_rank=16, **BF16)
    a, c = lora(adapters, "qwen3_moe", "a"), lora(adapters, "qwen3_moe", "c")
    runs = []
    for req in (a, c, a):
        _wait_for_adapters(engine, [req])
        runs.append(step_logits(engine, [PROMPTS[0]], [req])[0])
        engine.abort("s0")
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[1])
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert all(len(o["token_ids"]) == 8 for o in outs)
