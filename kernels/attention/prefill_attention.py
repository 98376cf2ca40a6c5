"""Paged attention for prefill chunks (many queries per sequence) straight from the KV cache.

One program per (sequence, block of BLOCK_M of its queries, query head): it walks the keys its
queries may see (causal, optionally a sliding window) through the block table, with an online
softmax in fp32, and writes its rows in place. Sequence boundaries and lengths are device
tensors and the grid comes from shapes and a host bound on the longest query, so the launch
needs no host sync and no padded copies of q or the KV (the torch path in engine/attention.py
gathers every sequence's blocks and pads q to [B, Q, H, Dh] once per layer).
T = tokens of the group, B = sequences, H = query heads, G = KV heads, Dh = head dim,
N = cache blocks, S = block size, M = blocks per sequence (padded).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.errors import expect
from kernels.attention.paged_attention import check_paged_cache, online_softmax_step

_NEG_INIT = tl.constexpr(-1.0e30)  # running max before any key: finite, so a fully masked tile gives exp(-inf) = 0
_LOG2E = 1.4426950408889634


# strides as tuples: q and out (token, head), the caches (block, row, KV head); the pointers
# lead, in the order that keeps ptxas's register count of the flat signature (191, not 204)
@triton.jit(do_not_specialize=["stride_btb"])  # the block table's width changes every step
def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, qstart_ptr, ctx_ptr, out_ptr, qk_scale, window,
        q_strides, k_strides, v_strides, stride_btb, out_strides,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_h = tl.program_id(2)
    q_start = tl.load(qstart_ptr + pid_b)
    q_len = tl.load(qstart_ptr + pid_b + 1) - q_start
    if pid_m * BLOCK_M >= q_len:  # this sequence has fewer query blocks than the longest
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < HEAD_DIM
    rows = pid_m * BLOCK_M + offs_m           # [BLOCK_M] query index inside the sequence
    row_ok = rows < q_len
    ctx = tl.load(ctx_ptr + pid_b)            # keys after this step's tokens are written
    pos = ctx - q_len + rows                  # [BLOCK_M] absolute position of each query
    g = pid_h // GROUP                        # the KV head of this query head
    tok = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * q_strides[0] + pid_h * q_strides[1] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, DP]
    # keys [lo, hi): up to the block's last query; a window starts at its first query's reach
    hi = tl.minimum(ctx - q_len + (pid_m + 1) * BLOCK_M, ctx)
    lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, ((ctx - q_len + pid_m * BLOCK_M - window + 1) // BLOCK_N) * BLOCK_N)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG_INIT
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n                 # [BLOCK_N] key positions
        key_in = (keys < hi) & (keys >= 0)
        # cache block of each key through the block table, then its row inside the block
        blk = tl.load(bt_ptr + pid_b * stride_btb + keys // BLOCK_SIZE, mask=key_in, other=0).to(tl.int64)
        krow = keys % BLOCK_SIZE
        kv_mask = key_in[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + blk[:, None] * k_strides[0] + krow[:, None] * k_strides[1] + g * k_strides[2]
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, DP]
        v = tl.load(v_ptr + blk[:, None] * v_strides[0] + krow[:, None] * v_strides[1] + g * v_strides[2]
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, DP]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        # causal: key j is visible to the query at position p iff j <= p (and inside the window)
        visible = key_in[None, :] & (keys[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (keys[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * out_strides[0] + pid_h * out_strides[1] + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            query_start: Tensor, context_lens: Tensor, scale: float,
                            sliding_window: int | None = None, *, max_query_len: int) -> Tensor:
    """Causal attention of each sequence's new queries over its paged KV cache (Triton).

    Semantics:
        for each sequence b: rows t in [query_start[b], query_start[b + 1]) are its q_len_b new
        tokens, the i-th at position context_lens[b] - q_len_b + i; their keys and values are
        already in the cache (with the sequence's earlier tokens).
        keys_b = k_cache[block_tables[b]].flatten(0, 1)   # [M * S, G, Dh], likewise values_b
        key j is visible to the query at position p iff j <= p (and j > p - sliding_window)
        out[t, h] = softmax(scale * q[t, h] @ keys_b[visible, h // (H / G)].T) @ values_b[visible, ...]
        Softmax and accumulation in fp32; only visible keys are read. No host sync.
    Args:
        q: [T, H, Dh] fp32/fp16/bf16, last dim contiguous.
        k_cache, v_cache: [N, S, G, Dh], q's dtype and device, last dim contiguous; H % G == 0.
        block_tables: [B, M] int32/int64, last dim contiguous: cache blocks of each sequence,
            padded with any valid id (not range-checked: that would need a host sync).
        query_start: [B + 1] int32/int64, non-decreasing, query_start[B] = T.
        context_lens: [B] int32/int64: keys of each sequence after this step, >= its q_len and
            <= M * S.
        scale: multiplier of q @ k; sliding_window: None or the window length (> 0).
        max_query_len: a host bound on max(q_len_b) (sizes the grid; larger only costs programs
            that return at once).
    Returns:
        [T, H, Dh] in q.dtype.
    """
    _check_args(q, k_cache, v_cache, block_tables, query_start, context_lens, sliding_window, max_query_len)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    kv_heads = k_cache.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m = 16 if q.dtype == torch.float32 else 64
    block_n = 32 if q.dtype == torch.float32 else 64
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start, context_lens, out, scale * _LOG2E, sliding_window or 0,
        q.stride()[:2], k_cache.stride()[:3], v_cache.stride()[:3], block_tables.stride(0), out.stride()[:2],
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        DP=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    return out


def paged_prefill_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                query_start: Tensor, context_lens: Tensor, scale: float,
                                sliding_window: int | None = None, *, max_query_len: int) -> Tensor:
    """Torch twin of `paged_prefill_attention` (same Semantics and Args): one sequence at a time,
    its keys gathered and one masked softmax in fp32. Reads the lengths on the host (syncs)."""
    _check_args(q, k_cache, v_cache, block_tables, query_start, context_lens, sliding_window, max_query_len)
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    starts, ctxs = query_start.tolist(), context_lens.tolist()
    for b, ctx in enumerate(ctxs):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        keys = k_cache[block_tables[b]].flatten(0, 1)[:ctx].repeat_interleave(group, dim=1)    # [C, H, Dh]
        values = v_cache[block_tables[b]].flatten(0, 1)[:ctx].repeat_interleave(group, dim=1)  # [C, H, Dh]
        pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)                               # [q_len]
        k_pos = torch.arange(ctx, device=q.device)
        visible = k_pos[None, :] <= pos[:, None]                                                # [q_len, C]
        if sliding_window is not None:
            visible &= k_pos[None, :] > pos[:, None] - sliding_window
        scores = torch.einsum("qhd,chd->hqc", q[lo:hi].float(), keys.float()) * scale
        probs = scores.masked_fill(~visible[None], float("-inf")).softmax(dim=-1)
        out[lo:hi] = torch.einsum("hqc,chd->qhd", probs, values.float()).to(q.dtype)
    return out


def _check_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, query_start: Tensor,
                context_lens: Tensor, sliding_window: int | None, max_query_len: int) -> None:
    check_paged_cache(q, k_cache, v_cache, block_tables, sliding_window, "T")
    num_seqs = block_tables.shape[0]
    expect(tuple(query_start.shape) == (num_seqs + 1,),
           f"query_start must be [B + 1 = {num_seqs + 1}], got {tuple(query_start.shape)}")
    expect(tuple(context_lens.shape) == (num_seqs,), f"context_lens must be [B={num_seqs}], got {tuple(context_lens.shape)}")
    for name, t in (("query_start", query_start), ("context_lens", context_lens)):
        expect(t.dtype in (torch.int32, torch.int64), f"{name} must be int32/int64, got {t.dtype}")
        expect(t.device == q.device, f"{name} must live on {q.device}, got {t.device}")
    expect(max_query_len >= 1, f"max_query_len must be >= 1, got {max_query_len}")
