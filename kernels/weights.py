"""LoRA weight pools handed to the kernels (one pool of S slots per layer or projection)."""
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.errors import expect

# Shape legend: S = adapter slots, E = experts, R = max rank, D = hidden, I = expert intermediate.


@dataclass(slots=True)
class MoELoRAWeights:
    """LoRA slots of one MoE layer (a GPU pool of S slots). Scaling already folded into B."""

    gate_up_a: Tensor  # [S, E, 2*R, D]: rows [0, R) gate's A, rows [R, 2R) up's A
    gate_up_b: Tensor  # [S, E, 2*I, R]: rows [0, I) gate's B, rows [I, 2I) up's B
    down_a: Tensor  # [S, E, R, I]
    down_b: Tensor  # [S, E, D, R]
    ranks: Tensor  # [S] int32: slot s's rank r_s <= R; A rows / B cols >= r_s are zero

    def __post_init__(self) -> None:
        expect(self.gate_up_a.dim() == 4, f"gate_up_a must be [S, E, 2R, D], got {tuple(self.gate_up_a.shape)}")
        s, e, two_r, d = self.gate_up_a.shape
        expect(two_r % 2 == 0, f"gate_up_a dim 2 must be 2*R (even), got {two_r}")
        r = two_r // 2
        expect(self.gate_up_b.dim() == 4 and self.gate_up_b.shape[:2] == (s, e)
                and self.gate_up_b.shape[3] == r and self.gate_up_b.shape[2] % 2 == 0,
                f"gate_up_b must be [S={s}, E={e}, 2I, R={r}], got {tuple(self.gate_up_b.shape)}")
        i = self.gate_up_b.shape[2] // 2
        expect(tuple(self.down_a.shape) == (s, e, r, i),
                f"down_a must be [S, E, R, I] = {(s, e, r, i)}, got {tuple(self.down_a.shape)}")
        expect(tuple(self.down_b.shape) == (s, e, d, r),
                f"down_b must be [S, E, D, R] = {(s, e, d, r)}, got {tuple(self.down_b.shape)}")
        _check_ranks(self.ranks, s, self.gate_up_a.device)

    @property
    def num_slots(self) -> int:
        return self.gate_up_a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.gate_up_a.shape[2] // 2


@dataclass(slots=True)
class DenseLoRAWeights:
    """LoRA slots of one dense projection (q/k/v/o, dense MLP, shared expert)."""

    a: Tensor  # [S, R, IN]
    b: Tensor  # [S, OUT, R] (scaling folded in)
    ranks: Tensor  # [S] int32

    def __post_init__(self) -> None:
        expect(self.a.dim() == 3, f"a must be [S, R, IN], got {tuple(self.a.shape)}")
        s, r, _ = self.a.shape
        expect(self.b.dim() == 3 and self.b.shape[0] == s and self.b.shape[2] == r,
                f"b must be [S={s}, OUT, R={r}], got {tuple(self.b.shape)}")
        _check_ranks(self.ranks, s, self.a.device)

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.a.shape[1]


def _check_ranks(ranks: Tensor, num_slots: int, device: torch.device) -> None:
    expect(ranks.dim() == 1 and ranks.shape[0] == num_slots,
            f"ranks must be [S={num_slots}], got {tuple(ranks.shape)}")
    expect(ranks.dtype == torch.int32, f"ranks must be int32, got {ranks.dtype}")
    expect(ranks.device == device, f"ranks must live on {device}, got {ranks.device}")
