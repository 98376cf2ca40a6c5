"""Tiny checkpoints and PEFT adapters shared by the engine tests (built once per session)."""
import pytest

from engine.testing.adapters import make_peft_adapter
from engine.testing.checkpoints import make_tiny_checkpoint

FAMILIES = ("qwen3_moe", "mixtral", "olmoe")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: make_tiny_checkpoint(root / fam, fam, seed=1) for fam in FAMILIES}


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, checkpoints):
    """Per family, three tenants' adapters: different ranks and formats, one rsLoRA."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for fam, ckpt in checkpoints.items():
        out[fam] = {
            "a": make_peft_adapter(ckpt, root / fam / "a", rank=4, fmt="per_expert", alpha=8, seed=11),
            "b": make_peft_adapter(ckpt, root / fam / "b", rank=8, fmt="fused", alpha=16,
                                   use_rslora=True, seed=12),
            "c": make_peft_adapter(ckpt, root / fam / "c", rank=16, fmt="fused", alpha=32, seed=13,
                                   rank_pattern={"v_proj": 6, "down_proj": 4},
                                   alpha_pattern={"o_proj": 4, "gate_up_proj": 8}),
        }
    return out


@pytest.fixture(scope="session")
def bf16_models(tmp_path_factory):
    """Per family, a checkpoint and the three tenants' adapters made for bf16 parity: routers
    scaled up so that bf16 rounding does not flip top-k choices, and adapter deltas of a
    realistic size (B ~ N(0, 0.05)), and every weight exactly representable in bf16 (so the
    fp32 oracle computes with the engine's weights). A flipped expert is a different function, not an error
    of the engine; with the plain fixtures an fp32 oracle could not judge a bf16 run."""
    root = tmp_path_factory.mktemp("bf16")
    out = {}
    for fam in FAMILIES:
        ckpt = make_tiny_checkpoint(root / fam, fam, seed=1, router_scale=10.0, bf16_exact=True)
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
