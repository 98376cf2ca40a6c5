"""Triton paths of dense LoRA groups (attention q/k/v as one group, o alone) over the virtual-
expert kernels with one expert: rows grouped by slot (DESIGN.md, invariant 6).

Shape legend: T = tokens, S = slots, R = max rank, P = projections of a group, IN = their shared
input width, OUT = the sum of their output sections.
    part [T, P*R] = x @ A[s].T      (per projection h: A rows [h*R, h*R + r_h) of slot s)
    out[:, section h] += part[:, h*R:h*R + r_h] @ B_h[s].T
"""
import torch
import triton
from torch import Tensor

from kernels.errors import expect
from kernels.moe.align import VirtualLayout, moe_align_virtual
from kernels.moe.grouped_gemm import lora_expand_tiles, lora_shrink
from kernels.moe.operands import k_slices
from kernels.moe.launch import LORA_BLOCK_M, ROWS_PROGRAMS, _rank_block
from kernels.moe.lora_rows import MAX_GROUP_ROWS_PROJECTIONS, lora_group_rows_
from kernels.weights import DenseLoRAGroup


def dense_layout(slot_ids: Tensor, num_slots: int) -> VirtualLayout:
    """The virtual layout of dense LoRA (one expert): rows grouped by slot. One step's
    projections share it (q/k/v/o all see the same per-token slots)."""
    one_expert = torch.zeros(slot_ids.shape[0], 1, dtype=torch.int32, device=slot_ids.device)
    return moe_align_virtual(one_expert, slot_ids, 1, LORA_BLOCK_M, num_slots)


def _pow2_divisor(n: int) -> int:
    return n & -n


def group_block_n(sections: tuple[int, ...], most: int = 256) -> int:
    """The N tile of a projection group's launches (the split path's expand; dense_gemm's base, at
    most 64): at most `most` and, with several projections, a divisor of every section end (a tile
    must not straddle two); 0 when none of >= 16 exists."""
    if len(sections) == 1:
        return min(most, max(16, triton.next_power_of_2(sections[0])))
    tile = min(most, *(_pow2_divisor(n) for n in sections[:-1]))
    return tile if tile >= 16 else 0


def group_k_splits(num_in: int) -> int:
    """K slices of a dense shrink: ~256 of K a program, at most 8. At decode size a dense layout
    has few blocks (64 tokens over 16 slots: 20), and one program walking all of K per block is a
    chain of 16 dependent loads (H100: ~10 us for ~0.1 us of bytes)."""
    return max(1, min(8, triton.cdiv(num_in, 256)))


def shrink_partials(x: Tensor, lora: DenseLoRAGroup, k_splits: int, block_k: int) -> tuple[int, Tensor]:
    """(K slice width, fp32 partial sums [slices, T, H*R]) of a group's shrink split over K:
    k_splits slices (0: group_k_splits) of whole block_k tiles, so maybe fewer than asked (k_slices)."""
    chunk, parts = k_slices(x.shape[1], k_splits or group_k_splits(x.shape[1]), block_k)
    part = torch.empty(parts, x.shape[0], lora.num_projections * lora.max_rank, dtype=torch.float32,
                       device=x.device)
    return chunk, part


# Dense LoRA (q/k/v as one group, o): the split path (alignment by slot, once a step; a shrink split
# over K into fp32 partial sums; an expand) or, up to DENSE_ROWS_MAX_TOKENS tokens, the row path (a
# program per (token, projection, column part) that shrinks and expands in one launch,
# kernels/moe/lora_rows.py). On the adapter heap (the engine's default layout) the split path won at
# every size: H200, qwen3 q/k/v + o, 16 adapters (bench_dense_lora.py --layout heap, RESULTS.md), rows
# 20.0 / 20.0 / 22.7 / 51.4 us at M = 1 / 4 / 8 / 64 against the split path's 15.8 / 17.5 / 17.2 / 19.2
# us with its alignment (3.2-4.0 us, which a step shares over its layers); the engine's c_16 decode
# step at batch 8, 48 layers: 10.85 ms with rows up to 8 tokens, 10.17 ms without. On padded stacks
# (lora_layout "slots": every slot at the max rank) the row path won at 8 tokens (rank 16: 17.7
# against 21.6 us; ranks 8-64 in a rank-64 pool: 31.3 against 158.5), so those keep it up to
# DENSE_ROWS_MAX_TOKENS_STACKED. Each row program walks all of K before its expand, where the split
# path spreads K over programs: the row path loses from ~32 tokens on either way.
DENSE_ROWS_MAX_TOKENS = 0
DENSE_ROWS_MAX_TOKENS_STACKED = 8
DENSE_ROWS_TILES = {"block_k": 256, "block_n": 128, "num_warps": 4, "num_stages": 3}
DENSE_PATHS = ("auto", "rows", "split")


def dense_path(num_tokens: int, num_projections: int, stacked: bool = False) -> str:
    """Which path adds a dense group's LoRA delta at this size (see DENSE_PATHS); stacked: the group's
    factors are padded stacks (Factor.stacked), not the adapter heap's."""
    limit = DENSE_ROWS_MAX_TOKENS_STACKED if stacked else DENSE_ROWS_MAX_TOKENS
    ok = num_tokens <= limit and num_projections <= MAX_GROUP_ROWS_PROJECTIONS
    return "rows" if ok else "split"


def dense_row_parts(num_tokens: int, num_projections: int) -> int:
    """Column parts of the widest projection: ~ROWS_PROGRAMS programs a launch, at most 8."""
    return max(1, min(8, ROWS_PROGRAMS // max(1, num_tokens * num_projections)))


def dense_group_triton_(x: Tensor, out: Tensor, lora: DenseLoRAGroup, slot_ids: Tensor,
                        layout: VirtualLayout | None = None, path: str = "auto", pdl_early: bool = False) -> Tensor:
    """Triton twin of lora_group_ref_ by row or by (slot) block (path: DENSE_PATHS; "auto":
    dense_path). layout: the step's dense_layout, used by the split path (computed when None).
    pdl_early: the launch just before writes none of x, the group and slot_ids (kernels/pdl.py)."""
    expect(path in DENSE_PATHS, f"path must be one of {DENSE_PATHS}, got {path!r}")
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return out
    path = dense_path(num_tokens, lora.num_projections, lora.a.stacked) if path == "auto" else path
    if path == "rows":
        return lora_group_rows_(x, out, lora, slot_ids, parts=dense_row_parts(num_tokens, lora.num_projections),
                                pdl_early=pdl_early, **DENSE_ROWS_TILES)
    if layout is None:  # its alignment launches come after the launch ahead
        layout, pdl_early = dense_layout(slot_ids, lora.num_slots), False
    expect(layout.num_rows == num_tokens and layout.block_size == LORA_BLOCK_M,
           f"layout is for {layout.num_rows} rows of block {layout.block_size}; x has {num_tokens} rows")
    return lora_group_triton_(x, out, lora, layout, pdl_early=pdl_early)


# The split path's tiles: the shrink's K slices (group_k_splits), 256-deep K tiles at 2 warps and 2
# stages (`bench_moe_lora.py --sweep-decode`, H100, 16 adapters at M = 64 with cold weights: q/k/v
# 10.1 -> 9.7 us and o 9.1 -> 7.6 us against 128-deep tiles; M = 40: 10.1 -> 9.5, 9.0 -> 7.7); the
# expand's N tile (group_block_n) at 4 warps, one stage.
DENSE_SHRINK = {"block_k": 256, "num_warps": 2, "num_stages": 2}
DENSE_EXPAND = {"num_warps": 4, "num_stages": 1}


def lora_group_triton_(x: Tensor, out: Tensor, lora: DenseLoRAGroup, layout: VirtualLayout, *,
                       k_splits: int = 0, shrink: dict | None = None, expand: dict | None = None,
                       pdl_early: bool = False) -> Tensor:
    """Triton twin of lora_group_ref_ over the step's dense layout (one expert, block 16): the
    virtual-expert shrink split over K for all projections at once, then one expand over the
    projections' sections of out. A group whose sections no 16-column tile divides runs one
    projection at a time. k_splits (0: group_k_splits), shrink (DENSE_SHRINK's keys) and expand
    (DENSE_EXPAND's keys, and block_n) override the tiles, for sweeps. pdl_early: the launch just
    before writes none of x, the group and the layout: the shrink runs beside it (kernels/pdl.py)."""
    num_tokens, num_in = x.shape
    if num_tokens == 0:
        return out
    block_n = group_block_n(lora.sections)
    if block_n == 0:
        for h in range(lora.num_projections):
            lora_group_triton_(x, out[:, lora.offset(h):lora.offset(h + 1)], lora.projection(h), layout,
                               k_splits=k_splits, shrink=shrink, expand=expand, pdl_early=pdl_early)
        return out
    r, heads = lora.max_rank, lora.num_projections
    rb = _rank_block(r)
    shrink = {**DENSE_SHRINK, **(shrink or {})}
    expand = {**DENSE_EXPAND, "block_n": block_n, **(expand or {})}
    ks = k_splits or group_k_splits(num_in)
    part = shrink_partials(x, lora, ks, shrink["block_k"])[1]
    rank_stride = lora.ranks.stride(0)
    # split h: A rows [h*R, h*R + r_h) -> part cols [h*R, h*R + r_h)
    lora_shrink(x, lora.a, part if ks > 1 else part[0], layout, lora.ranks, n=r, k=num_in,
                splits=heads, rank_split_stride=rank_stride, k_splits=ks, block_n=rb, pdl_early=pdl_early, **shrink)
    # section h: part cols [h*R, h*R + r_h) @ B rows of section h -> out cols of section h
    lora_expand_tiles(part, lora.b, out, layout, lora.ranks, n=out.shape[1], k=r,
                      rank_split_stride=rank_stride, a_parts=part.shape[0], sections=lora.sections,
                      block_k=rb, **expand)
    return out
