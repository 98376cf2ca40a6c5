"""Dense LoRA for a group of projections that read the same input (q/k/v, or one projection).

Shape legend: T = tokens, S = slots, R = max rank, H = projections in the group, IN = input
features, N_h = projection h's output features, N = sum_h N_h, KS = splits of IN.

The group's output is one row per token, projection h owning columns [off_h, off_h + N_h)
(off_h = N_0 + ... + N_{h-1}), as a fused q/k/v GEMM writes it. Two launches, over the rows
grouped by slot (the step's dense layout, 16-row blocks):
    part[j, t, h*R + r] = x[t, IN_j] @ A[s, h*R + r, IN_j].T                 (r < r_h(s))
    out[t, off_h + n]  += (sum_j part[j, t, h*R : h*R + r_h(s)]) @ B[s, off_h + n, :r_h(s)].T
with s = slot_ids[t] and IN_j the j-th of KS slices of the input features. Rows with s = -1
are not in the layout: untouched, bitwise.

Why split the input features: at decode sizes there are few blocks (64 tokens over 16 slots
is 20), and a program walking all 2048 input features is a chain of 16 dependent loads
(H100: ~10 us a q/k/v shrink, for ~0.1 us of bytes). KS programs per block each walk one
slice; the expand sums the KS partial rows as it loads them (deterministic, no atomics).
One launch serves the whole q/k/v group: x is read once, and the expand writes the fused row.

DESIGN rule 6 asks dense projections to use the MoE machinery with one expert. They do for the
layout (`dense_layout` is the virtual layout of one expert, and the masking and bitwise rules
are the same), but these two kernels are a second shrink/expand pair: grouped_gemm has neither
the split over K nor uneven sections. Measured on an H100 (benchmarks/RESULTS.md, session 3):
q/k/v/o LoRA 60 -> 21 us a layer. To re-unify, move both features into the virtual-expert
kernels (the MoE shrinks at decode size would gain from the split too) and retire this file.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.align import VirtualLayout
from kernels.errors import expect
from kernels.weights import DenseLoRAGroup

SHRINK_BLOCK_K = 128
MAX_SECTIONS = 4  # projections in one group (the expand finds its section by comparisons)


@triton.jit
def _group_shrink_kernel(x_ptr, a_ptr, part_ptr, ranks_ptr, sorted_ids_ptr, block_slot_ptr, num_blocks_ptr,
                         num_rows, K, k_chunk, R, stride_xm, stride_xk, stride_as, stride_ar, stride_ak,
                         stride_rh, stride_pj, stride_pm,
                         BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                         IEEE: tl.constexpr):
    block = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    if block < tl.load(num_blocks_ptr):
        slot = tl.load(block_slot_ptr + block).to(tl.int64)
        rank = tl.load(ranks_ptr + h * stride_rh + slot)
        if rank > 0:  # a projection the adapter leaves alone: the expand skips it too
            offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
            row_ok = rows < num_rows
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            offs_k = tl.arange(0, BLOCK_K)
            k_start = j * k_chunk
            k_end = tl.minimum(K, k_start + k_chunk)
            x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_start + offs_k[None, :]) * stride_xk
            a_ptrs = (a_ptr + slot * stride_as + (h * R + offs_r[None, :]) * stride_ar
                      + (k_start + offs_k[:, None]) * stride_ak)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                k_ok = offs_k + k0 < k_end
                xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(xt, at, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, at, acc)
                x_ptrs += BLOCK_K * stride_xk
                a_ptrs += BLOCK_K * stride_ak
            p_ptrs = part_ptr + j * stride_pj + rows[:, None] * stride_pm + h * R + offs_r[None, :]
            tl.store(p_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _group_expand_kernel(part_ptr, b_ptr, out_ptr, ranks_ptr, sorted_ids_ptr, block_slot_ptr, num_blocks_ptr,
                         num_rows, N, R, KS, end0, end1, end2, stride_pj, stride_pm, stride_bs, stride_bn,
                         stride_br, stride_om, stride_on, stride_rh,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                         IEEE: tl.constexpr):
    block = tl.program_id(0)
    pid_n = tl.program_id(1)
    if block < tl.load(num_blocks_ptr):
        n0 = pid_n * BLOCK_N
        # the tile's projection: section ends are multiples of BLOCK_N, so a tile has one
        h = (n0 >= end0).to(tl.int32) + (n0 >= end1).to(tl.int32) + (n0 >= end2).to(tl.int32)
        slot = tl.load(block_slot_ptr + block).to(tl.int64)
        rank = tl.load(ranks_ptr + h * stride_rh + slot)
        if rank > 0:
            offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
            row_ok = rows < num_rows
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
            o_mask = row_ok[:, None] & n_ok[None, :]
            prior = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)  # in flight during the sum
            bt = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            p_ptrs = part_ptr + rows[:, None] * stride_pm + h * R + offs_r[None, :]
            p_mask = row_ok[:, None] & r_ok[None, :]
            shrunk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for j in range(0, KS):
                shrunk += tl.load(p_ptrs + j * stride_pj, mask=p_mask, other=0.0)
            if IEEE:
                delta = tl.dot(shrunk.to(bt.dtype), bt, input_precision="ieee")
            else:
                delta = tl.dot(shrunk.to(bt.dtype), bt)
            tl.store(o_ptrs, (prior + delta).to(out_ptr.dtype.element_ty), mask=o_mask)


def _pow2_divisor(n: int) -> int:
    return n & -n


def expand_block_n(sections: tuple[int, ...]) -> int:
    """The expand's N tile: at most 256 and, with several projections, a divisor of every
    section end (a tile must not straddle two projections); 0 when no such tile of >= 16 exists."""
    if len(sections) == 1:
        return min(256, max(16, triton.next_power_of_2(sections[0])))
    tile = min(256, *(_pow2_divisor(n) for n in sections[:-1]))
    return tile if tile >= 16 else 0


def split_k(num_in: int) -> int:
    """Input-feature slices: ~2 K tiles a program, at most 8 slices."""
    return max(1, min(8, triton.cdiv(num_in, 2 * SHRINK_BLOCK_K)))


def lora_group_triton_(x: Tensor, out: Tensor, lora: DenseLoRAGroup, layout: VirtualLayout) -> Tensor:
    """Triton twin of lora_group_ref_ over a dense layout of the tokens' slots (block 16).
    A group whose sections no 16-column tile divides runs one projection at a time."""
    num_tokens, num_in = x.shape
    if num_tokens == 0:
        return out
    block_n = expand_block_n(lora.sections)
    if block_n == 0:
        for h in range(lora.num_projections):
            lora_group_triton_(x, out[:, lora.offset(h):lora.offset(h + 1)], lora.projection(h), layout)
        return out
    expect(len(lora.sections) <= MAX_SECTIONS, f"at most {MAX_SECTIONS} projections in a group")
    r, heads = lora.max_rank, lora.num_projections
    block_r = max(16, triton.next_power_of_2(r))
    ks = split_k(num_in)
    k_chunk = triton.cdiv(triton.cdiv(num_in, ks), SHRINK_BLOCK_K) * SHRINK_BLOCK_K
    ks = triton.cdiv(num_in, k_chunk)
    part = torch.empty(ks, num_tokens, heads * r, dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    _group_shrink_kernel[(layout.max_blocks, heads, ks)](
        x, lora.a, part, lora.ranks, layout.sorted_ids, layout.block_slot, layout.num_blocks,
        layout.num_rows, num_in, k_chunk, r, x.stride(0), x.stride(1), *lora.a.stride(),
        lora.ranks.stride(0), part.stride(0), part.stride(1),
        BLOCK_M=layout.block_size, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K, IEEE=ieee, num_warps=2, num_stages=2)
    n_total = out.shape[1]
    ends = [lora.offset(h + 1) for h in range(heads - 1)]
    ends += [n_total] * (MAX_SECTIONS - 1 - len(ends))  # unused ends: no tile starts at or past N
    _group_expand_kernel[(layout.max_blocks, triton.cdiv(n_total, block_n))](
        part, lora.b, out, lora.ranks, layout.sorted_ids, layout.block_slot, layout.num_blocks,
        layout.num_rows, n_total, r, ks, *ends, part.stride(0), part.stride(1), *lora.b.stride(),
        out.stride(0), out.stride(1), lora.ranks.stride(0),
        BLOCK_M=layout.block_size, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=ieee, num_warps=4, num_stages=1)
    return out
