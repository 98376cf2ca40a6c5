"""Dense LoRA (q/k/v as one group, o alone) at decode size with its expand folded into the
launch that reads the projection's output next.

T = tokens, H = projections of the group, R = the pool's largest rank, P = K slices of the
shrink, s = slot_ids[t], r_h = ranks[h, s], N = sum of the group's sections.
    dense_fold_shrink:  part[p, t, h*R:h*R + r_h] = x[t, K slice p] @ A_h[s, :r_h, K slice p].T  (fp32)
    (the consumer)      y[t, n] = y[t, n] + sum_j part[:, t, h*R + j].sum().to(B) * B[s, n, j]
                        for n in projection h's columns, in fp32 and rounded once to y's dtype,
                        before the consumer's own arithmetic (`fold_delta`)

Why: at decode (64 tokens over 16 adapters) the split path's expand is a launch of its own
(~5 us on the H200 for < 1 us of B bytes), and the launches after q/k/v (the norm, rotary and KV
write) and after o (the residual add and norm) read every column of the projection's output
anyway. They take the delta in the same pass: a token reads its slot's B columns (from L2: the
tokens of a slot share them), the shrink's partial sums, and writes nothing extra. Above
DENSE_FOLD_MAX_TOKENS each token reading its own B would cost more than the split expand's
one read per (slot, 16 rows); below DENSE_ROWS_MAX_TOKENS the row path's one launch does shrink
and expand together. A token without an adapter (or with rank 0 for a projection) gets no
delta and the consumer's arithmetic unchanged, so it is bitwise equal to a run without LoRA.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.errors import expect
from kernels.moe.align import VirtualLayout
from kernels.moe.dense_launch import DENSE_ROWS_MAX_TOKENS, group_k_splits
from kernels.moe.grouped_gemm import lora_shrink
from kernels.moe.launch import LORA_BLOCK_M, SHRINK, _rank_block
from kernels.moe.operands import factor_at, k_slices
from kernels.weights import DenseLoRAGroup, Factor

# Tokens up to which a dense group's expand is folded into its consumer (above: the split path).
DENSE_FOLD_MAX_TOKENS = 128


@dataclass(slots=True)
class DenseFold:
    """A dense group's shrink, waiting for its consumer to add the expand (module docstring)."""

    part: Tensor  # [P, T, H*R] fp32 partial sums over K slices
    b: Factor  # the group's B, logical [S, 1, N, R]; scaling folded in
    ranks: Tensor  # [H, S] int32
    slot_ids: Tensor  # [T] int, -1 for no adapter
    sections: tuple[int, ...]  # N_h, the output features of each projection

    @property
    def max_rank(self) -> int:
        return self.b.shape[3]

    @property
    def parts(self) -> int:
        return self.part.shape[0]

    def operands(self) -> tuple:
        """The kernels' arguments after the output's: P = (part, part stride, token stride), LB
        (Factor.operand), ranks, their projection stride, slot_ids, S, R; the kernels take the
        part count (`parts`) as a compile-time constant."""
        part = (self.part, self.part.stride(0), self.part.stride(1))
        return (part, self.b.operand(), self.ranks, self.ranks.stride(0), self.slot_ids, self.b.shape[0],
                self.max_rank)

    def check(self, num_tokens: int, sections: tuple[int, ...], dtype: torch.dtype) -> None:
        expect(self.sections == sections, f"the fold is for sections {self.sections}, its consumer has {sections}")
        expect(self.part.shape[1] == num_tokens and self.slot_ids.shape[0] == num_tokens,
               f"the fold is for {self.part.shape[1]} tokens, its consumer has {num_tokens}")
        expect(self.b.dtype == dtype, f"the fold's B is {self.b.dtype}, its consumer's output {dtype}")


def dense_fold_path(num_tokens: int, layout: VirtualLayout | None) -> bool:
    """Whether a dense group's expand at this size goes to its consumer: the split path's sizes
    (a step layout exists) up to DENSE_FOLD_MAX_TOKENS."""
    return layout is not None and DENSE_ROWS_MAX_TOKENS < num_tokens <= DENSE_FOLD_MAX_TOKENS


def dense_fold_shrink(x: Tensor, lora: DenseLoRAGroup, slot_ids: Tensor, layout: VirtualLayout) -> DenseFold:
    """The group's shrink (the split path's, K split over programs) for a consumer to expand.

    Semantics: see the module docstring; part columns at or past a slot's rank, and rows of
    tokens without an adapter, are not written (the consumer masks them).
    Args:
        x: [T, IN] fp32/fp16/bf16, lora's dtype. lora: DenseLoRAGroup (a [S, H*R, IN]).
        slot_ids: [T] int, -1 for no adapter. layout: the step's dense_layout of slot_ids.
    """
    num_tokens, num_in = x.shape
    expect(layout.num_rows == num_tokens and layout.block_size == LORA_BLOCK_M,
           f"layout is for {layout.num_rows} rows of block {layout.block_size}; x has {num_tokens} rows")
    r, heads = lora.max_rank, lora.num_projections
    ks = group_k_splits(num_in)
    parts = k_slices(num_in, ks, SHRINK["block_k"])[1]
    part = torch.empty(parts, num_tokens, heads * r, dtype=torch.float32, device=x.device)
    if num_tokens:
        lora_shrink(x, lora.a, part if ks > 1 else part[0], layout, lora.ranks, n=r, k=num_in, splits=heads,
                    rank_split_stride=lora.ranks.stride(0), k_splits=ks, block_n=_rank_block(r),
                    block_k=SHRINK["block_k"], num_warps=2, num_stages=2)
    return DenseFold(part, lora.b, lora.ranks, slot_ids, lora.sections)


@triton.jit
def fold_delta(P, LB, ranks_ptr, rank_stride, slot_ids_ptr, num_slots, big_r, tok, proj, cols, mask,
               BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, PARTS: tl.constexpr):
    """(delta [BLOCK_H, C] fp32, live [BLOCK_H]) of token tok at the group's output columns cols
    [BLOCK_H, C] (mask: which exist), row i of them in projection proj[i]; live: the row has a
    delta (its slot is in range and its projection's rank > 0). Straight-line: the PARTS partial
    sums and the [BLOCK_H, C, BLOCK_R] tile of B are each one load, all in flight together (a
    loop over the rank, a load an iteration, cost ~0.7 ms a decode step on the H200); a token
    without an adapter has every B lane masked off and loads no B."""
    slot = tl.load(slot_ids_ptr + tok).to(tl.int64)
    slot_ok = (slot >= 0) & (slot < num_slots)
    slot = tl.where(slot_ok, slot, 0)
    rank = tl.where(slot_ok, tl.minimum(tl.load(ranks_ptr + proj * rank_stride + slot), big_r), 0)  # [BLOCK_H]
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r[None, :] < rank[:, None]  # [BLOCK_H, BLOCK_R]
    shrunk = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    part_rows = P[0] + tok * P[2] + proj[:, None] * big_r + offs_r[None, :]
    for p in tl.static_range(PARTS):
        shrunk += tl.load(part_rows + p * P[1], mask=r_ok, other=0.0)
    # the shrink rounds to B's dtype, as the split path's expand reads it
    shrunk = shrunk.to(LB[0].dtype.element_ty).to(tl.float32)
    lb_base, lb_rows = factor_at(LB, slot, 0, 0)  # B rows are the group's output columns
    b = tl.load(lb_base + cols[:, :, None] * lb_rows + offs_r[None, None, :] * LB[5],
                mask=mask[:, :, None] & r_ok[:, None, :], other=0.0)
    return tl.sum(b.to(tl.float32) * shrunk[:, None, :], axis=2), rank > 0


def fold_expand_ref_(y: Tensor, fold: DenseFold) -> Tensor:
    """Torch twin of the consumers' fold: y [T, N] += each token's delta from the fold's partial
    sums (module docstring), in fp32, rounded once to y's dtype; in place; returns y. Reads the
    ranks and slots on the host: for tests and the torch paths, not for graphs."""
    shrunk = fold.part.sum(0)  # [T, H*R]
    big_r, num_slots = fold.max_rank, fold.b.shape[0]
    ranks = fold.ranks.tolist()
    for t, s in enumerate(fold.slot_ids.tolist()):
        if not 0 <= s < num_slots:
            continue
        start = 0
        for h, width in enumerate(fold.sections):
            r = min(ranks[h][s], big_r)
            if r > 0:
                b = fold.b.view(s, 0, sum(fold.sections), r)[0, start:start + width].float()  # [N_h, r]
                s_h = shrunk[t, h * big_r:h * big_r + r].to(fold.b.dtype).float()
                y[t, start:start + width] = (y[t, start:start + width].float() + b @ s_h).to(y.dtype)
            start += width
    return y
