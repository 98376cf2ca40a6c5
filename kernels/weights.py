"""LoRA weight pools handed to the kernels: per layer or projection, S slots of factors.

A factor (`Factor`) is addressed through a table of element offsets per slot, so a pool can be
either a padded stack [S, E, rows, cols] (every slot at the max rank) or an adapter heap
(engine.lora.slots), where each adapter sits at its own rank wherever its bytes were placed: a
*ranked* factor, whose (slot, expert) matrices are laid out as a padded stack's at the slot's
rank rounded up to RANK_UNIT (or to 8: the RANK_UNIT_8 bit), so its strides are multiples of that. The kernels read both the
same way. A ranked factor may also be *shareable*: a slot whose adapter has one matrix for all
experts of the layer (the shared-outer format's gate/up A and down B) holds it once, told by a
negative rank in the factor's table (expert stride 0 for that slot).

Shape legend: S = adapter slots, E = experts, R = max rank, D = hidden, I = expert intermediate.
"""
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

from kernels.errors import expect

OFFSET_UNIT = 16  # elements; the adapter heap places every factor at a multiple of it
RANK_UNIT = 16  # a ranked factor's slot is laid out at its rank rounded up to a multiple of this
PLAIN, RANKED_ROWS, RANKED_COLS = 0, 1, 2  # Factor.ranked: none, or which axis runs over the rank
# or-ed into a ranked Factor.ranked: its table's negative ranks mark slots that hold one matrix for
# every expert (read at expert stride 0); a compile-time bit, so factors without it read as before
SHAREABLE = 4
# or-ed into a ranked Factor.ranked: its slots are laid out at their rank rounded up to 8, not to
# RANK_UNIT (EngineConfig.lora_rank_unit = 8: a rank-8 adapter's experts take half the bytes; the
# kernels then know strides as multiples of 8 only); a compile-time bit like SHAREABLE
RANK_UNIT_8 = 8
RANK_AXES = 3  # Factor.ranked & RANK_AXES: PLAIN, RANKED_ROWS or RANKED_COLS
RANK_UNITS = (8, RANK_UNIT)  # the units a heap may lay ranks out in


def r16(rank: int, unit: int = RANK_UNIT) -> int:
    """The rank a ranked factor's slot is laid out at: `rank` rounded up to whole units (RANK_UNIT,
    16, unless the factor has the RANK_UNIT_8 bit)."""
    return -(-rank // unit) * unit


@dataclass(slots=True)
class Factor:
    """One LoRA factor (an A or a B) of S slots, E experts and H splits (gate/up halves, or the
    projections of a group). Element (row i, column j) of split h of (slot s, expert e) is

        data.flatten()[offsets[h, s] * offset_unit + e * expert_stride * u_e + (h * split_rows + i) * row_stride * u_r + j * col_stride]

    counted from data's first element, with u_e = u_r = 1 unless the factor is ranked. A padded
    stack has one offsets row (s * its slot stride) and split_rows = rows a split; a heap has a
    row per split (offsets[h] of slot s is where its split h begins) and split_rows = 0, or one
    row and split_rows = N (B, split along N).

    Ranked (a heap's expert factors): slot s's matrices are [E, r16, cols] (RANKED_ROWS, an A) or
    [E, rows, r16] (RANKED_COLS, a B) with r16 = ranks[s] rounded up to RANK_UNIT, so the strides
    that step over the rank count in r16s: u_e = r16 for both, u_r = r16 for RANKED_COLS.
    Ranked | SHAREABLE: ranks[s] < 0 means slot s holds one matrix [1, ...] at rank -ranks[s]
    that every expert reads (u_e = 0). Ranked | RANK_UNIT_8: r16 is ranks[s] rounded up to 8."""

    data: Tensor
    offsets: Tensor  # int64 [1 or H, S], on data's device
    expert_stride: int
    row_stride: int
    col_stride: int
    split_rows: int
    shape: tuple[int, int, int, int]  # (S, E, rows of all splits, cols): the padded stack's shape
    padded: Tensor | None = None  # the padded stack it was made of, if any (tests read it)
    # offsets count in units of this many elements: 16 where every slot starts 16-aligned, which
    # the kernels then know at compile time (vector loads, as strides divisible by 16 give)
    offset_unit: int = 1
    ranked: int = 0  # PLAIN, RANKED_ROWS or RANKED_COLS, the latter two maybe | SHAREABLE
    ranks: Tensor | None = None  # int32 [S] on data's device: a ranked factor's slot ranks (< 0: shared)
    stacked: bool = False  # a padded stack's own factor (Factor.of): every slot laid out at the max rank

    def __post_init__(self) -> None:
        expect(self.ranked == PLAIN or (self.ranked & RANK_AXES in (RANKED_ROWS, RANKED_COLS)
                                        and self.ranked & ~(RANK_AXES | SHAREABLE | RANK_UNIT_8) == 0),
               f"ranked must be 0, or 1 or 2 with the bits 4 and 8, got {self.ranked}")
        expect((self.ranks is not None) == (self.ranked != PLAIN), "a ranked factor, and only one, has ranks")
        if self.ranks is not None:
            _check_ranks(self.ranks, self.shape[0], self.data.device)
        expect(self.offsets.dim() == 2 and self.offsets.dtype == torch.int64
               and self.offsets.shape[1] == self.shape[0],
               f"offsets must be int64 [H, S={self.shape[0]}], got {self.offsets.dtype} {tuple(self.offsets.shape)}")
        expect(self.offsets.device == self.data.device, f"offsets must live on {self.data.device}")

    @classmethod
    def of(cls, stack: Tensor, split_rows: int) -> "Factor":
        """The factor of a padded stack [S, E, rows, cols] (or [S, rows, cols]: one expert)."""
        w = stack.unsqueeze(1) if stack.dim() == 3 else stack
        expect(w.dim() == 4, f"a factor stack must be [S, E, rows, cols], got {tuple(stack.shape)}")
        unit = OFFSET_UNIT if w.stride(0) % OFFSET_UNIT == 0 else 1
        offsets = (torch.arange(w.shape[0], device=w.device, dtype=torch.int64) * (w.stride(0) // unit))[None]
        return cls(w, offsets, w.stride(1), w.stride(2), w.stride(3), split_rows, tuple(w.shape), stack, unit,
                   stacked=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def operand(self) -> tuple:
        """The kernels' tuple: (data, offsets, offsets' split stride (0: one row for all
        splits), expert stride, row stride, column stride, rows a split steps by, offset unit,
        ranked (a compile-time constant), the slot ranks of a ranked factor (else None))."""
        split_stride = self.offsets.stride(0) if self.offsets.shape[0] > 1 else 0
        return (self.data, self.offsets, split_stride, self.expert_stride, self.row_stride, self.col_stride,
                self.split_rows, self.offset_unit, tl.constexpr(self.ranked), self.ranks)

    @property
    def rank_unit(self) -> int:
        """What a ranked factor's slot ranks are rounded up to in its layout."""
        return 8 if self.ranked & RANK_UNIT_8 else RANK_UNIT

    def strides(self, slot: int) -> tuple[int, int]:
        """(expert stride, row stride) of slot `slot`'s matrices (a host read of its rank when
        ranked: for the torch references and tests, never inside a CUDA graph)."""
        if self.ranked == PLAIN:
            return self.expert_stride, self.row_stride
        signed = int(self.ranks[slot])
        rank = r16(abs(signed), self.rank_unit)
        expert_stride = 0 if signed < 0 and self.ranked & SHAREABLE else self.expert_stride * rank
        return expert_stride, self.row_stride * (rank if self.ranked & RANK_AXES == RANKED_COLS else 1)

    def view(self, slot: int, split: int, rows: int, cols: int) -> Tensor:
        """Split `split` of slot `slot` as an [E, rows, cols] view (host read of the offsets:
        for the torch references and tests, never inside a CUDA graph)."""
        table = self.offsets[min(split, self.offsets.shape[0] - 1)]
        expert_stride, row_stride = self.strides(slot)
        start = int(table[slot]) * self.offset_unit + split * self.split_rows * row_stride
        return torch.as_strided(self.data, (self.shape[1], rows, cols), (expert_stride, row_stride, self.col_stride),
                                self.data.storage_offset() + start)

    def select(self, split: int, rows: int, first_row: int = 0) -> "Factor":
        """`rows` rows of split `split` from `first_row` on, as a one-split factor (views)."""
        row_offsets = self.offsets[min(split, self.offsets.shape[0] - 1)][None]
        shift = (split * self.split_rows + first_row) * self.row_stride
        expect(shift == 0 or self.ranked & RANK_AXES != RANKED_COLS,
               "a RANKED_COLS factor's rows step by its slots' ranks")
        data = torch.as_strided(self.data, (1,), (1,), self.data.storage_offset() + shift)
        return Factor(data, row_offsets, self.expert_stride, self.row_stride, self.col_stride, 0,
                      (self.shape[0], self.shape[1], rows, self.shape[3]), offset_unit=self.offset_unit,
                      ranked=self.ranked, ranks=self.ranks, stacked=self.stacked)


def as_factor(x: "Tensor | Factor", split_rows: int) -> Factor:
    """x itself, or the Factor of a padded stack x whose splits step by split_rows rows."""
    return x if isinstance(x, Factor) else Factor.of(x, split_rows)


@dataclass(slots=True)
class MoELoRAWeights:
    """LoRA slots of one MoE layer. Scaling already folded into B. Given padded stacks:

    gate_up_a [S, E, 2*R, D] (rows [0, R) gate's A, [R, 2R) up's A), gate_up_b [S, E, 2*I, R]
    (rows [0, I) gate's B, [I, 2I) up's B), down_a [S, E, R, I], down_b [S, E, D, R]; or Factors
    of those logical shapes (an adapter heap). ranks [S] int32: slot s's rank r_s <= R; A rows
    and B columns at or past r_s are never read. shared_halves (host side): some slot may hold a
    shared-outer adapter (gate/up A or down B one matrix for every expert, the factors' SHAREABLE
    tables): above decode size its shrink of x then runs once a token and its expand of the down
    projection once a token (kernels.moe.launch); False keeps every row's own (correct either way)."""

    gate_up_a: "Tensor | Factor"
    gate_up_b: "Tensor | Factor"
    down_a: "Tensor | Factor"
    down_b: "Tensor | Factor"
    ranks: Tensor
    shared_halves: bool = False

    def __post_init__(self) -> None:
        for name in ("gate_up_a", "gate_up_b", "down_a", "down_b"):
            x = getattr(self, name)
            expect(isinstance(x, Factor) or x.dim() == 4, f"{name} must be [S, E, rows, cols], got {tuple(x.shape)}")
        s, e, two_r, d = self.gate_up_a.shape
        expect(two_r % 2 == 0, f"gate_up_a dim 2 must be 2*R (even), got {two_r}")
        r = two_r // 2
        gub = self.gate_up_b.shape
        expect(len(gub) == 4 and gub[:2] == (s, e) and gub[3] == r and gub[2] % 2 == 0,
               f"gate_up_b must be [S={s}, E={e}, 2I, R={r}], got {tuple(gub)}")
        i = gub[2] // 2
        expect(tuple(self.down_a.shape) == (s, e, r, i),
               f"down_a must be [S, E, R, I] = {(s, e, r, i)}, got {tuple(self.down_a.shape)}")
        expect(tuple(self.down_b.shape) == (s, e, d, r),
               f"down_b must be [S, E, D, R] = {(s, e, d, r)}, got {tuple(self.down_b.shape)}")
        self.gate_up_a, self.down_a = as_factor(self.gate_up_a, r), as_factor(self.down_a, r)
        self.gate_up_b, self.down_b = as_factor(self.gate_up_b, i), as_factor(self.down_b, d)
        _check_ranks(self.ranks, s, self.gate_up_a.device)

    @property
    def num_slots(self) -> int:
        return self.gate_up_a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.gate_up_a.shape[2] // 2


@dataclass(slots=True)
class DenseLoRAWeights:
    """LoRA slots of one dense projection (q/k/v/o, dense MLP, shared expert): a [S, R, IN],
    b [S, OUT, R] (scaling folded in) as padded stacks or Factors; ranks [S] int32."""

    a: "Tensor | Factor"
    b: "Tensor | Factor"
    ranks: Tensor

    def __post_init__(self) -> None:
        s, _, r, _ = _shape4(self.a)
        bs = _shape4(self.b)
        expect(bs[0] == s and bs[3] == r, f"b must be [S={s}, OUT, R={r}], got {tuple(self.b.shape)}")
        self.a, self.b = as_factor(self.a, r), as_factor(self.b, bs[2])
        _check_ranks(self.ranks, s, self.a.device)

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.a.shape[2]

    @property
    def out_features(self) -> int:
        return self.b.shape[2]

    @property
    def in_features(self) -> int:
        return self.a.shape[3]


@dataclass(slots=True)
class DenseLoRAGroup:
    """LoRA slots of H dense projections that read the same input, their outputs side by side
    in one row (q/k/v of an attention layer as one fused GEMM writes them). Padded stacks:
    a [S, H*R, IN] (rows [h*R, (h+1)*R) projection h's A), b [S, N, R] with N = sum(sections)
    (rows [off_h, off_h + N_h) projection h's B); or Factors of those shapes whose b has one
    offsets row (column n of every projection at row n). ranks [H, S] int32 (0: the adapter
    leaves projection h alone)."""

    a: "Tensor | Factor"
    b: "Tensor | Factor"
    ranks: Tensor
    sections: tuple[int, ...]  # N_h, the output features of each projection

    def __post_init__(self) -> None:
        s, _, hr, _ = _shape4(self.a)
        heads, r = len(self.sections), _shape4(self.b)[3]
        expect(heads >= 1 and hr == heads * r, f"a must be [S, H*R = {heads}*{r}, IN], got {tuple(self.a.shape)}")
        expect(_shape4(self.b)[0] == s and _shape4(self.b)[2] == sum(self.sections),
               f"b must be [S={s}, N={sum(self.sections)}, R], got {tuple(self.b.shape)}")
        self.a, self.b = as_factor(self.a, r), as_factor(self.b, 0)
        expect(tuple(self.ranks.shape) == (heads, s) and self.ranks.dtype == torch.int32,
               f"ranks must be int32 [H={heads}, S={s}], got {self.ranks.dtype} {tuple(self.ranks.shape)}")
        expect(self.ranks.device == self.a.device, f"ranks must live on {self.a.device}, got {self.ranks.device}")

    @classmethod
    def of(cls, lora: DenseLoRAWeights) -> "DenseLoRAGroup":
        """A group of one projection."""
        return cls(lora.a, lora.b, lora.ranks.unsqueeze(0), (lora.out_features,))

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.b.shape[3]

    @property
    def num_projections(self) -> int:
        return len(self.sections)

    @property
    def in_features(self) -> int:
        return self.a.shape[3]

    def offset(self, h: int) -> int:
        """First output column of projection h (h = H gives N)."""
        return sum(self.sections[:h])

    def projection(self, h: int) -> "DenseLoRAGroup":
        return DenseLoRAGroup.of(self.dense(h))

    def dense(self, h: int) -> DenseLoRAWeights:
        """Projection h's pools as views."""
        a = self.a.select(h, self.max_rank)
        b = self.b.select(0, self.sections[h], first_row=self.offset(h))
        return DenseLoRAWeights(a, b, self.ranks[h])


def _shape4(x: "Tensor | Factor") -> tuple[int, int, int, int]:
    """[S, E, rows, cols] of a factor or a padded stack ([S, rows, cols]: one expert)."""
    if isinstance(x, Factor):
        return x.shape
    expect(x.dim() in (3, 4), f"a LoRA stack must be [S, rows, cols] or [S, E, rows, cols], got {tuple(x.shape)}")
    return tuple(x.shape) if x.dim() == 4 else (x.shape[0], 1, x.shape[1], x.shape[2])


def _check_ranks(ranks: Tensor, num_slots: int, device: torch.device) -> None:
    expect(ranks.dim() == 1 and ranks.shape[0] == num_slots,
            f"ranks must be [S={num_slots}], got {tuple(ranks.shape)}")
    expect(ranks.dtype == torch.int32, f"ranks must be int32, got {ranks.dtype}")
    expect(ranks.device == device, f"ranks must live on {device}, got {ranks.device}")
