"""Paged attention in plain torch: gather each sequence's KV blocks, then one SDPA call per group.

A step's tokens come in up to two groups, decodes first (one query each) and then prefill
chunks, so decodes are not padded to the longest prefill chunk.
T = tokens in the step, B = sequences of a group, M = blocks per sequence (padded),
S = block size, H = query heads, G = KV heads, Dh = head dim, Q = longest query of the group,
C = longest context of the group.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import use_triton
from kernels.attention.paged_attention import paged_decode_attention
from kernels.attention.prefill_attention import paged_prefill_attention


@dataclass(slots=True)
class AttentionGroup:
    start: int              # the group's tokens are [start, end) of the step
    end: int
    block_tables: Tensor    # [B, M] int64: KV blocks of each sequence, padded with 0
    token_seq: Tensor       # [end - start] int64: row of each token's sequence in block_tables
    token_row: Tensor       # [end - start] int64: index of each token among its sequence's queries
    max_query_len: int      # Q
    max_context_len: int    # C: longest KV length after this step's tokens are written
    # for kernels.paged_prefill_attention (prefill groups): [B + 1] row starts, [B] KV lengths
    query_start: Tensor | None = None
    context_lens: Tensor | None = None


@dataclass(slots=True)
class ForwardBatch:
    """Device tensors of one step, built by ModelRunner (the only place lists become tensors)."""
    positions: Tensor       # [T] int64: absolute position of each token in its sequence
    slot_mapping: Tensor    # [T] int64: flat KV-cache slot (block * S + offset) each token writes
    groups: list[AttentionGroup] = field(default_factory=list)
    lora_slot_ids: Tensor | None = None  # [T] int32: adapter slot per token, -1 = base model
    lora_layout: object | None = None  # kernels.VirtualLayout of the rows by slot, set by the model
    # for the step so q/k/v/o LoRA share one alignment (None off the Triton path)
    triton_prefill: bool = False  # prefill groups through kernels.paged_prefill_attention (Triton path)
    kv_index: tuple[Tensor, Tensor] | None = None  # (block, row) of each slot, set by the first write_kv


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, batch: ForwardBatch) -> None:
    """k_cache, v_cache [N, S, G, Dh] (strided views of the block-major cache); k, v [T, G, Dh]:
    store each token at its slot, block slot // S, row slot % S (computed once a step)."""
    if batch.kv_index is None:
        batch.kv_index = (batch.slot_mapping // k_cache.shape[1], batch.slot_mapping % k_cache.shape[1])
    k_cache[batch.kv_index] = k
    v_cache[batch.kv_index] = v


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: ForwardBatch,
                    scale: float, sliding_window: int | None = None) -> Tensor:
    """Causal attention of q [T, H, Dh] over each sequence's cached keys; returns [T, H, Dh]."""
    if len(batch.groups) == 1:
        return _attend(q, batch.positions, k_cache, v_cache, batch.groups[0], scale, sliding_window,
                       batch.triton_prefill)
    out = torch.empty_like(q)
    for g in batch.groups:
        out[g.start:g.end] = _attend(q[g.start:g.end], batch.positions[g.start:g.end],
                                     k_cache, v_cache, g, scale, sliding_window, batch.triton_prefill)
    return out


def _attend(q: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor, g: AttentionGroup,
            scale: float, sliding_window: int | None, triton_prefill: bool = False) -> Tensor:
    if g.max_query_len == 1:
        return _decode_attend(q, positions, k_cache, v_cache, g, scale, sliding_window)
    if triton_prefill and g.query_start is not None and use_triton(q):
        return paged_prefill_attention(q, k_cache, v_cache, g.block_tables, g.query_start, g.context_lens,
                                       scale, sliding_window, max_query_len=g.max_query_len)
    num_seqs, ctx = g.block_tables.shape[0], g.max_context_len
    keys = k_cache[g.block_tables].flatten(1, 2)[:, :ctx]    # [B, C, G, Dh]
    values = v_cache[g.block_tables].flatten(1, 2)[:, :ctx]  # [B, C, G, Dh]
    q_pad = q.new_zeros(num_seqs, g.max_query_len, *q.shape[1:])  # [B, Q, H, Dh]
    q_pad[g.token_seq, g.token_row] = q
    q_pos = positions.new_zeros(num_seqs, g.max_query_len)  # [B, Q]
    q_pos[g.token_seq, g.token_row] = positions
    k_pos = torch.arange(ctx, device=q.device)
    # key j is visible to a query at position p iff j <= p (and inside the window); this also
    # hides the padded tail of each block table, which lies beyond every real query's position
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, C]
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    seen = mask.any(dim=1)
    # SDPA adds the mask as -inf: a NaN key there would still give NaN, so keys are zeroed too
    keys, values = _hide_unseen(keys, seen), _hide_unseen(values, seen)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=keys.shape[2] != q.shape[1])
    return out.transpose(1, 2)[g.token_seq, g.token_row]  # [T_group, H, Dh]


def _decode_attend(q: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor, g: AttentionGroup,
                   scale: float, sliding_window: int | None) -> Tensor:
    """One query per sequence (token i is sequence i): the H / G query heads sharing a KV head
    attend together, so KV is never expanded to H heads (decode is bound by reading KV).
    With Triton, one kernel reads each sequence's blocks in place up to its own position."""
    if use_triton(q):
        return paged_decode_attention(q, k_cache, v_cache, g.block_tables, positions, scale, sliding_window)
    num_seqs, heads, head_dim = q.shape
    ctx, kv_heads = g.max_context_len, k_cache.shape[2]
    keys = k_cache[g.block_tables].flatten(1, 2)[:, :ctx].permute(0, 2, 3, 1)    # [B, G, Dh, C]
    values = v_cache[g.block_tables].flatten(1, 2)[:, :ctx].transpose(1, 2)      # [B, G, C, Dh]
    q_grouped = q.view(num_seqs, kv_heads, heads // kv_heads, head_dim)         # [B, G, H/G, Dh]
    scores = torch.matmul(q_grouped, keys).float() * scale                       # [B, G, H/G, C]
    k_pos = torch.arange(ctx, device=q.device)
    visible = k_pos[None, :] <= positions[:, None]                               # [B, C]
    if sliding_window is not None:
        visible &= k_pos[None, :] > positions[:, None] - sliding_window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    values = _hide_unseen(values.transpose(1, 2), visible).transpose(1, 2)
    return torch.matmul(probs, values).reshape(num_seqs, heads, head_dim)       # [B, H, Dh]


def _hide_unseen(values: Tensor, seen: Tensor) -> Tensor:
    """values [B, C, ...] with the rows no query of their sequence sees (seen [B, C] False) zeroed.
    Those rows hold what their block held before (another sequence's KV, adapter bytes the heap
    borrowed), and a softmax weight of 0 times a NaN there is NaN: one tenant's non-finite KV
    would reach another's output. The Triton kernels' masked loads never read another sequence's rows."""
    return values.masked_fill(~seen.view(*seen.shape, *(1,) * (values.dim() - 2)), 0.0)
