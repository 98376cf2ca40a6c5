"""Triton paths of dense LoRA groups (attention q/k/v as one group, o alone) over the virtual-
expert kernels with one expert: rows grouped by slot (DESIGN.md, invariant 6).

Shape legend: T = tokens, S = slots, R = max rank, P = projections of a group, IN = their shared
input width, OUT = the sum of their output sections.
    part [T, P*R] = x @ A[s].T      (per projection h: A rows [h*R, h*R + r_h) of slot s)
    out[:, section h] += part[:, h*R:h*R + r_h] @ B_h[s].T
"""
import os

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
    shrink = {**DENSE_SHRINK, **(shrink or {})}
    ks = k_splits or group_k_splits(num_in)
    part = shrink_partials(x, lora, ks, shrink["block_k"])[1]
    group_shrink(x, part, lora, layout, ks, shrink, pdl_early)
    return group_expand_(part, out, lora, layout, {**DENSE_EXPAND, "block_n": block_n, **(expand or {})})


def group_shrink(x: Tensor, part: Tensor, lora: DenseLoRAGroup, layout: VirtualLayout, k_splits: int,
                 shrink: dict, pdl_early: bool) -> None:
    """The split path's first launch: part (shrink_partials') = x's rows @ their slots' A, summed per
    K slice. Reads only x, the group's A and ranks, and the layout."""
    # split h: A rows [h*R, h*R + r_h) -> part cols [h*R, h*R + r_h)
    lora_shrink(x, lora.a, part if k_splits > 1 else part[0], layout, lora.ranks, n=lora.max_rank, k=x.shape[1],
                splits=lora.num_projections, rank_split_stride=lora.ranks.stride(0), k_splits=k_splits,
                block_n=_rank_block(lora.max_rank), pdl_early=pdl_early, **shrink)


def group_expand_(part: Tensor, out: Tensor, lora: DenseLoRAGroup, layout: VirtualLayout, expand: dict) -> Tensor:
    """The split path's second launch: out's sections += part's slices summed @ their slots' B, in
    place; returns out."""
    r = lora.max_rank
    # section h: part cols [h*R, h*R + r_h) @ B rows of section h -> out cols of section h
    lora_expand_tiles(part, lora.b, out, layout, lora.ranks, n=out.shape[1], k=r,
                      rank_split_stride=lora.ranks.stride(0), a_parts=part.shape[0], sections=lora.sections,
                      block_k=_rank_block(r), **expand)
    return out


# The split path's shrink on a second stream beside the base GEMM (linear_group_side_): off, as it
# measured even with one stream (H100, 16 adapters at batch 64: decode step 19.25 against 19.28 ms,
# 2026-12-07; MOEPLEX_DENSE_SIDE_STREAM=1, bench_engine.py's mode fused_dense_side).
SIDE_STREAM = os.environ.get("MOEPLEX_DENSE_SIDE_STREAM", "0") == "1"


def side_stream_ok(x: Tensor, lora: DenseLoRAGroup, layout: VirtualLayout | None) -> bool:
    """Whether linear_lora takes linear_group_side_: SIDE_STREAM on, CUDA, the step's layout given
    (its alignment made once a step, not here) and the split path with one expand for the group."""
    return (SIDE_STREAM and x.device.type == "cuda" and layout is not None and x.shape[0] > 0
            and dense_path(x.shape[0], lora.num_projections, lora.a.stacked) == "split"
            and group_block_n(lora.sections) > 0)


def linear_group_side_(x: Tensor, weight: Tensor, bias: Tensor | None, lora: DenseLoRAGroup,
                       layout: VirtualLayout) -> Tensor:
    """F.linear(x, weight, bias) plus the group's LoRA delta, lora_group_triton_'s split path, with
    its shrink on a second stream beside the base GEMM.

    Why: the shrink reads only x, and at decode size it is a chain of dependent loads of a few
    microseconds that waits for cuBLAS, which lets no launch after it start early (kernels/pdl.py).
    On a stream of its own it runs while the GEMM does; the expand, which adds into the GEMM's
    output, runs once both are done. The streams join before this returns (in a CUDA graph: a fork
    and a join of the graph). The partial sums are made on the calling stream before the fork and
    freed after the join, so the caching allocator hands their memory to nothing still running."""
    expect(layout.num_rows == x.shape[0] and layout.block_size == LORA_BLOCK_M,
           f"layout is for {layout.num_rows} rows of block {layout.block_size}; x has {x.shape[0]} rows")
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    ks = group_k_splits(x.shape[1])
    part = shrink_partials(x, lora, ks, DENSE_SHRINK["block_k"])[1]
    side.wait_stream(main)
    with torch.cuda.stream(side):
        group_shrink(x, part, lora, layout, ks, DENSE_SHRINK, False)
    out = torch.nn.functional.linear(x, weight, bias)
    main.wait_stream(side)
    return group_expand_(part, out, lora, layout, {**DENSE_EXPAND, "block_n": group_block_n(lora.sections)})


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]
