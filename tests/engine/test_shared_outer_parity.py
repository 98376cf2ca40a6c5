"""Shared-outer expert LoRA (Megatron-Bridge's export) against merged weights, per family.

The reference adds scale x B_e @ A for every expert e into a transformers model's weights,
with A (gate, up) or B (down) the layer's one shared tensor; the engine serves the adapter
beside a per-expert one and the base model in one step, on the CPU references and on the GPU
kernels (fp32), where the adapter heap keeps the shared halves once (expert stride 0).
"""
import pytest

from engine import LoRARequest
from engine.testing import FAMILIES
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import MIXED_PROMPTS, assert_close, make_engine, step_logits, wait_for_adapters


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_outer_adapter_matches_merged_weights_in_a_mixed_step(family, device, tiny_checkpoint, tiny_adapter):
    ckpt = tiny_checkpoint(family)
    adapters = {"shared": tiny_adapter(family, "shared_outer", rank=8, alpha=16, seed=21),
                "shared_rs": tiny_adapter(family, "shared_outer", rank=4, alpha=8, use_rslora=True,
                                          attention=False, seed=22),
                "per_expert": tiny_adapter(family, "per_expert", rank=4, alpha=8, seed=23)}
    names = ["shared", None, "per_expert", "shared_rs", "shared"]
    requests = [None if n is None else LoRARequest(f"t-{n}/ad@v1", str(adapters[n])) for n in names]
    engine = make_engine(ckpt, max_loras=3, max_lora_rank=8, device=device, dtype="float32")
    wait_for_adapters(engine, requests)
    logits = step_logits(engine, MIXED_PROMPTS, requests)
    base = load_reference_model(ckpt)
    for mine, prompt, name in zip(logits, MIXED_PROMPTS, names):
        ref = base if name is None else load_reference_model(ckpt, adapters[name], merge=True)
        expected = reference_logits(ref, prompt)
        assert_close(mine.float().cpu(), expected)
        if name is not None:  # the adapter really changes the output
            assert (expected - reference_logits(base, prompt)).abs().max() > 1e-2
