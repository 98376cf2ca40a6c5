"""LoRA expand over a VirtualLayout: one program owns a block and loops over its N tiles.

For each block b (pair (s, e) = (block_slot[b], block_expert[b]), rows = sorted_ids[b*BM:(b+1)*BM])
and each split h (gate/up halves: splits = 2; one otherwise), with r_s = ranks[s]:
    c[rows, h*N + n] (+)= scale[rows] * shrunk[rows, h*R + :r_s] @ B[s, e, h*N + n, :r_s].T
The same product as grouped_gemm.lora_expand_tiles: shrunk cast to B's dtype, one
dot over the rank tile into fp32, times scale, plus the prior value, one rounding to c's dtype.

Why not lora_expand_tiles' (block, n-tile) grid: an expand tile is one K step of 16 on a block of
~1-8 valid rows, so every tile paid the block's metadata chain (slot -> rank, ids -> scale, rows)
and the shrunk rows before its first B byte. Here a program loads those once and streams B and the
c rows of its block's tiles through one loop; the grid is persistent over blocks.
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.moe.align import VirtualLayout
from kernels.errors import expect
from kernels.moe.operands import factor_at, num_programs
from kernels.weights import RANK_AXES, RANKED_COLS, Factor, as_factor


@triton.jit
def _tile_cols(t, t_end, num_n, N, BLOCK_N: tl.constexpr):
    """Columns of tile t (split t // num_n) in B's rows and c's columns, and which are live."""
    h = t // num_n
    offs_n = (t - h * num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    # a tile past t_end (the prefetch after the last) is all masked; a scalar limit, not a
    # scalar `&`, which the interpreter turns into an int32 mask
    return h * N + offs_n, offs_n < tl.where(t < t_end, N, 0)


@triton.jit
def _tile_load(B, C, rows, row_ok, r_ok, r_read, t, t_end, num_n, N, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """B tile [BLOCK_R, BLOCK_N] with padded ranks zeroed, and the prior c tile in fp32;
    B = (the pair's row 0, its row stride, its column stride)."""
    cols, n_ok = _tile_cols(t, t_end, num_n, N, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    # rank mask in whole 16-byte groups (vector loads); ranks in [r_s, read end) are zeroed below
    b = tl.load(B[0] + cols[None, :] * B[1] + offs_r[:, None] * B[2],
                mask=r_read[:, None] & n_ok[None, :], other=0.0)
    b = tl.where(r_ok[:, None], b, tl.zeros_like(b))
    prior = tl.load(C[0] + rows[:, None] * C[1] + cols[None, :] * C[2],
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    return b, prior


@triton.jit
def _tile_store(a0, a1, b, prior, row_scale, C, rows, row_ok, t, t_end, num_n, N, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                HAS_SCALE: tl.constexpr, IEEE: tl.constexpr):
    """c tile = (shrunk_h @ B tile) * scale + prior, in lora_expand_tiles' order of operations."""
    cols, n_ok = _tile_cols(t, t_end, num_n, N, BLOCK_N)
    a = a0
    if NUM_SPLITS == 2:
        a = tl.where(t // num_n == 0, a0, a1)
    if IEEE:
        acc = tl.dot(a, b, input_precision="ieee")
    else:
        acc = tl.dot(a, b)
    if HAS_SCALE:
        acc = acc * row_scale[:, None]
    acc += prior
    tl.store(C[0] + rows[:, None] * C[1] + cols[None, :] * C[2],
             acc.to(C[0].dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# Operands are tuples: S, C = (ptr, row stride, column stride); W = B (Factor.operand);
# lay = the layout's (sorted_ids, block_expert, block_slot, num_blocks)
@triton.jit(do_not_specialize=["num_rows"])  # one compile for every token count
def _lora_expand_kernel(S, W, C, scale_ptr, ranks_ptr, lay, num_rows, N, R, parts,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, RANK_GRAIN: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_SCALE: tl.constexpr,
                        IEEE: tl.constexpr, PREFETCH: tl.constexpr):
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = NUM_SPLITS * num_n  # a block's tiles, split-major: gate's, then up's
    per_part = tl.cdiv(num_tiles, parts)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    # persistent loop over (block, part) work items; parts of a block are adjacent
    for work in range(tl.program_id(0), tl.load(lay[3]) * parts, tl.num_programs(0)):
        block = work // parts
        slot = tl.load(lay[2] + block).to(tl.int64)
        expert = tl.load(lay[1] + block).to(tl.int64)
        # a block without an adapter (slot -1, expert-major layouts) or of rank 0 runs no tile
        rank = tl.minimum(tl.where(slot >= 0, tl.load(ranks_ptr + tl.maximum(slot, 0)), 0), R)
        t_begin = (work % parts) * per_part
        t_end = tl.where(rank > 0, tl.minimum(num_tiles, t_begin + per_part), t_begin)
        # rows of this block (pad rows have id num_rows and are masked)
        rows = tl.load(lay[0] + block * BLOCK_M + offs_m).to(tl.int64)
        row_ok = rows < num_rows
        r_ok = offs_r < rank
        r_read = offs_r // RANK_GRAIN < tl.cdiv(rank, RANK_GRAIN)
        # shrunk [BLOCK_M, BLOCK_R] of each split, cols [h*R, h*R + r_s), cast as lora_expand_tiles does
        s_ptrs = S[0] + rows[:, None] * S[1] + offs_r[None, :] * S[2]
        s_mask = row_ok[:, None] & r_ok[None, :]
        a0 = tl.load(s_ptrs, mask=s_mask, other=0.0).to(W[0].dtype.element_ty)
        a1 = a0
        if NUM_SPLITS == 2:
            a1 = tl.load(s_ptrs + R * S[2], mask=s_mask, other=0.0).to(W[0].dtype.element_ty)
        row_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        b_base, b_rows = factor_at(W, slot, tl.maximum(expert, 0), 0)  # B rows are c's columns
        B = (b_base, b_rows, W[5])
        if PREFETCH:  # registers hold tile t + 1's loads while tile t computes and stores
            b, prior = _tile_load(B, C, rows, row_ok, r_ok, r_read, t_begin, t_end, num_n, N,
                                  BLOCK_N, BLOCK_R)
            for t in range(t_begin, t_end):
                b_next, prior_next = _tile_load(B, C, rows, row_ok, r_ok, r_read, t + 1, t_end,
                                                num_n, N, BLOCK_N, BLOCK_R)
                _tile_store(a0, a1, b, prior, row_scale, C, rows, row_ok, t, t_end, num_n, N, BLOCK_N,
                            NUM_SPLITS, HAS_SCALE, IEEE)
                b = b_next
                prior = prior_next
        else:  # the compiler pipelines the loop's loads over num_stages
            for t in range(t_begin, t_end):
                b, prior = _tile_load(B, C, rows, row_ok, r_ok, r_read, t, t_end, num_n, N,
                                      BLOCK_N, BLOCK_R)
                _tile_store(a0, a1, b, prior, row_scale, C, rows, row_ok, t, t_end, num_n, N, BLOCK_N,
                            NUM_SPLITS, HAS_SCALE, IEEE)


# Tiles: the loop over a block's N tiles is latency-bound (a tile is one K step of R), so what
# hides the latency is B bytes in flight an SM = resident programs x (stages - 1) x tile, and what
# bounds a block is its tile count. The MoE launcher's choice (kernels/moe/launch.py,
# _expand_blocks_config, from `bench_moe_lora.py --sweep-lora` on every preset, H100, 2026-12-06):
# 256-wide tiles, 4 warps, 3 stages, and a long expand's tiles shared by `parts` programs (Mixtral's
# 56 gate/up tiles a split over 8), which beat one program a block by up to 9x there.
def lora_expand(shrunk: Tensor, b: "Factor | Tensor", c: Tensor, layout: VirtualLayout, ranks: Tensor, *,
                scale: Tensor | None = None, splits: int = 1, block_n: int = 128, num_warps: int = 4,
                num_stages: int = 3, parts: int = 1, prefetch: bool = False) -> Tensor:
    """Adds the expand half of each block's LoRA delta into c in place; returns c.

    Semantics:
        N = b.shape[2] // splits, R = b.shape[3]; for each block (s, e, rows) of the layout with
        s >= 0, each split h < splits and r = min(ranks[s], R):
            c[rows, h*N:(h+1)*N] = (scale[rows, None] *) (shrunk[rows, h*R:h*R + r].to(b.dtype)
                                   @ b[s, e, h*N:(h+1)*N, :r].T).float() + c[rows, h*N:(h+1)*N]
        rounded once to c.dtype. B's ranks >= r are never used (NaN there is harmless); rows
        outside the layout, and blocks of slot -1 or rank 0, are never touched (bitwise). No host
        sync: CUDA-graph capturable.
    Args:
        shrunk: [rows, >= splits*R] float (the shrink's output; fp32 on the MoE path).
        b: Factor of logical shape [S, E, splits*N, R] (split h from row h*N), or that padded
            stack; fp32/fp16/bf16, scaling folded in.
        c: [rows, splits*N] fp32/fp16/bf16, rows = layout.num_rows; any strides.
        layout: VirtualLayout of (slot, expert) blocks; block_size is the M tile (>= 16).
        ranks: [S] int32 per-slot rank.
        scale: [rows] float per-row factor (routing weight) or None.
        splits: 1, or 2 for gate/up halves (shrunk cols [R, 2R) and b rows [N, 2N) for up).
        block_n, num_warps, num_stages: tile config (see the comment above).
        parts: programs that share one block's tiles (1: a program owns the block).
        prefetch: load tile t + 1 in registers while tile t computes (else num_stages pipelines).
    """
    expect(splits in (1, 2), f"splits must be 1 or 2, got {splits}")
    expect(b.shape[2] % splits == 0 and len(b.shape) == 4, f"b must be [S, E, {splits}*N, R], got {tuple(b.shape)}")
    b = as_factor(b, b.shape[2] // splits)
    num_slots, _, n_total, big_r = b.shape
    n = n_total // splits
    rows = layout.num_rows
    expect(shrunk.dim() == 2 and shrunk.shape[0] == rows and shrunk.shape[1] >= splits * big_r,
           f"shrunk must be [{rows}, >= {splits * big_r}], got {tuple(shrunk.shape)}")
    expect(c.dim() == 2 and tuple(c.shape) == (rows, n_total), f"c must be [{rows}, {n_total}], got {tuple(c.shape)}")
    expect(tuple(ranks.shape) == (num_slots,) and ranks.dtype == torch.int32,
           f"ranks must be [{num_slots}] int32, got {tuple(ranks.shape)} {ranks.dtype}")
    expect(scale is None or tuple(scale.shape) == (rows,), f"scale must be [{rows}]")
    expect(shrunk.device == b.device == c.device == ranks.device, "shrunk, b, c and ranks must share a device")
    bm = layout.block_size
    expect(bm >= 16 and bm & (bm - 1) == 0, f"layout block_size must be a power of two >= 16, got {bm}")
    expect(block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n must be a power of two >= 16, got {block_n}")
    expect(parts >= 1, f"parts must be positive, got {parts}")
    if rows == 0 or n == 0:
        return c
    programs = num_programs(c.device, layout.max_blocks * parts)
    _lora_expand_kernel[(programs,)](
        (shrunk, shrunk.stride(0), shrunk.stride(1)), b.operand(), (c, c.stride(0), c.stride(1)),
        scale if scale is not None else layout.num_blocks, ranks,
        (layout.sorted_ids, layout.block_expert, layout.block_slot, layout.num_blocks), rows, n, big_r, parts,
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(big_r)),
        RANK_GRAIN=_rank_grain(b, big_r), NUM_SPLITS=splits, HAS_SCALE=scale is not None,
        IEEE=b.dtype == torch.float32 and shrunk.dtype == torch.float32, PREFETCH=prefetch,
        num_warps=num_warps, num_stages=num_stages,
    )
    return c


def _rank_grain(b: Factor, big_r: int) -> int:
    """Ranks read in groups of this many: whole 16-byte vectors where a slot's ranks are
    contiguous and padded to R (a padded stack) or to a multiple of 16 (a ranked B of the
    adapter heap); one by one where a rank row is a plane of its own (rank-major: reading past
    r_s would leave the adapter's bytes)."""
    if b.col_stride == 1 and b.ranked & RANK_AXES == RANKED_COLS:
        return 8
    return math.gcd(big_r, 8) if b.col_stride == 1 and b.padded is not None else 1


def lora_expand_ref(shrunk: Tensor, b: Factor, c: Tensor, layout: VirtualLayout, ranks: Tensor, *,
                    scale: Tensor | None = None, splits: int = 1, **tiles: object) -> Tensor:
    """Torch twin of lora_expand (same Semantics and Args; the tile arguments are ignored).
    Walks the layout's blocks on the host, so it syncs: for tests and the CPU, not for graphs."""
    b = as_factor(b, b.shape[2] // splits)
    big_r, bm = b.shape[3], layout.block_size
    n = b.shape[2] // splits
    for block in range(int(layout.num_blocks[0])):
        slot, expert = int(layout.block_slot[block]), int(layout.block_expert[block])
        ids = layout.sorted_ids[block * bm:(block + 1) * bm].long()
        ids = ids[ids < layout.num_rows]
        r = min(int(ranks[slot]), big_r) if slot >= 0 else 0
        for h in range(splits if r > 0 else 0):
            a = shrunk[ids, h * big_r:h * big_r + r].to(b.dtype).float()  # [rows, r]
            delta = a @ b.view(slot, h, n, r)[expert].float().T  # [rows, N]
            if scale is not None:
                delta = delta * scale[ids].float()[:, None]
            c[ids, h * n:(h + 1) * n] = (delta + c[ids, h * n:(h + 1) * n].float()).to(c.dtype)
    return c
