"""Dense LoRA group at decode size: one launch, each program a (slot block, column chunk) pair.

For each block b of the step's dense layout (rows of one slot s) and each chunk of columns
[n0, n1) inside projection h's section, with r = ranks[h, s]:
    shrunk = x[rows] @ a[s, h*R:h*R + r].T                        (fp32, tensor-core dot)
    out[rows, n0:n1] += shrunk.to(b.dtype) @ b[s, n0:n1, :r].T     (fp32, + prior, one rounding)
the split path's order of operations (grouped_gemm shrink, then expand with accumulate); only the
shrink's summation order differs.

Why: at decode (64 tokens over 16 adapters) the group's shrink and expand are two launches of
~5-8 us each for ~2 us of adapter bytes: dependent latency, not bandwidth. Here a program
repeats its block's shrink for its own chunk (A is re-read from L2, a few MB a launch), so the
expand needs no second launch and no intermediate in memory.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.align import VirtualLayout
from kernels.weights import DenseLoRAGroup


@triton.jit
def _pick(h, v0, v1, v2, v3):
    """The h-th of four scalars."""
    return tl.where(h == 0, v0, tl.where(h == 1, v1, tl.where(h == 2, v2, v3)))


# one compile for every token count: the chunking follows it
@triton.jit(do_not_specialize=["num_rows", "chunk", "first1", "first2", "first3"])
def _lora_dense_kernel(x_ptr, a_ptr, b_ptr, c_ptr, ranks_ptr, sorted_ids_ptr, block_slot_ptr, num_blocks_ptr,
                       num_rows, K, R, rank_stride, stride_xm, stride_xk, a_s, a_r, a_k, b_s, b_n, b_r,
                       stride_cm, stride_cn, end0, end1, end2, n_total, chunk, first1, first2, first3,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    block = tl.program_id(0)
    j = tl.program_id(1)
    if block < tl.load(num_blocks_ptr):
        # this program's projection h and its columns [n_begin, n_end) inside h's section
        h = (j >= first1).to(tl.int32) + (j >= first2).to(tl.int32) + (j >= first3).to(tl.int32)
        n_begin = _pick(h, 0, end0, end1, end2) + (j - _pick(h, 0, first1, first2, first3)) * chunk
        n_end = tl.minimum(_pick(h, end0, end1, end2, n_total), n_begin + chunk)
        slot = tl.maximum(tl.load(block_slot_ptr + block), 0).to(tl.int64)
        rank = tl.minimum(tl.load(ranks_ptr + h * rank_stride + slot), R)
        if rank > 0:
            offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
            row_ok = rows < num_rows  # pad rows have id num_rows
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            # shrink over K: x rows [BLOCK_M, BLOCK_K] @ A_h tile [BLOCK_K, BLOCK_R]
            a_base = a_ptr + slot * a_s + (h * R + offs_r)[None, :] * a_r
            shrunk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(a_base + offs_k[:, None] * a_k, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                if IEEE:
                    shrunk = tl.dot(x.to(w.dtype), w, shrunk, input_precision="ieee")
                else:
                    shrunk = tl.dot(x.to(w.dtype), w, shrunk)
            s = shrunk.to(b_ptr.dtype.element_ty)
            # expand this chunk: [BLOCK_M, BLOCK_R] @ B tile [BLOCK_R, BLOCK_N], + prior, one rounding
            for n0 in range(n_begin, n_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < n_end
                b = tl.load(b_ptr + slot * b_s + offs_n[None, :] * b_n + offs_r[:, None] * b_r,
                            mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                if IEEE:
                    delta = tl.dot(s, b, input_precision="ieee")
                else:
                    delta = tl.dot(s, b)
                c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
                c_mask = row_ok[:, None] & n_ok[None, :]
                prior = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
                tl.store(c_ptrs, (delta + prior).to(c_ptr.dtype.element_ty), mask=c_mask)


def dense_chunk(sections: tuple[int, ...], max_blocks: int, block_n: int, programs: int) -> int:
    """Columns a program expands: a multiple of block_n such that the launch has about
    `programs` programs (each chunk repeats its block's shrink, so not more than needed)."""
    chunks_wanted = max(1, triton.cdiv(programs, max(1, max_blocks)))
    per_chunk = triton.cdiv(sum(sections), chunks_wanted)
    return max(block_n, triton.cdiv(per_chunk, block_n) * block_n)


def lora_dense_(x: Tensor, out: Tensor, lora: DenseLoRAGroup, layout: VirtualLayout, *, block_k: int = 128,
                block_n: int = 128, programs: int = 512, num_warps: int = 4, num_stages: int = 3) -> Tensor:
    """Adds each row's LoRA deltas of the group's projections into out in place; returns out.

    Semantics: those of kernels.lora_group_linear_ (out[t, off_h:off_h + N_h] += (x[t] @ a_h[s].T)
    @ b_h[s].T for rows t of slot s >= 0 in the layout; other rows untouched, bitwise; A rows and
    B columns >= ranks[h, s] never read). No host sync: CUDA-graph capturable.
    Args:
        x: [T, IN] fp32/fp16/bf16; out: [T, N], N = sum(lora.sections), x's dtype; any strides.
        lora: DenseLoRAGroup of at most 4 projections (a [S, H*R, IN], b [S, N, R], ranks [H, S]).
        layout: the step's dense layout (kernels.moe_launch.dense_layout: one expert, block 16).
        programs: about how many programs the launch has (sets the column chunk, dense_chunk).
        block_k, block_n, num_warps, num_stages: tile config.
    """
    from kernels.errors import expect
    heads = lora.num_projections
    expect(heads <= 4, f"at most 4 projections in a group, got {heads}")
    expect(out.shape[1] == sum(lora.sections), f"out must have {sum(lora.sections)} columns, got {out.shape[1]}")
    if x.shape[0] == 0:
        return out
    chunk = dense_chunk(lora.sections, layout.max_blocks, block_n, programs)
    counts = [triton.cdiv(n, chunk) for n in lora.sections] + [0] * (4 - heads)
    firsts = [sum(counts[:h]) for h in range(1, 4)]
    ends = [lora.offset(h) for h in range(1, heads)] + [sum(lora.sections)] * (4 - heads)
    big_r = lora.max_rank
    _lora_dense_kernel[(layout.max_blocks, sum(counts))](
        x, lora.a, lora.b, out, lora.ranks, layout.sorted_ids, layout.block_slot, layout.num_blocks,
        layout.num_rows, x.shape[1], big_r, lora.ranks.stride(0), x.stride(0), x.stride(1),
        *lora.a.stride(), *lora.b.stride(), out.stride(0), out.stride(1), *ends[:3], sum(lora.sections),
        chunk, *firsts,
        BLOCK_M=layout.block_size, BLOCK_K=block_k, BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(big_r)),
        IEEE=x.dtype == torch.float32 and lora.a.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
