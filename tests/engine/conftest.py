"""The engine tests' views of the shared tiny checkpoints and adapters (tests/conftest.py),
and the bf16-exact models of the bf16 parity tests."""
import pytest

from engine.testing import FAMILIES
from engine.testing.adapters import make_peft_adapter
from engine.testing.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tiny_checkpoint):
    return {fam: tiny_checkpoint(fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def adapters(tiny_adapter):
    """Per family, three tenants' adapters: different ranks and formats, one rsLoRA."""
    return {fam: {
        "a": tiny_adapter(fam, "per_expert", rank=4, alpha=8, seed=11),
        "b": tiny_adapter(fam, "fused", rank=8, alpha=16, use_rslora=True, seed=12),
        "c": tiny_adapter(fam, "fused", rank=16, alpha=32, seed=13, rank_pattern={"v_proj": 6, "down_proj": 4},
                          alpha_pattern={"o_proj": 4, "gate_up_proj": 8}),
    } for fam in FAMILIES}


@pytest.fixture(scope="session")
def bf16_models(tmp_path_factory):
    """Per family, a checkpoint and the three tenants' adapters made for bf16 parity: every
    token routed to all experts (top-k = E = 6), adapter deltas of a realistic size
    (B ~ N(0, 0.05)), and every weight exactly representable in bf16 (so the fp32 oracle computes
    with the engine's weights). With top-k < E a bf16 rounding can flip an expert choice near a
    tie; that is a different function, not an error an fp32 oracle can judge (seen on an H200:
    router_scale=10 still left a 15%-margin tie carrying 17% of a token's weight, and that
    sequence's logits moved by 4%). The fp32 GPU test keeps real top-k routing."""
    root = tmp_path_factory.mktemp("bf16")
    out = {}
    for fam in FAMILIES:
        # num_experts_per_tok = all 6 experts of the tiny families
        ckpt = make_tiny_checkpoint(root / fam, fam, seed=1, bf16_exact=True, num_experts_per_tok=6)
        out[fam] = (ckpt, {
            "a": make_peft_adapter(ckpt, root / fam / "a", rank=4, fmt="per_expert", alpha=8, seed=11,
                                   std=0.05, bf16_exact=True),
            "b": make_peft_adapter(ckpt, root / fam / "b", rank=8, fmt="fused", alpha=16,
                                   use_rslora=True, seed=12, std=0.05, bf16_exact=True),
            "c": make_peft_adapter(ckpt, root / fam / "c", rank=16, fmt="fused", alpha=32, seed=13,
                                   std=0.05, bf16_exact=True,
                                   rank_pattern={"v_proj": 6, "down_proj": 4}),
        })
    return out
