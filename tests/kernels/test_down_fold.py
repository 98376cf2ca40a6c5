"""kernels/moe/down_fold.py's argument checks (its numerics run in interp_cases.py through
fused_moe_triton's row path, and on the GPU in test_gpu_kernels.py): a wrong shape or dtype is a
KernelInputError before anything launches."""
import pytest
import torch

from kernels import KernelInputError
from kernels.moe.down_fold import rank_block, silu_mul_shrink, topk_sum

S, E, R, I, D, T, K = 3, 4, 16, 24, 20, 5, 2


def _args():
    gen = torch.Generator().manual_seed(0)
    return {"gate_up": torch.randn(T * K, 2 * I, generator=gen), "act": torch.empty(T * K, I),
            "shrunk": torch.zeros(T * K, rank_block(R)), "la": torch.randn(S, E, R, I, generator=gen),
            "lb": torch.randn(S, E, D, R, generator=gen), "ranks": torch.tensor([4, 16, 8], dtype=torch.int32),
            "slots": torch.tensor([0, 1, -1, 2, 0], dtype=torch.int32),
            "ids": torch.randint(0, E, (T, K), generator=gen, dtype=torch.int32),
            "y": torch.randn(T * K, D, generator=gen), "out": torch.empty(T, D), "w": torch.rand(T * K, generator=gen)}


def test_silu_mul_shrink_refuses_a_wrong_shrink_buffer_and_gate_up():
    a = _args()
    with pytest.raises(KernelInputError, match="shrunk must be a contiguous fp32"):
        silu_mul_shrink(a["gate_up"], a["act"], a["shrunk"].half(), a["la"], a["ranks"], a["slots"], a["ids"])
    with pytest.raises(KernelInputError, match="shrunk must be"):
        silu_mul_shrink(a["gate_up"], a["act"], a["shrunk"][:, :8], a["la"], a["ranks"], a["slots"], a["ids"])
    with pytest.raises(KernelInputError, match="gate_up must be"):
        silu_mul_shrink(a["gate_up"][:, :40], a["act"], a["shrunk"], a["la"], a["ranks"], a["slots"], a["ids"])
    with pytest.raises(KernelInputError, match="slot_ids"):
        silu_mul_shrink(a["gate_up"], a["act"], a["shrunk"], a["la"], a["ranks"], a["slots"][:3], a["ids"])


def test_topk_sum_refuses_mismatched_routing_ranks_and_shrink_buffer():
    a = _args()
    lora = lambda **kw: tuple(kw.get(k, a[v]) for k, v in (("lb", "lb"), ("ranks", "ranks"), ("shrunk", "shrunk"),  # noqa: E731
                                                            ("w", "w"), ("slots", "slots"), ("ids", "ids")))
    with pytest.raises(KernelInputError, match="topk_ids must be"):
        topk_sum(a["y"], a["out"], K, lora(ids=a["ids"][:, :1]))
    with pytest.raises(KernelInputError, match="ranks"):
        topk_sum(a["y"], a["out"], K, lora(ranks=a["ranks"][:2]))
    with pytest.raises(KernelInputError, match="fp32"):
        topk_sum(a["y"], a["out"], K, lora(shrunk=a["shrunk"].double()))
    with pytest.raises(KernelInputError, match="y must be"):
        topk_sum(a["y"][:7], a["out"], K)


def test_silu_mul_shrink_refuses_a_gate_up_delta_of_other_rows_columns_or_dtype():
    from kernels.moe.lora_rows import RowPartials
    a = _args()
    for bad in (torch.zeros(T * K - 1, 1, 2 * I), torch.zeros(T * K, 1, 2 * I + 2), torch.zeros(T * K, 1, 2 * I).double()):
        with pytest.raises(KernelInputError, match="gate_up_delta must be"):
            silu_mul_shrink(a["gate_up"], a["act"], a["shrunk"], a["la"], a["ranks"], a["slots"], a["ids"],
                            gate_up_delta=RowPartials(bad, 16, R))
    # slices other than row_slices(R)'s: some of a row's slices would be dropped
    with pytest.raises(KernelInputError, match="gate_up_delta must hold row_slices"):
        silu_mul_shrink(a["gate_up"], a["act"], a["shrunk"], a["la"], a["ranks"], a["slots"], a["ids"],
                        gate_up_delta=RowPartials(torch.zeros(T * K, 2, 2 * I), 16, R))
