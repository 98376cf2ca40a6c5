"""moe_align_virtual in one Triton program (small batches: decode and short prefill).

The torch version needs ~20 launches; in a captured decode step those launch gaps cost more
than the sort itself, so up to MAX_ROWS routed rows one program does it all: pack
(key, row) into int64, bitonic-sort, find pair boundaries, scan, scatter.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_ROWS = 4096  # H200, 4096 rows: this one CTA ~90 us, the torch path ~140 us (base M=512 0.47 vs 0.52 ms)
SINGLE_PROGRAM_ROWS = 512  # above: align_multi.py (H100 graph replay, lora: one program 6.6 us at 512 rows, 15 at 1024; multi 14.2, 14.4)
_ROW_BITS = 24  # row ids < 2**24 in the packed sort key


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit(do_not_specialize=["num_rows", "max_blocks"])  # one compile for every token count
def _align_kernel(topk_ids_ptr, slot_ids_ptr, sorted_ids_ptr, block_expert_ptr, block_slot_ptr,
                  num_blocks_ptr, scratch_ptr, num_rows, top_k, width, max_blocks,
                  HAS_SLOTS: tl.constexpr, EXPERT_MAJOR: tl.constexpr, BLOCK_SIZE: tl.constexpr, NP: tl.constexpr,
                  FILL: tl.constexpr, INVALID: tl.constexpr, ROW_BITS: tl.constexpr):
    offs = tl.arange(0, NP)
    in_rows = offs < num_rows
    expert = tl.load(topk_ids_ptr + offs, mask=in_rows, other=0).to(tl.int64)
    slot = tl.zeros([NP], dtype=tl.int64)
    if HAS_SLOTS:
        slot = tl.load(slot_ids_ptr + offs // top_k, mask=in_rows, other=-1).to(tl.int64)
    if EXPERT_MAJOR:  # rows without adapter stay, as pairs (e, -1)
        key = tl.where(in_rows, expert * width + slot + 1, INVALID)
    else:
        key = tl.where(in_rows & (slot >= 0), slot * width + expert, INVALID)
    # sort (key, row) pairs; the row in the low bits keeps equal keys in row order
    packed = tl.sort((key << ROW_BITS) | offs.to(tl.int64))
    key = packed >> ROW_BITS
    row = (packed & ((1 << ROW_BITS) - 1)).to(tl.int32)
    valid = key != INVALID
    # neighbours' keys go through scratch memory: a pair starts where the key changes
    tl.store(scratch_ptr + offs, key)
    tl.debug_barrier()
    prev = tl.load(scratch_ptr + offs - 1, mask=offs > 0, other=-1)
    nxt = tl.load(scratch_ptr + offs + 1, mask=offs < NP - 1, other=-2)
    start = tl.associative_scan(tl.where(key != prev, offs, 0), 0, _max_combine)
    pos = offs - start  # position inside its pair
    pair_blocks = tl.where((key != nxt) & valid, pos // BLOCK_SIZE + 1, 0)  # on each pair's last row
    blocks_before = tl.cumsum(pair_blocks, 0) - pair_blocks
    # pad everything first, then scatter the rows and block table over it
    for i in range(0, max_blocks * BLOCK_SIZE, FILL):
        f = i + tl.arange(0, FILL)
        tl.store(sorted_ids_ptr + f, tl.zeros([FILL], tl.int32) + num_rows, mask=f < max_blocks * BLOCK_SIZE)
    for i in range(0, max_blocks, FILL):
        f = i + tl.arange(0, FILL)
        tl.store(block_expert_ptr + f, tl.full([FILL], -1, tl.int32), mask=f < max_blocks)
        tl.store(block_slot_ptr + f, tl.full([FILL], -1, tl.int32), mask=f < max_blocks)
    tl.debug_barrier()
    tl.store(sorted_ids_ptr + blocks_before * BLOCK_SIZE + pos, row, mask=valid)
    first = valid & (pos % BLOCK_SIZE == 0)
    block = blocks_before + pos // BLOCK_SIZE
    if EXPERT_MAJOR:
        tl.store(block_expert_ptr + block, (key // width).to(tl.int32), mask=first)
        tl.store(block_slot_ptr + block, (key % width - 1).to(tl.int32), mask=first)
    else:
        tl.store(block_expert_ptr + block, (key % width).to(tl.int32), mask=first)
        tl.store(block_slot_ptr + block, (key // width).to(tl.int32), mask=first)
    tl.store(num_blocks_ptr, tl.sum(pair_blocks, 0).to(tl.int32))


def align_triton(topk_ids: Tensor, slot_ids: Tensor | None, num_experts: int, block_size: int,
                 max_blocks: int, width: int, expert_major: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sorted_ids, block_expert, block_slot, num_blocks) as moe_align_virtual defines them;
    width = E (slot-major keys) or S + 1 (expert-major keys)."""
    num_rows = topk_ids.numel()
    dev = topk_ids.device
    np2 = max(16, triton.next_power_of_2(num_rows))
    sorted_ids = torch.empty(max_blocks * block_size, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    block_slot = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_blocks = torch.empty(1, dtype=torch.int32, device=dev)
    scratch = torch.empty(np2, dtype=torch.int64, device=dev)
    ids = topk_ids.reshape(-1)
    _align_kernel[(1,)](
        ids, slot_ids if slot_ids is not None else ids, sorted_ids, block_expert, block_slot,
        num_blocks, scratch, num_rows, topk_ids.shape[1], width, max_blocks,
        HAS_SLOTS=slot_ids is not None, EXPERT_MAJOR=expert_major, BLOCK_SIZE=block_size, NP=np2, FILL=1024,
        INVALID=1 << 38, ROW_BITS=_ROW_BITS, num_warps=4 if np2 <= 1024 else 8 if np2 <= 2048 else 16)
    return sorted_ids, block_expert, block_slot, num_blocks
