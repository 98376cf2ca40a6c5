"""One grouped GEMM over a VirtualLayout: the base MoE GEMMs and the LoRA shrink/expand.

For each block b of the layout (pair (s, e) = (block_slot[b], block_expert[b])) and each split h:
    c[rows, h*split_cn + n] (+)= scale[rows] * a[rows // a_row_div, h*split_ak + k] @ W[s, e, h*split_bn + n, k].T
rows = sorted_ids[b*BM:(b+1)*BM]. With RANK_ON_N (shrink) only n < ranks[s] is read;
with RANK_ON_K (expand) only k < ranks[s]. The grid is persistent: each program walks tiles
up to the device-side block count, so empty capacity costs nothing and no host sync is needed.

Two options serve groups of dense projections (q/k/v) at decode size, where few blocks exist:
- k_splits = P (shrink): program (., h, j) walks only K slice j and writes partial sums to
  c[j] (c is [P, rows, *]); a long K loop per block is a chain of dependent loads otherwise.
- a_parts = P (expand): the A tile is the sum of the P partial tiles a[0..P).
- sections (expand): the N axis holds up to 4 projections side by side (ends a multiple of
  block_n); a tile's projection h picks its A columns h*split_ak and its rank.
With rank_split_stride, split or section h reads its rank at ranks[h * rank_split_stride + s].
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.moe.align import VirtualLayout
from kernels.errors import expect


@triton.jit
def _gemm_tile(a_ptr, b_ptr, c_ptr, scale_ptr, ranks_ptr, sorted_ids_ptr, block_expert_ptr,
               block_slot_ptr, block, pid_n, split, num_rows, N, K, a_row_div,
               stride_am, stride_ak, stride_bs, stride_be, stride_bn, stride_bk,
               stride_cm, stride_cn, split_ak, split_bn, split_cn, la_ptr, lb_ptr,
               la_s, la_e, la_r, la_k, lb_s, lb_e, lb_n, lb_r, lora_half_n, lora_half_r,
               part, k_chunk, stride_cp, a_parts, stride_ap, rank_split_stride, end0, end1, end2,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               RANK_ON_N: tl.constexpr, RANK_ON_K: tl.constexpr, ACCUMULATE: tl.constexpr,
               HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, HAS_LORA: tl.constexpr,
               BLOCK_R: tl.constexpr, K_SPLITS: tl.constexpr, A_PARTS: tl.constexpr,
               SECTIONS: tl.constexpr):
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    slot = tl.load(block_slot_ptr + block).to(tl.int64)
    if SECTIONS:  # the tile's projection; its columns of A start at split * split_ak
        split = (pid_n * BLOCK_N >= end0).to(tl.int32) + (pid_n * BLOCK_N >= end1).to(tl.int32) \
            + (pid_n * BLOCK_N >= end2).to(tl.int32)
    n_limit = N
    k_limit = K
    if RANK_ON_N:
        n_limit = tl.minimum(N, tl.load(ranks_ptr + split * rank_split_stride + slot))
    if RANK_ON_K:
        k_limit = tl.minimum(K, tl.load(ranks_ptr + split * rank_split_stride + slot))
    k_start = 0
    if K_SPLITS:  # this program's slice of K; partial sums go to c[part]
        k_start = part * k_chunk
        k_limit = tl.minimum(k_limit, k_start + k_chunk)
        c_ptr += part * stride_cp
    if pid_n * BLOCK_N < n_limit:
        # rows of this block (pad rows have id num_rows and are masked)
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
        row_ok = rows < num_rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        offs_k = k_start + tl.arange(0, BLOCK_K)
        # A rows are gathered (a token's hidden row serves its K routed rows)
        a_ptrs = a_ptr + (rows // a_row_div)[:, None] * stride_am + (split * split_ak + offs_k[None, :]) * stride_ak
        # W tile [BLOCK_K, BLOCK_N] of this block's (slot, expert) matrix
        w_base = b_ptr + slot * stride_bs + expert * stride_be
        b_ptrs = w_base + (split * split_bn + offs_n[None, :]) * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        c_ptrs = c_ptr + rows[:, None] * stride_cm + (split * split_cn + offs_n[None, :]) * stride_cn
        c_mask = row_ok[:, None] & (offs_n[None, :] < N)
        if ACCUMULATE:  # issued before the K loop: its latency overlaps the loads of A and W
            prior = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_LORA:
            # fused LoRA: A rows [h*R, h*R + r_s) of this tile's half h (gate or up)
            rank = tl.where(slot >= 0, tl.load(ranks_ptr + tl.maximum(slot, 0)), 0)
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            half = (pid_n * BLOCK_N) // lora_half_n
            slot0 = tl.maximum(slot, 0)
            la_ptrs = (la_ptr + slot0 * la_s + expert * la_e + (half * lora_half_r + offs_r[None, :]) * la_r
                       + offs_k[:, None] * la_k)
            shrunk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_limit, BLOCK_K):
            k_ok = offs_k + (k0 - k_start) < k_limit
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if A_PARTS:  # the shrink's partial sums over K slices, added here
                for j in range(1, a_parts):
                    a += tl.load(a_ptrs + j * stride_ap, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a = a.to(b.dtype)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            if HAS_LORA:
                la = tl.load(la_ptrs + k0 * la_k, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                if IEEE:
                    shrunk = tl.dot(a, la, shrunk, input_precision="ieee")
                else:
                    shrunk = tl.dot(a, la, shrunk)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if HAS_LORA:
            if slot >= 0:  # rows without adapter keep the base sum untouched (bitwise)
                # B [N, R] rows are this tile's output columns; B cols [0, r_s) only
                lb_ptrs = lb_ptr + slot0 * lb_s + expert * lb_e + offs_n[None, :] * lb_n + offs_r[:, None] * lb_r
                lb = tl.load(lb_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(shrunk.to(lb.dtype), lb, acc, input_precision="ieee")
                else:
                    acc = tl.dot(shrunk.to(lb.dtype), lb, acc)
        if HAS_SCALE:
            acc = acc * row_scale[:, None]
        if ACCUMULATE:
            acc += prior
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every token count
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, ranks_ptr, sorted_ids_ptr,
                         block_expert_ptr, block_slot_ptr, num_blocks_ptr, num_rows, N, K,
                         a_row_div, stride_am, stride_ak, stride_bs, stride_be, stride_bn,
                         stride_bk, stride_cm, stride_cn, split_ak, split_bn, split_cn,
                         la_ptr, lb_ptr, la_s, la_e, la_r, la_k, lb_s, lb_e, lb_n, lb_r,
                         lora_half_n, lora_half_r, k_chunk, stride_cp, a_parts, stride_ap,
                         rank_split_stride, end0, end1, end2,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         RANK_ON_N: tl.constexpr, RANK_ON_K: tl.constexpr,
                         ACCUMULATE: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
                         HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, K_SPLITS: tl.constexpr,
                         A_PARTS: tl.constexpr, SECTIONS: tl.constexpr):
    split = tl.program_id(1)
    part = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.load(num_blocks_ptr) * num_n
    # persistent loop: tiles ordered block-major so programs sharing a block share its A rows
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        _gemm_tile(a_ptr, b_ptr, c_ptr, scale_ptr, ranks_ptr, sorted_ids_ptr, block_expert_ptr,
                   block_slot_ptr, tile // num_n, tile % num_n, split, num_rows, N, K, a_row_div,
                   stride_am, stride_ak, stride_bs, stride_be, stride_bn, stride_bk,
                   stride_cm, stride_cn, split_ak, split_bn, split_cn, la_ptr, lb_ptr, la_s, la_e,
                   la_r, la_k, lb_s, lb_e, lb_n, lb_r, lora_half_n, lora_half_r,
                   part, k_chunk, stride_cp, a_parts, stride_ap, rank_split_stride, end0, end1, end2,
                   BLOCK_M, BLOCK_N, BLOCK_K, RANK_ON_N, RANK_ON_K, ACCUMULATE, HAS_SCALE, IEEE, HAS_LORA, BLOCK_R,
                   K_SPLITS, A_PARTS, SECTIONS)


def num_programs(device: torch.device, max_tiles: int) -> int:
    """Persistent-grid size: enough programs for max_tiles, at most 16 resident a CUDA SM."""
    if device.type != "cuda":
        return max(1, min(max_tiles, 4))  # interpreter: few programs, each loops
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_tiles, sms * 16))  # enough resident CTAs to hide small tiles' latency


def k_slices(k: int, k_splits: int, block_k: int) -> tuple[int, int]:
    """(slice width, number of slices) of a k_splits shrink: widths are whole block_k tiles,
    so there may be fewer slices than asked (k = 2304 in 8: 6 slices of 384)."""
    if k_splits <= 1:
        return k, 1
    chunk = triton.cdiv(triton.cdiv(k, k_splits), block_k) * block_k
    return chunk, triton.cdiv(k, chunk)


def grouped_gemm(a: Tensor, w: Tensor, c: Tensor, layout: VirtualLayout, *, n: int, k: int,
                 a_row_div: int = 1, splits: tuple[int, int, int, int] = (1, 0, 0, 0),
                 ranks: Tensor | None = None, rank_on: str | None = None, accumulate: bool = False,
                 scale: Tensor | None = None, fused_lora: tuple[Tensor, Tensor, int] | None = None,
                 k_splits: int = 1, a_parts: int = 0, sections: tuple[int, ...] = (),
                 rank_split_stride: int = 0, block_n: int = 64, block_k: int = 64, num_warps: int = 4,
                 num_stages: int = 3) -> Tensor:
    """c[rows] (+)= scale * a[rows // a_row_div] @ w[slot, expert].T over the layout's blocks.

    Semantics: see the module docstring; splits = (count, split_ak, split_bn, split_cn).
    Args:
        a: [A_rows, *] activations (row stride any, column stride any); with a_parts = P,
            [P, A_rows, *] partial sums, added as they load.
        w: [S, E, N_total, K_total] weights (a 3-D [E, N, K] tensor is taken as S = 1).
        c: [T*K, *] output rows indexed by routed row id; with k_splits = P, [P, T*K, *].
        layout: VirtualLayout whose block_size is the M tile.
        n, k: GEMM sizes per split (k may be cut to the slot's rank with rank_on="k"); with
            sections, n is the sum of the sections.
        ranks: [S] int32 per-slot rank ([H, S] with rank_split_stride), with rank_on in {"n", "k"}.
        scale: [T*K] per-row factor (routing weight) or None.
        fused_lora: (A [S, E, h*R, K], B [S, E, N, R], half_n): adds (a @ A_h.T) @ B.T in the
            same tile for blocks with slot >= 0, h = n // half_n (gate/up halves; half_n = n
            for one half); needs ranks and block_n dividing half_n.
        k_splits: P > 1 splits K over up to P programs per tile (shrinks; c is [parts, rows, *]
            with parts = k_slices(k, P, block_k)[1] partial sums).
        a_parts: P > 0: a holds P partial sums (the expand of a k_splits shrink).
        sections: output widths of up to 4 projections side by side on N (expand; block_n
            must divide every section end; splits[1] is the A column step between them).
    """
    w4 = w if w.dim() == 4 else w.unsqueeze(0)
    count, split_ak, split_bn, split_cn = splits
    expect(fused_lora is None or (k_splits == 1 and not sections), "fused_lora takes no k_splits or sections")
    expect(len(sections) <= 4, f"at most 4 sections, got {len(sections)}")
    ends = [sum(sections[:h + 1]) for h in range(len(sections) - 1)]
    expect(all(e % block_n == 0 for e in ends), f"block_n {block_n} must divide the section ends {ends}")
    ends += [n] * (3 - len(ends))  # unused ends: no tile starts at or past n
    expect(not sections or (count == 1 and n == sum(sections)),
           f"sections need splits count 1 and n = sum(sections) = {sum(sections)}, got {count} and {n}")
    k_chunk, parts = k_slices(k, k_splits, block_k)
    expect(k_splits == 1 or c.dim() == 3 and c.shape[0] == parts,
           f"c must be [{parts}, rows, *] for k_splits={k_splits} (see k_slices), got {tuple(c.shape)}")
    c2 = c[0] if k_splits > 1 else c
    a2 = a[0] if a_parts else a
    num_n = triton.cdiv(n, block_n)
    programs = num_programs(a.device, layout.max_blocks * num_n)
    dummy = layout.num_blocks
    la, lb, half_n = fused_lora if fused_lora is not None else (dummy, dummy, 1)
    big_r = lb.shape[-1] if fused_lora is not None else 1
    lora_strides = (*la.stride(), *lb.stride()) if fused_lora is not None else (0,) * 8
    _grouped_gemm_kernel[(programs, count, parts)](
        a, w4, c, scale if scale is not None else dummy, ranks if ranks is not None else dummy,
        layout.sorted_ids, layout.block_expert, layout.block_slot, layout.num_blocks,
        layout.num_rows, n, k, a_row_div,
        a2.stride(0), a2.stride(1), w4.stride(0) if w.dim() == 4 else 0, w4.stride(1),
        w4.stride(2), w4.stride(3), c2.stride(0), c2.stride(1), split_ak, split_bn, split_cn,
        la, lb, *lora_strides, half_n, big_r, k_chunk, c.stride(0) if k_splits > 1 else 0,
        max(1, a_parts), a.stride(0) if a_parts else 0, rank_split_stride, *ends,
        BLOCK_M=layout.block_size, BLOCK_N=block_n, BLOCK_K=block_k,
        RANK_ON_N=rank_on == "n", RANK_ON_K=rank_on == "k", ACCUMULATE=accumulate,
        HAS_SCALE=scale is not None, IEEE=a.dtype == torch.float32 and w.dtype == torch.float32,
        HAS_LORA=fused_lora is not None, BLOCK_R=max(16, triton.next_power_of_2(big_r)),
        K_SPLITS=k_splits > 1, A_PARTS=a_parts > 1, SECTIONS=len(sections) > 1,
        num_warps=num_warps, num_stages=num_stages,
    )
    return c
