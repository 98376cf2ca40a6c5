"""The torch references (the CPU path) against the independent fp64 loop references."""
import pytest
import torch

import kernels
from kernels import DenseLoRAWeights, KernelInputError, MoELoRAWeights
from tests.kernels.loop_reference import (SPREADS, dense_loop_ref, make_dense_lora, make_moe,
                                          make_moe_lora, make_slot_ids, moe_loop_ref, rel_err)

RANKS = [1, 8, 16, 4]


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("t,e,k", [(1, 6, 1), (3, 6, 2), (17, 10, 8), (33, 7, 2)])
def test_fused_moe_ref_matches_loop(spread, t, e, k):
    gen = torch.Generator().manual_seed(t * 100 + e + k)
    d, inter = 24, 20
    args = make_moe(gen, t, d, inter, e, k, torch.float32)
    lora = make_moe_lora(gen, len(RANKS), e, d, inter, RANKS, torch.float32)
    slots = make_slot_ids(spread, t, len(RANKS), gen)
    want = moe_loop_ref(*args, lora, slots)
    want_base = moe_loop_ref(*args)
    got = kernels.fused_moe(*args, lora=lora, slot_ids=slots)
    assert got.dtype == torch.float32 and got.shape == (t, d)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got - want_base, want - want_base) <= 1e-4 or not (slots >= 0).any()


def test_fused_moe_ref_no_adapter_rows_bitwise_equal_to_base():
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        args = make_moe(gen, 19, 16, 12, 5, 2, dtype)
        lora = make_moe_lora(gen, 3, 5, 16, 12, [2, 8, 5], dtype)
        slots = make_slot_ids("uniform", 19, 3, gen)
        base = kernels.fused_moe(*args)
        with_lora = kernels.fused_moe(*args, lora=lora, slot_ids=slots)
        none = slots < 0
        assert none.any() and (~none).any()
        assert torch.equal(with_lora[none], base[none])
        assert not torch.equal(with_lora[~none], base[~none])


def test_gate_and_up_use_their_own_a_and_b():
    """Only up's LoRA is non-zero: a kernel that feeds gate's A into up gets a zero delta."""
    gen = torch.Generator().manual_seed(3)
    args = make_moe(gen, 9, 16, 12, 4, 2, torch.float32)
    lora = make_moe_lora(gen, 2, 4, 16, 12, [8, 8], torch.float32)
    lora.gate_up_a.padded[:, :, :8] = 0  # gate's A
    lora.gate_up_b.padded[:, :, :12] = 0  # gate's B
    lora.down_a.padded.zero_()
    slots = torch.zeros(9, dtype=torch.int32)
    got = kernels.fused_moe(*args, lora=lora, slot_ids=slots)
    want = moe_loop_ref(*args, lora, slots)
    base = moe_loop_ref(*args)
    assert rel_err(got - base, want - base) <= 1e-4
    assert rel_err(want, base) > 1e-3


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_ref_matches_loop(spread, dtype):
    gen = torch.Generator().manual_seed(11)
    t, n_in, n_out = 23, 40, 36
    x = torch.randn(t, n_in, generator=gen).to(dtype)
    out = torch.randn(t, n_out, generator=gen).to(dtype)
    lora = make_dense_lora(gen, 4, n_in, n_out, RANKS, dtype)
    slots = make_slot_ids(spread, t, 4, gen)
    want = dense_loop_ref(x, out, lora, slots)
    before = out.clone()
    res = kernels.lora_linear_(x, out, lora, slots)
    assert res is out
    assert rel_err(out, want) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(out[slots < 0], before[slots < 0])


def test_bad_inputs_raise_typed_errors():
    gen = torch.Generator().manual_seed(1)
    hidden, wgu, wd, tw, ids = make_moe(gen, 4, 16, 12, 3, 2, torch.float32)
    with pytest.raises(KernelInputError, match="w_gate_up"):
        kernels.fused_moe(hidden, wgu[:, :5], wd, tw, ids)
    with pytest.raises(KernelInputError, match="dtype"):
        kernels.fused_moe(hidden.half(), wgu, wd, tw, ids)
    lora = make_moe_lora(gen, 2, 3, 16, 12, [4, 4], torch.float32)
    with pytest.raises(KernelInputError, match="slot_ids"):
        kernels.fused_moe(hidden, wgu, wd, tw, ids, lora=lora)
    with pytest.raises(KernelInputError, match="down_a"):
        MoELoRAWeights(lora.gate_up_a, lora.gate_up_b, lora.down_a.padded[:, :, :2], lora.down_b, lora.ranks)
    with pytest.raises(KernelInputError, match="int32"):
        DenseLoRAWeights(torch.zeros(2, 4, 8), torch.zeros(2, 6, 4), torch.ones(2, dtype=torch.int64))
    dense = make_dense_lora(gen, 2, 8, 6, [4, 4], torch.float32)
    with pytest.raises(KernelInputError, match="out must be"):
        kernels.lora_linear_(torch.zeros(3, 8), torch.zeros(3, 7), dense, torch.zeros(3, dtype=torch.int32))


def test_use_triton_follows_device_and_env(monkeypatch):
    monkeypatch.delenv("MOEPLEX_TRITON", raising=False)
    assert not kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("MOEPLEX_TRITON", "1")
    assert kernels.use_triton(torch.zeros(1))
