"""The grouped GEMMs over a VirtualLayout, one kernel and launcher per role, over one tile helper:

    moe_gemm           c[rows] = scale * a[rows // a_row_div] @ W[e].T         (the base MoE GEMMs)
    lora_shrink        c[rows, h*n + j] = a[rows // a_row_div] @ A[s, e, h*n + j].T,  j < rank
    lora_expand_tiles  c[rows, h*n + j] += scale * a[rows, h*k + i] @ B[s, e, h*n + j, i].T,  i < rank

For each block b of the layout, (s, e) = (block_slot[b], block_expert[b]) and rows =
sorted_ids[b*BM:(b+1)*BM] (pad rows have id num_rows and are masked); h is the split (gate/up
halves, or one projection of a dense group). Grids are persistent: each program walks tiles up to
the device-side block count, so empty capacity costs nothing and no host sync is needed.

The options of the roles, for dense groups (q/k/v) at decode size, where few blocks exist:
- lora_shrink k_splits = P: program (., h, j) walks only K slice j and writes partial sums to
  c[j] (c is [P, rows, *]); a long K loop per block is a chain of dependent loads otherwise.
- lora_expand_tiles a_parts = P: the A tile is the sum of the P partial tiles a[0..P).
- lora_expand_tiles sections: the N axis holds up to 4 projections side by side (ends a multiple
  of block_n); a tile's projection h picks its A columns h*k and its rank.
- moe_gemm fused_lora (one token, expert-major layout): the LoRA delta in the base's tile.
With rank_split_stride, split or section h reads its rank at ranks[h * rank_split_stride + s].

In the kernels an operand is a tuple: A = (ptr, row stride, column stride, column step per split),
W = the base weights (ptr, slot stride, expert stride, row stride, column stride, row step per
split) or a LoRA factor (kernels.weights.Factor.operand: ptr, offsets table, its split stride,
expert stride, row stride, column stride, rows a split steps by, the table's unit, ranked, the
ranks it scales by), C = (ptr, row stride, column stride, column step per split), lay = the
layout's four tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.moe.align import VirtualLayout
from kernels.errors import expect
from kernels.moe.operands import factor_at, k_slices, num_programs
from kernels.pdl import pdl_args, use_pdl
from kernels.weights import Factor, as_factor


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gemm_tile(A, W, C, L, lay, block, expert, slot, h, pid_n, num_rows, N, a_row_div, scale_ptr,
               n_limit, k_start, k_limit, c_off, a_parts, stride_ap, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACCUMULATE: tl.constexpr,
               HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, HAS_LORA: tl.constexpr,
               BLOCK_R: tl.constexpr, A_PARTS: tl.constexpr, W_TABLE: tl.constexpr,
               PDL_WAIT: tl.constexpr = False):
    """One [BLOCK_M, BLOCK_N] tile of block `block`, split h: columns < n_limit, K in [k_start, k_limit),
    written at C[0] + c_off. PDL_WAIT: wait for the launch ahead (kernels/pdl.py) before the store."""
    if pid_n * BLOCK_N < n_limit:
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(lay[0] + offs_m).to(tl.int64)
        row_ok = rows < num_rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        offs_k = k_start + tl.arange(0, BLOCK_K)
        # A rows are gathered (a token's hidden row serves its routed rows)
        a_ptrs = A[0] + (rows // a_row_div)[:, None] * A[1] + (h * A[3] + offs_k[None, :]) * A[2]
        # W tile [BLOCK_K, BLOCK_N] of this block's (slot, expert) matrix
        if W_TABLE:  # a LoRA factor: where split h of the slot begins, from its offsets table
            w_base, w_rows = factor_at(W, slot, expert, h)
            b_ptrs = w_base + offs_n[None, :] * w_rows + offs_k[:, None] * W[5]
            w_step_k = BLOCK_K * W[5]
        else:
            w_base = W[0] + slot * W[1] + expert * W[2]
            b_ptrs = w_base + (h * W[5] + offs_n[None, :]) * W[3] + offs_k[:, None] * W[4]
            w_step_k = BLOCK_K * W[4]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        c_ptrs = C[0] + c_off + rows[:, None] * C[1] + (h * C[3] + offs_n[None, :]) * C[2]
        c_mask = row_ok[:, None] & (offs_n[None, :] < N)
        if ACCUMULATE:  # issued before the K loop: its latency overlaps the loads of A and W
            prior = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_LORA:
            # fused LoRA, L = (A factor (10), B factor (10), half_n, ranks):
            # A rows [0, r_s) of this tile's half g (gate or up)
            slot0 = tl.maximum(slot, 0)
            rank = tl.where(slot >= 0, tl.load(L[21] + slot0), 0)
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            half = (pid_n * BLOCK_N) // L[20]
            la_base, la_rows = factor_at((L[0], L[1], L[2], L[3], L[4], L[5], L[6], L[7], L[8], L[9]), slot0,
                                         expert, half)
            la_ptrs = la_base + offs_r[None, :] * la_rows + offs_k[:, None] * L[5]
            shrunk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            # B [N, R] rows are this tile's output columns, B cols [0, r_s) only: loaded before the K
            # loop, so that its chain of loads (the factor's offset, then B) is not the epilogue's
            lb_base, lb_rows = factor_at((L[10], L[11], L[12], L[13], L[14], L[15], L[16], L[17], L[18], L[19]),
                                         slot0, expert, 0)
            lb = tl.load(lb_base + offs_n[None, :] * lb_rows + offs_r[:, None] * L[15],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        for k0 in range(k_start, k_limit, BLOCK_K):
            k_ok = offs_k + (k0 - k_start) < k_limit
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if A_PARTS:  # the shrink's partial sums over K slices, added here
                for j in range(1, a_parts):
                    a += tl.load(a_ptrs + j * stride_ap, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a = a.to(b.dtype)
            acc = _dot(a, b, acc, IEEE)
            if HAS_LORA:
                la = tl.load(la_ptrs + k0 * L[5], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                shrunk = _dot(a, la, shrunk, IEEE)
            a_ptrs += BLOCK_K * A[2]
            b_ptrs += w_step_k
        if HAS_LORA:
            if slot >= 0:  # rows without adapter keep the base sum untouched (bitwise)
                acc = _dot(shrunk.to(lb.dtype), lb, acc, IEEE)
        if HAS_SCALE:
            acc = acc * row_scale[:, None]
        if ACCUMULATE:
            acc += prior
        if PDL_WAIT:
            tl.extra.cuda.gdc_wait()
        tl.store(c_ptrs, acc.to(C[0].dtype.element_ty), mask=c_mask)


@triton.jit
def _tile_of(lay, tile, num_n):
    """Tile `tile` of a persistent walk, block-major: (block, N tile, its expert, its slot)."""
    block = tile // num_n
    expert = tl.load(lay[1] + block).to(tl.int64)
    slot = tl.load(lay[2] + block).to(tl.int64)
    return block, tile % num_n, expert, slot


@triton.jit
def _grouped_tile_of(lay, tile, num_n, num_blocks, GROUP_M: tl.constexpr):
    """Tile `tile` of a persistent walk over groups of GROUP_M consecutive blocks, N tile by N tile
    within a group and the group's blocks inner: the blocks of one expert (consecutive in the
    layout) then read each tile of its weights one after the other, from L2 after the first."""
    group_tiles = GROUP_M * num_n
    first = (tile // group_tiles) * GROUP_M
    in_group = tl.minimum(num_blocks - first, GROUP_M)
    local = tile % group_tiles
    block = first + local % in_group
    expert = tl.load(lay[1] + block).to(tl.int64)
    slot = tl.load(lay[2] + block).to(tl.int64)
    return block, local // in_group, expert, slot


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every token count
def _moe_gemm_kernel(A, W, C, L, lay, num_rows, N, K, a_row_div, scale_ptr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, HAS_LORA: tl.constexpr,
                     BLOCK_R: tl.constexpr, PDL_TRIGGER: tl.constexpr, GROUP_M: tl.constexpr):
    if PDL_TRIGGER:  # a PDL launch after this one may start once every program here has (kernels/pdl.py)
        tl.extra.cuda.gdc_launch_dependents()
    # the split index stays a runtime value (grid axis 1 of size 1): with a literal 0, ptxas
    # builds a K loop of 164-172 instructions instead of 136-147 for the same TTIR loop (sm_90,
    # triton 3.6; benchmarks/compare_sass.py), and prefill steps took ~5% longer on the H200
    h = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    num_blocks = tl.load(lay[3])
    # persistent loop: tiles ordered block-major so programs sharing a block share its A rows, or
    # by groups of blocks (GROUP_M > 1) so that an expert's blocks share its weight tiles
    for tile in range(tl.program_id(0), num_blocks * num_n, tl.num_programs(0)):
        if GROUP_M == 1:
            block, pid_n, expert, slot = _tile_of(lay, tile, num_n)
        else:
            block, pid_n, expert, slot = _grouped_tile_of(lay, tile, num_n, num_blocks, GROUP_M)
        _gemm_tile(A, W, C, L, lay, block, expert, slot, h, pid_n, num_rows, N, a_row_div,
                   scale_ptr, N, 0, K, 0, 1, 0, BLOCK_M, BLOCK_N, BLOCK_K, False, HAS_SCALE, IEEE,
                   HAS_LORA, BLOCK_R, False, False)


@triton.jit(do_not_specialize=["num_rows"])
def _lora_shrink_kernel(A, W, C, lay, ranks_ptr, rank_split_stride, num_rows, N, K, a_row_div,
                        k_chunk, stride_cp, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, IEEE: tl.constexpr, K_SPLITS: tl.constexpr,
                        PDL: tl.constexpr):
    if PDL == 1:  # PDL_WAIT_FIRST (kernels/pdl.py); with PDL_READ_AHEAD tiles are summed beside
        tl.extra.cuda.gdc_wait()  # the launch ahead and stored after it
    h = tl.program_id(1)
    part = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tl.load(lay[3]) * num_n, tl.num_programs(0)):
        block, pid_n, expert, slot = _tile_of(lay, tile, num_n)
        n_limit = tl.minimum(N, tl.load(ranks_ptr + h * rank_split_stride + slot))
        k_start = 0
        k_limit = K
        if K_SPLITS:  # this program's slice of K; partial sums go to c[part]
            k_start = part * k_chunk
            k_limit = tl.minimum(K, k_start + k_chunk)
        _gemm_tile(A, W, C, 0, lay, block, expert, slot, h, pid_n, num_rows, N, a_row_div, 0, n_limit,
                   k_start, k_limit, part * stride_cp, 1, 0, BLOCK_M, BLOCK_N, BLOCK_K, False, False, IEEE,
                   False, 16, False, True, PDL == 2)
    if PDL != 0:  # every program, tiles or none: this launch ends after the one ahead
        tl.extra.cuda.gdc_wait()


@triton.jit(do_not_specialize=["num_rows"])
def _lora_expand_tiles_kernel(A, W, C, lay, ranks_ptr, rank_split_stride, ends, num_rows, N, K,
                              scale_ptr, a_parts, stride_ap, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr,
                              IEEE: tl.constexpr, A_PARTS: tl.constexpr, SECTIONS: tl.constexpr,
                              PDL: tl.constexpr):
    if PDL != 0:  # A (the shrink's output) and C (read, then written) belong to the launches ahead
        tl.extra.cuda.gdc_wait()
    h = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tl.load(lay[3]) * num_n, tl.num_programs(0)):
        block, pid_n, expert, slot = _tile_of(lay, tile, num_n)
        if SECTIONS:  # the tile's projection; its columns of A start at h * k
            h = (pid_n * BLOCK_N >= ends[0]).to(tl.int32) + (pid_n * BLOCK_N >= ends[1]).to(tl.int32) \
                + (pid_n * BLOCK_N >= ends[2]).to(tl.int32)
        k_limit = tl.minimum(K, tl.load(ranks_ptr + h * rank_split_stride + slot))
        _gemm_tile(A, W, C, 0, lay, block, expert, slot, h, pid_n, num_rows, N, 1, scale_ptr, N, 0,
                   k_limit, 0, a_parts, stride_ap, BLOCK_M, BLOCK_N, BLOCK_K, True, HAS_SCALE, IEEE,
                   False, 16, A_PARTS, True)


def _weights(w: Tensor, row_step: int) -> tuple:
    """W operand of a [S, E, N, K] or [E, N, K] (S = 1) stack."""
    if w.dim() == 3:
        return (w, 0, *w.stride(), row_step)
    return (w, *w.stride(), row_step)


def _lay(layout: VirtualLayout) -> tuple:
    return layout.sorted_ids, layout.block_expert, layout.block_slot, layout.num_blocks


def _ieee(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def moe_gemm(a: Tensor, w: Tensor, c: Tensor, layout: VirtualLayout, *, n: int, k: int,
             a_row_div: int = 1, scale: Tensor | None = None,
             fused_lora: tuple[Tensor, Tensor, Tensor, int] | None = None, block_n: int = 64,
             block_k: int = 64, num_warps: int = 4, num_stages: int = 3, group_m: int = 1) -> Tensor:
    """The base MoE GEMM over the layout's blocks; returns c.

    Semantics: c[rows] = scale[rows, None] * a[rows // a_row_div] @ w[e].T for each block (e, rows),
    plus, with fused_lora = (A, B, ranks, half_n) and blocks of slot s >= 0,
    scale * (a @ A[s, e, g*R:g*R + r_s].T) @ B[s, e, :, :r_s].T in the same tile, g = col // half_n.
    Args:
        a: [A_rows, k] activations (any strides).
        w: [E, n, k] expert weights.
        c: [rows, n] output, rows = layout.num_rows.
        layout: VirtualLayout whose block_size is the M tile.
        scale: [rows] per-row factor (routing weight) or None.
        fused_lora: Factors A [S, E, h*R, k] and B [S, E, n, R], ranks [S] int32, half_n (block_n
            divides it; n for one half); for expert-major layouts (kernels.moe.launch.fused_path_ok).
        group_m: tiles walked by groups of this many blocks, N tile by N tile (1: block by block);
            the order of tiles only, never a tile's sums.
    """
    expect(group_m >= 1, f"group_m must be positive, got {group_m}")
    lora, big_r = 0, 1
    if fused_lora is not None:
        la, lb, ranks, half_n = fused_lora
        expect(half_n >= n or half_n % block_n == 0, f"block_n {block_n} must divide half_n {half_n}")
        big_r = lb.shape[-1]
        lora = (*as_factor(la, big_r).operand(), *as_factor(lb, n).operand(), half_n, ranks)
    num_n = triton.cdiv(n, block_n)
    programs = num_programs(a.device, layout.max_blocks * num_n)
    _moe_gemm_kernel[(programs, 1)](
        (a, a.stride(0), a.stride(1), 0), _weights(w, 0), (c, c.stride(0), c.stride(1), 0), lora,
        _lay(layout), layout.num_rows, n, k, a_row_div, scale if scale is not None else layout.num_blocks,
        BLOCK_M=layout.block_size, BLOCK_N=block_n, BLOCK_K=block_k, HAS_SCALE=scale is not None,
        IEEE=_ieee(a, w), HAS_LORA=fused_lora is not None, BLOCK_R=max(16, triton.next_power_of_2(big_r)),
        PDL_TRIGGER=use_pdl(a.device), GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
    )
    return c


def lora_shrink(a: Tensor, w: "Factor | Tensor", c: Tensor, layout: VirtualLayout, ranks: Tensor, *, n: int,
                k: int, a_row_div: int = 1, splits: int = 1, k_splits: int = 1,
                rank_split_stride: int = 0, block_n: int = 16, block_k: int = 128, num_warps: int = 2,
                num_stages: int = 3, pdl_early: bool = False) -> Tensor:
    """The shrink of each block's LoRA delta; returns c.

    Semantics: for each block (s, e, rows) with s >= 0, split h < splits, r = min(n, rank_h[s]):
        c[rows, h*n:h*n + r] = a[rows // a_row_div] @ w[s, e, h*n:h*n + r].T     (fp32 sums)
    rank_h[s] = ranks[h * rank_split_stride + s]; columns >= r are not written.
    Args:
        a: [A_rows, k] activations (any strides).
        w: LoRA A, a kernels.weights.Factor of logical shape [S, E, splits*n, k] (n = its max rank),
            or that padded stack.
        c: [rows, splits*n] float; with k_splits = P, [parts, rows, splits*n] partial sums over K
            slices, parts = k_slices(k, P, block_k)[1] (their sum is the shrink).
        ranks: [S] int32 (or [H, S] with rank_split_stride).
        pdl_early: the launch just before this one writes none of a, w, ranks and the layout: on a
            card with PDL the shrink then runs beside it (kernels/pdl.py).
    """
    k_chunk, parts = k_slices(k, k_splits, block_k)
    expect(k_splits == 1 or c.dim() == 3 and c.shape[0] == parts,
           f"c must be [{parts}, rows, *] for k_splits={k_splits} (see k_slices), got {tuple(c.shape)}")
    c2 = c[0] if k_splits > 1 else c
    num_n = triton.cdiv(n, block_n)
    programs = num_programs(a.device, layout.max_blocks * num_n)
    factor = as_factor(w, n)
    pdl_early = pdl_early and factor is w  # a factor's offsets table made here would be the launch ahead
    _lora_shrink_kernel[(programs, splits, parts)](
        (a, a.stride(0), a.stride(1), 0), factor.operand(), (c, c2.stride(0), c2.stride(1), n),
        _lay(layout), ranks, rank_split_stride, layout.num_rows, n, k, a_row_div, k_chunk,
        c.stride(0) if k_splits > 1 else 0,
        BLOCK_M=layout.block_size, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=_ieee(a, w),
        K_SPLITS=k_splits > 1, num_warps=num_warps, num_stages=num_stages, **pdl_args(a.device, pdl_early),
    )
    return c


def lora_expand_tiles(a: Tensor, w: "Factor | Tensor", c: Tensor, layout: VirtualLayout, ranks: Tensor, *,
                      n: int, k: int, splits: int = 1, scale: Tensor | None = None, a_parts: int = 0,
                      sections: tuple[int, ...] = (), rank_split_stride: int = 0, block_n: int = 256,
                      block_k: int = 16, num_warps: int = 4, num_stages: int = 1) -> Tensor:
    """The expand of each block's LoRA delta, added into c in place, a program per (block, N tile);
    returns c. (kernels/moe/expand.py's lora_expand: a program per block.)

    Semantics: for each block (s, e, rows), split h < splits, r = min(k, rank_h[s]):
        c[rows, h*n:(h+1)*n] += scale[rows, None] * a[rows, h*k:h*k + r].to(w.dtype) @ w[s, e, h*n:(h+1)*n, :r].T
    in fp32, rounded once to c's dtype. With sections (count 1), column j of c belongs to
    projection h = the section holding j, which reads a[rows, h*k:h*k + rank_h[s]].
    Args:
        a: [rows, splits*k] float shrink output; with a_parts = P, [P, rows, *] partial sums.
        w: LoRA B, a Factor of logical shape [S, E, splits*n, k] (k = its max rank; split h from
            row h*n, or the sections' rows), or that padded stack; scaling folded in.
        c: [rows, splits*n] (n = sum(sections) with sections).
        ranks: [S] int32 (or [H, S] with rank_split_stride).
        sections: up to 4 projection widths on N; block_n must divide every section end.
    """
    expect(len(sections) <= 4, f"at most 4 sections, got {len(sections)}")
    ends = [sum(sections[:h + 1]) for h in range(len(sections) - 1)]
    expect(all(e % block_n == 0 for e in ends), f"block_n {block_n} must divide the section ends {ends}")
    ends += [n] * (3 - len(ends))  # unused ends: no tile starts at or past n
    expect(not sections or (splits == 1 and n == sum(sections)),
           f"sections need splits 1 and n = sum(sections) = {sum(sections)}, got {splits} and {n}")
    a2 = a[0] if a_parts else a
    step = 0 if sections else n
    num_n = triton.cdiv(n, block_n)
    programs = num_programs(a.device, layout.max_blocks * num_n)
    _lora_expand_tiles_kernel[(programs, splits)](
        (a, a2.stride(0), a2.stride(1), k), as_factor(w, step).operand(), (c, c.stride(0), c.stride(1), step),
        _lay(layout), ranks, rank_split_stride, tuple(ends), layout.num_rows, n, k,
        scale if scale is not None else layout.num_blocks, max(1, a_parts), a.stride(0) if a_parts else 0,
        BLOCK_M=layout.block_size, BLOCK_N=block_n, BLOCK_K=block_k, HAS_SCALE=scale is not None,
        IEEE=_ieee(a, w), A_PARTS=a_parts > 1, SECTIONS=len(sections) > 1,
        num_warps=num_warps, num_stages=num_stages, **pdl_args(a.device),
    )
    return c
