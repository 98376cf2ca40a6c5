"""Routing alignment: routed rows sorted by virtual expert (adapter slot, expert).

On the Triton path: one program for small batches (align_triton.py), a multi-program counting
sort above that (align_multi.py); the torch ops here otherwise (CPU, or key spaces too large).
Every path runs on the device of its inputs without reading a value back to the host, so
a decode step that calls it can be captured in a CUDA graph (DESIGN.md rule 7).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.checks import expect
from kernels.dispatch import use_triton

_INVALID_KEY = torch.iinfo(torch.int64).max  # sorts rows without an adapter last


@dataclass(slots=True)
class VirtualLayout:
    """Routed rows grouped by virtual expert, each group padded to a whole number of blocks.

    A row is r = t * K + k (token t's k-th routed expert). Only (slot, expert) pairs present
    in the batch get blocks, so the size follows the work, not S x E.
    """

    sorted_ids: Tensor  # [max_blocks * block_size] int32: row ids by block; pad = num_rows
    block_expert: Tensor  # [max_blocks] int32 expert of each block; -1 past num_blocks
    block_slot: Tensor  # [max_blocks] int32 slot of each block; -1 past num_blocks
    num_blocks: Tensor  # [1] int32 blocks in use (device scalar: read in kernels, not on host)
    block_size: int
    num_rows: int  # T * K
    max_blocks: int  # host-side bound on num_blocks, sizes the launch grids


def max_blocks_bound(num_rows: int, num_pairs_bound: int, block_size: int) -> int:
    """Upper bound of blocks: sum_p ceil(c_p / bs) <= ceil(rows / bs) + pairs."""
    return -(-num_rows // block_size) + min(num_rows, num_pairs_bound)


def moe_align_virtual(topk_ids: Tensor, slot_ids: Tensor | None, num_experts: int,
                      block_size: int, num_slots: int | None = None,
                      expert_major: bool = False) -> VirtualLayout:
    """Sorts routed rows by (slot, expert) pair and pads each pair to block_size.

    Semantics:
        row r = t * K + k belongs to pair (slot_ids[t], topk_ids[t, k]); rows with slot -1 are
        left out. Pairs are ordered by slot * E + expert; block b holds rows
        sorted_ids[b*bs:(b+1)*bs] of pair (block_slot[b], block_expert[b]) (pad id = T * K).
        slot_ids=None puts every row in slot 0: the plain per-expert layout of the base MoE.

    Args:
        topk_ids: [T, K] integer expert ids in [0, num_experts).
        slot_ids: [T] integer adapter slot per token, -1 for none; or None.
        num_experts: E.
        block_size: rows per block (the M tile of the grouped GEMMs).
        num_slots: S, if known; only tightens the host-side bound max_blocks.
        expert_major: order pairs by expert * (S + 1) + slot + 1 and keep rows without an
            adapter as pairs (e, -1): the layout of the fused base + LoRA launch (needs num_slots).
    Returns:
        VirtualLayout of device tensors.
    """
    expect(topk_ids.dim() == 2, f"topk_ids must be [T, K], got {tuple(topk_ids.shape)}")
    expect(block_size > 0, f"block_size must be positive, got {block_size}")
    num_tokens, top_k = topk_ids.shape
    num_rows = num_tokens * top_k
    if slot_ids is not None:
        expect(tuple(slot_ids.shape) == (num_tokens,), f"slot_ids must be [T={num_tokens}], got {tuple(slot_ids.shape)}")
    expect(not expert_major or (slot_ids is not None and num_slots), "expert_major needs slot_ids and num_slots")
    pairs_bound = num_experts if slot_ids is None else num_experts * ((num_slots or num_rows) + expert_major)
    max_blocks = max_blocks_bound(num_rows, pairs_bound, block_size)
    width = num_slots + 1 if expert_major else num_experts
    if use_triton(topk_ids) and 0 < num_rows:
        tensors = _align_triton(topk_ids, slot_ids, num_experts, block_size, max_blocks, num_slots, width,
                                expert_major)
        if tensors is not None:
            return VirtualLayout(*tensors, block_size=block_size, num_rows=num_rows, max_blocks=max_blocks)
    key = topk_ids.reshape(-1).to(torch.int64)
    if slot_ids is not None:
        slots = slot_ids.to(torch.int64).repeat_interleave(top_k)  # [T*K]
        if expert_major:
            key = key * width + slots + 1
        else:
            key = torch.where(slots >= 0, slots * width + key, _INVALID_KEY)
    return _layout_from_keys(key, width, expert_major, block_size, max_blocks)


def _align_triton(topk_ids: Tensor, slot_ids: Tensor | None, num_experts: int, block_size: int,
                  max_blocks: int, num_slots: int | None, width: int,
                  expert_major: bool) -> tuple[Tensor, ...] | None:
    """The Triton alignment for this batch, or None where the torch path takes it: one program
    up to SINGLE_PROGRAM_ROWS rows, the multi-program counting sort above that when the key
    space is known (num_slots given) and bounded, else one program up to its MAX_ROWS."""
    from kernels.moe.align_multi import KeySpace, align_multi, multi_fits
    from kernels.moe.align_triton import MAX_ROWS, SINGLE_PROGRAM_ROWS, align_triton
    num_rows = topk_ids.numel()
    if num_rows > SINGLE_PROGRAM_ROWS and (slot_ids is None or num_slots):
        space = KeySpace(num_experts, num_slots if slot_ids is not None else 1, slot_ids is not None, expert_major)
        if multi_fits(num_rows, space):
            return align_multi(topk_ids, slot_ids, space, block_size, max_blocks)
    if num_rows <= MAX_ROWS:
        return align_triton(topk_ids, slot_ids, num_experts, block_size, max_blocks, width, expert_major)
    return None


def _layout_from_keys(key: Tensor, width: int, expert_major: bool, block_size: int,
                      max_blocks: int) -> VirtualLayout:
    num_rows = key.shape[0]
    dev = key.device
    sorted_key, order = torch.sort(key, stable=True)  # [T*K]
    valid = sorted_key != _INVALID_KEY
    idx = torch.arange(num_rows, device=dev)
    is_new = torch.ones(num_rows, dtype=torch.bool, device=dev)
    is_new[1:] = sorted_key[1:] != sorted_key[:-1]
    pair = torch.cumsum(is_new, 0) - 1  # [T*K] pair index of each sorted row
    start = torch.cummax(torch.where(is_new, idx, 0), 0).values  # first sorted row of its pair
    counts = torch.zeros(num_rows, dtype=torch.int64, device=dev).scatter_add_(0, pair, valid.long())
    pair_blocks = (counts + block_size - 1) // block_size  # [P] blocks of each pair
    block_end = torch.cumsum(pair_blocks, 0)  # inclusive end block of each pair
    dest = (block_end - pair_blocks)[pair] * block_size + (idx - start)
    dump = max_blocks * block_size  # rows without an adapter land in one slot cut off below
    dest = torch.where(valid, dest, dump)
    sorted_ids = torch.full((dump + 1,), num_rows, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    blocks = torch.arange(max_blocks, device=dev)
    block_pair = torch.searchsorted(block_end, blocks, right=True).clamp_(max=num_rows - 1)
    pair_key = torch.zeros(num_rows, dtype=torch.int64, device=dev).scatter_(0, pair, sorted_key)
    block_key = pair_key[block_pair]
    num_blocks = block_end[-1:]
    in_use = blocks < num_blocks
    minus_one = torch.full_like(block_key, -1)
    expert, slot = block_key % width, block_key // width  # slot-major: key = slot * E + expert
    if expert_major:  # key = expert * (S + 1) + slot + 1
        expert, slot = block_key // width, block_key % width - 1
    return VirtualLayout(
        sorted_ids=sorted_ids[:dump],
        block_expert=torch.where(in_use, expert, minus_one).to(torch.int32),
        block_slot=torch.where(in_use, slot, minus_one).to(torch.int32),
        num_blocks=num_blocks.to(torch.int32),
        block_size=block_size,
        num_rows=num_rows,
        max_blocks=max_blocks,
    )
