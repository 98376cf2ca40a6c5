"""Paged attention for decode (one query per sequence) straight from the block-paged KV cache.

One program per (sequence, KV head, context partition): it holds the H / G query heads of its
KV head as one tile, walks only the sequence's own keys (the loop bound comes from its
position, so a padded block table costs nothing) and gathers each key tile through the block
table, with an online softmax in fp32. With more than one partition ("flash-decoding", for
few sequences x KV heads against many SMs) each writes a partial result and a second kernel
merges them. No host sync: every size comes from shapes, so the launch is CUDA-graph safe.
B = sequences, H = query heads, G = KV heads, Dh = head dim, N = cache blocks, S = block size,
M = blocks per sequence (padded), P = context partitions.
"""
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.checks import FLOAT_DTYPES
from kernels.errors import expect

_NEG_INIT = tl.constexpr(-1.0e30)  # running max before any key: finite, so a fully masked tile gives exp(-inf) = 0
_LOG2E = 1.4426950408889634
_PROGRAMS_PER_SM = 2  # with fewer programs than SMs, split the context until about this many per SM


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One key tile of an online softmax: s [rows, keys] scores in log2 units (masked keys -inf),
    v [keys, Dh]; the running max m_i, sum l_i [rows] and output acc [rows, Dh] -> their updates.
    The decode and prefill kernels share it."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# the block table's width and the partition length change with the step's longest context:
# not specialised, so they compile nothing new (NUM_PARTS still does: one compile per count in
# eager steps; a runtime count with a looping merge is the plan, once it can be run on a GPU)
# strides as tuples: q and out (sequence, head), the caches (block, row, KV head); the pointers
# lead, in the flat signature's order (ptxas allocates registers by it)
@triton.jit(do_not_specialize=["part_keys", "stride_btb"])
def _decode_partition_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, pos_ptr, out_ptr, part_m_ptr, part_l_ptr, part_o_ptr,
        qk_scale, part_keys, window, q_strides, k_strides, v_strides, stride_btb, out_strides,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HP: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PARTS: tl.constexpr,
        HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_p = tl.program_id(2)
    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, DP)
    offs_n = tl.arange(0, BLOCK_N)
    head_ok = offs_h < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = pid_g * GROUP + offs_h  # [HP] query heads of this KV head
    # the H / G query rows of this KV head: [HP, DP], padded rows and columns are 0
    q = tl.load(q_ptr + pid_b * q_strides[0] + heads[:, None] * q_strides[1] + offs_d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)
    # visible keys are [first, pos]; this partition owns [part_start, part_start + part_keys)
    pos = tl.load(pos_ptr + pid_b)
    first = pos * 0
    if HAS_WINDOW:
        first = tl.maximum(first, pos - window + 1)
    part_start = pid_p * part_keys
    lo = tl.maximum(part_start, (first // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(part_start + part_keys, pos + 1)
    m_i = tl.zeros([HP], dtype=tl.float32) + _NEG_INIT
    l_i = tl.zeros([HP], dtype=tl.float32)
    acc = tl.zeros([HP, DP], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n                      # [BLOCK_N] key positions
        key_ok = (keys < hi) & (keys >= first)
        # cache block of each key through the block table, then its row inside the block
        blk = tl.load(bt_ptr + pid_b * stride_btb + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        row = keys % BLOCK_SIZE
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + blk[:, None] * k_strides[0] + row[:, None] * k_strides[1] + pid_g * k_strides[2]
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, DP]
        v = tl.load(v_ptr + blk[:, None] * v_strides[0] + row[:, None] * v_strides[1] + pid_g * v_strides[2]
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, DP]
        # scores in log2 units: [HP, BLOCK_N]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    # an empty partition (l = 0) writes zeros and weight 0
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = head_ok[:, None] & d_ok[None, :]
    if NUM_PARTS == 1:
        tl.store(out_ptr + pid_b * out_strides[0] + heads[:, None] * out_strides[1] + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partials are [B, H, P] and [B, H, P, Dh], contiguous
        row_bh = (pid_b * GROUP * tl.num_programs(1) + heads) * NUM_PARTS + pid_p  # [HP]
        tl.store(part_m_ptr + row_bh, m_i, mask=head_ok)
        tl.store(part_l_ptr + row_bh, l_i, mask=head_ok)
        tl.store(part_o_ptr + row_bh[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)


@triton.jit
def _merge_partitions_kernel(part_m_ptr, part_l_ptr, part_o_ptr, out_ptr, num_heads,
                             stride_ob, stride_oh,
                             HEAD_DIM: tl.constexpr, NUM_PARTS: tl.constexpr,
                             PP: tl.constexpr, DP: tl.constexpr):
    pid = tl.program_id(0)  # = b * H + h
    offs_p = tl.arange(0, PP)
    offs_d = tl.arange(0, DP)
    p_ok = offs_p < NUM_PARTS
    d_ok = offs_d < HEAD_DIM
    m = tl.load(part_m_ptr + pid * NUM_PARTS + offs_p, mask=p_ok, other=_NEG_INIT)  # [PP]
    l = tl.load(part_l_ptr + pid * NUM_PARTS + offs_p, mask=p_ok, other=0.0)        # [PP]
    o = tl.load(part_o_ptr + (pid * NUM_PARTS + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=p_ok[:, None] & d_ok[None, :], other=0.0)                        # [PP, DP]
    # each partition's share: its softmax mass relative to the global max
    w = l * tl.exp2(m - tl.max(m, 0))
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    b = pid // num_heads
    h = pid % num_heads
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           positions: Tensor, scale: float, sliding_window: int | None = None,
                           *, num_partitions: int | None = None) -> Tensor:
    """Decode attention of one query per sequence over its paged KV cache (Triton).

    Semantics:
        keys_b = k_cache[block_tables[b]].flatten(0, 1)   # [M * S, G, Dh], likewise values_b
        key j is visible to sequence b iff j <= positions[b] (and j > positions[b] - sliding_window)
        out[b, h] = softmax(scale * q[b, h] @ keys_b[visible, h // (H / G)].T) @ values_b[visible, ...]
        Softmax and accumulation in fp32. Only the visible keys are read, so a padded block
        table costs nothing; a padded row (table of 0s, position 0) attends key 0 of block 0.
        No host sync (CUDA-graph safe).
    Args:
        q: [B, H, Dh] fp32/fp16/bf16, last dim contiguous.
        k_cache, v_cache: [N, S, G, Dh], q's dtype and device, last dim contiguous; H % G == 0.
        block_tables: [B, M] int32/int64, last dim contiguous: cache blocks of each sequence,
            padded with any valid id (not range-checked: that would need a host sync).
        positions: [B] int: position of each sequence's query (its context is positions + 1,
            at most M * S keys).
        scale: multiplier of q @ k; sliding_window: None or the window length (> 0).
        num_partitions: split each context into this many partitions merged by a second kernel;
            None picks 1 when B * G fills the GPU, else enough for about 2 programs per SM.
    Returns:
        [B, H, Dh] in q.dtype.
    """
    _check_args(q, k_cache, v_cache, block_tables, positions, sliding_window)
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_keys = block_tables.shape[1] * block_size
    block_n = 32 if q.dtype == torch.float32 else 64  # H100, B 64, 576 keys: 64 keys/tile 33 us, 32: 38 us
    if num_partitions is None:
        num_partitions = _pick_partitions(num_seqs * kv_heads, max_keys, block_n, q.device)
    expect(num_partitions >= 1, f"num_partitions must be >= 1, got {num_partitions}")
    # partitions are whole key tiles, so a partition's tiles never straddle two partitions
    part_keys = triton.cdiv(triton.cdiv(max_keys, num_partitions), block_n) * block_n
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_partitions > 1:
        part_m = torch.empty(num_seqs, num_heads, num_partitions, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_o = torch.empty(num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32,
                             device=q.device)
    else:
        part_m = part_l = part_o = out  # unused
    group = num_heads // kv_heads
    dp = max(16, triton.next_power_of_2(head_dim))
    _decode_partition_kernel[(num_seqs, kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, positions, out, part_m, part_l, part_o,
        scale * _LOG2E, part_keys, sliding_window or 0,
        q.stride()[:2], k_cache.stride()[:3], v_cache.stride()[:3], block_tables.stride(0), out.stride()[:2],
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        HP=max(16, triton.next_power_of_2(group)), DP=dp, BLOCK_N=block_n,
        NUM_PARTS=num_partitions, HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=3)
    if num_partitions > 1:
        _merge_partitions_kernel[(num_seqs * num_heads,)](
            part_m, part_l, part_o, out, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_PARTS=num_partitions,
            PP=max(2, triton.next_power_of_2(num_partitions)), DP=dp, num_warps=4)
    return out


def paged_decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                               positions: Tensor, scale: float,
                               sliding_window: int | None = None) -> Tensor:
    """Torch twin of `paged_decode_attention`: gather every sequence's blocks, one masked softmax."""
    _check_args(q, k_cache, v_cache, block_tables, positions, sliding_window)
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    keys = k_cache[block_tables].flatten(1, 2).permute(0, 2, 3, 1)   # [B, G, Dh, M * S]
    values = v_cache[block_tables].flatten(1, 2).transpose(1, 2)     # [B, G, M * S, Dh]
    q_grouped = q.view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)  # [B, G, H/G, Dh]
    scores = torch.matmul(q_grouped, keys).float() * scale            # [B, G, H/G, M * S]
    k_pos = torch.arange(keys.shape[-1], device=q.device)
    visible = k_pos[None, :] <= positions[:, None]                    # [B, M * S]
    if sliding_window is not None:
        visible &= k_pos[None, :] > positions[:, None] - sliding_window
    probs = scores.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(dim=-1)
    # rows a sequence does not see hold what their block held before (another sequence's KV):
    # a weight of 0 times a NaN there is NaN, so they are zeroed, as the kernel's masked loads read them
    values = values.masked_fill(~visible[:, None, :, None], 0.0)
    return torch.matmul(probs.to(q.dtype), values).reshape(num_seqs, num_heads, head_dim)


def _pick_partitions(num_programs: int, max_keys: int, block_n: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if num_programs >= sms:
        return 1
    target = _PROGRAMS_PER_SM * sms
    # at least 4 key tiles per partition, so the merge stays cheap next to the work; a power of
    # two (rounded down), because the count is a constexpr: eager decode groups of any size then
    # meet one of a few compiled variants (ModelRunner's warm-up runs one of each)
    parts = max(1, min(triton.cdiv(target, num_programs), max_keys // (4 * block_n)))
    return 1 << (parts.bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_paged_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                      sliding_window: int | None, q_shape: str) -> None:
    """The checks every paged attention op makes of q, the caches, the block table and the
    window (q_shape names q's dims in the messages: "B" for decode, "T" for prefill)."""
    expect(q.dim() == 3, f"q must be [{q_shape}, H, Dh], got {tuple(q.shape)}")
    expect(q.dtype in FLOAT_DTYPES, f"q must be fp32/fp16/bf16, got {q.dtype}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    expect(k_cache.dim() == 4 and k_cache.shape[3] == head_dim,
           f"k_cache must be [N, S, G, Dh={head_dim}], got {tuple(k_cache.shape)}")
    expect(v_cache.shape == k_cache.shape,
           f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    kv_heads = k_cache.shape[2]
    expect(num_heads % kv_heads == 0, f"query heads H={num_heads} must be a multiple of KV heads G={kv_heads}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        expect(t.dtype == q.dtype, f"{name} dtype {t.dtype} must match q's {q.dtype}")
        expect(t.device == q.device, f"{name} must live on {q.device}, got {t.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        expect(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    expect(block_tables.dim() == 2, f"block_tables must be [B, M], got {tuple(block_tables.shape)}")
    expect(block_tables.dtype in (torch.int32, torch.int64), f"block_tables must be int32/int64, got {block_tables.dtype}")
    expect(block_tables.device == q.device, f"block_tables must live on {q.device}, got {block_tables.device}")
    expect(sliding_window is None or sliding_window > 0, f"sliding_window must be None or > 0, got {sliding_window}")


def _check_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                positions: Tensor, sliding_window: int | None) -> None:
    check_paged_cache(q, k_cache, v_cache, block_tables, sliding_window, "B")
    num_seqs = q.shape[0]
    expect(block_tables.shape[0] == num_seqs, f"block_tables must be [B={num_seqs}, M], got {tuple(block_tables.shape)}")
    expect(tuple(positions.shape) == (num_seqs,), f"positions must be [B={num_seqs}], got {tuple(positions.shape)}")
    expect(not positions.is_floating_point(), f"positions must be integer, got {positions.dtype}")
    expect(positions.device == q.device, f"positions must live on {q.device}, got {positions.device}")
