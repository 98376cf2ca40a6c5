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


@dataclass(slots=True)
class DenseLoRAGroup:
    """LoRA slots of H dense projections that read the same input, their outputs side by side
    in one row (q/k/v of an attention layer as one fused GEMM writes them)."""

    a: Tensor  # [S, H*R, IN]: rows [h*R, (h+1)*R) are projection h's A
    b: Tensor  # [S, N, R], N = sum(sections): rows [off_h, off_h + N_h) are projection h's B
    ranks: Tensor  # [H, S] int32: projection h's rank in slot s (0: the adapter leaves it alone)
    sections: tuple[int, ...]  # N_h, the output features of each projection

    def __post_init__(self) -> None:
        expect(self.a.dim() == 3 and self.b.dim() == 3, "a must be [S, H*R, IN] and b [S, N, R]")
        s, hr, _ = self.a.shape
        heads, r = len(self.sections), self.b.shape[2]
        expect(heads >= 1 and hr == heads * r, f"a must be [S, H*R = {heads}*{r}, IN], got {tuple(self.a.shape)}")
        expect(self.b.shape[0] == s and self.b.shape[1] == sum(self.sections),
               f"b must be [S={s}, N={sum(self.sections)}, R], got {tuple(self.b.shape)}")
        expect(tuple(self.ranks.shape) == (heads, s) and self.ranks.dtype == torch.int32,
               f"ranks must be int32 [H={heads}, S={s}], got {self.ranks.dtype} {tuple(self.ranks.shape)}")
        expect(self.ranks.device == self.a.device, f"ranks must live on {self.a.device}, got {self.ranks.device}")

    @classmethod
    def of(cls, lora: DenseLoRAWeights) -> "DenseLoRAGroup":
        """A group of one projection."""
        return cls(lora.a, lora.b, lora.ranks.unsqueeze(0), (lora.b.shape[1],))

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.b.shape[2]

    @property
    def num_projections(self) -> int:
        return len(self.sections)

    def offset(self, h: int) -> int:
        """First output column of projection h (h = H gives N)."""
        return sum(self.sections[:h])

    def projection(self, h: int) -> "DenseLoRAGroup":
        return DenseLoRAGroup.of(self.dense(h))

    def dense(self, h: int) -> DenseLoRAWeights:
        """Projection h's pools as views."""
        r = self.max_rank
        return DenseLoRAWeights(self.a[:, h * r:(h + 1) * r], self.b[:, self.offset(h):self.offset(h + 1)],
                                self.ranks[h])


def _check_ranks(ranks: Tensor, num_slots: int, device: torch.device) -> None:
    expect(ranks.dim() == 1 and ranks.shape[0] == num_slots,
            f"ranks must be [S={num_slots}], got {tuple(ranks.shape)}")
    expect(ranks.dtype == torch.int32, f"ranks must be int32, got {ranks.dtype}")
    expect(ranks.device == device, f"ranks must live on {device}, got {ranks.device}")
