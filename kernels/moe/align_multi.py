"""moe_align_virtual for large batches: a counting sort over virtual-expert keys, three launches.

Keys are small integers (slot * E + expert, or expert * (S + 1) + slot + 1), so rows are
counted, not sorted:
1. `_chunk_count_kernel`, one program per chunk of CHUNK rows: each row's rank among the
   earlier rows of its chunk with the same key, the chunk's count of every key (a
   [chunks, keys] table), and its share of the output fill (pad ids, -1 blocks).
2. `_key_scan_kernel`, one program per tile of keys: the table becomes, per key, the rows of
   that key in earlier chunks; each key's padded block count and block offset in its tile.
3. `_scatter_kernel`, one program per chunk: a row's position = its key's first block * bs +
   its rank among the key's rows (earlier chunks + earlier in its chunk); the first row of
   each block writes the block table.
Ranks come from counts in row order, never from racing atomics: the layout is deterministic
and rows stay in ascending order inside a pair, bitwise equal to the torch path.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 256  # rows per program in kernels 1 and 3
MAX_CHUNKS = 256  # more chunks than this: the torch path
MAX_KEY_TILES = 256  # the key space must fit MAX_KEY_TILES tiles of kernel 2
_SCAN_ELEMS = 16384  # [chunks, keys] elements one program of kernel 2 scans


@dataclass(slots=True)
class KeySpace:
    """How routed rows map to keys: num_experts E, num_slots S (1 without slots)."""

    num_experts: int
    num_slots: int
    has_slots: bool
    expert_major: bool

    @property
    def num_keys(self) -> int:
        return self.num_experts * (self.num_slots + self.expert_major)


def _tiling(num_rows: int, num_keys: int, chunk: int) -> tuple[int, int, int]:
    """(chunks, key_tile, key_tiles) for a batch: wide key tiles when there are few chunks."""
    chunks = -(-num_rows // chunk)
    key_tile = max(16, min(1024, _SCAN_ELEMS // triton.next_power_of_2(chunks)))
    key_tile = min(key_tile, max(16, triton.next_power_of_2(num_keys)))
    return chunks, key_tile, -(-num_keys // key_tile)


def multi_fits(num_rows: int, space: KeySpace, chunk: int = CHUNK) -> bool:
    """True when align_multi handles this batch (bounded scratch and per-program tiles)."""
    if num_rows <= 0 or space.num_keys <= 0:
        return False
    chunks, _, key_tiles = _tiling(num_rows, space.num_keys, chunk)
    return chunks <= MAX_CHUNKS and key_tiles <= MAX_KEY_TILES


@triton.jit
def _row_keys(topk_ids_ptr, slot_ids_ptr, rows, num_rows, top_k, num_experts, num_slots,
              HAS_SLOTS: tl.constexpr, EXPERT_MAJOR: tl.constexpr):
    """Key of each row, -1 for rows left out (no adapter in slot-major, past the end, or ids
    out of range: dropped rather than written out of bounds)."""
    in_rows = rows < num_rows
    expert = tl.load(topk_ids_ptr + rows, mask=in_rows, other=0).to(tl.int32)
    slot = tl.zeros_like(expert)
    if HAS_SLOTS:
        slot = tl.load(slot_ids_ptr + rows // top_k, mask=in_rows, other=0).to(tl.int32)
    ok = in_rows & (expert >= 0) & (expert < num_experts) & (slot < num_slots)
    if EXPERT_MAJOR:  # rows without adapter stay, as pairs (e, -1)
        key = expert * (num_slots + 1) + slot + 1
        ok = ok & (slot >= -1)
    else:
        key = slot * num_experts + expert
        ok = ok & (slot >= 0)
    return tl.where(ok, key, -1)


# one compile for every token count: the sizes that follow it are not specialised either
@triton.jit(do_not_specialize=["num_rows", "num_sorted", "max_blocks", "sorted_share", "block_share"])
def _chunk_count_kernel(topk_ids_ptr, slot_ids_ptr, rank_ptr, counts_ptr, sorted_ids_ptr,
                        block_expert_ptr, block_slot_ptr, num_rows, top_k, num_experts, num_slots,
                        num_keys, num_sorted, max_blocks, sorted_share, block_share,
                        HAS_SLOTS: tl.constexpr, EXPERT_MAJOR: tl.constexpr, CHUNK: tl.constexpr,
                        SUB: tl.constexpr, FILL: tl.constexpr):
    pid = tl.program_id(0)
    # this program's share of the output fill (kernel 3 writes rows and blocks over it)
    for i in range(0, sorted_share, FILL):
        f = pid * sorted_share + i + tl.arange(0, FILL)
        tl.store(sorted_ids_ptr + f, tl.zeros([FILL], tl.int32) + num_rows, mask=f < num_sorted)
    for i in range(0, block_share, FILL):
        f = pid * block_share + i + tl.arange(0, FILL)
        tl.store(block_expert_ptr + f, tl.full([FILL], -1, tl.int32), mask=f < max_blocks)
        tl.store(block_slot_ptr + f, tl.full([FILL], -1, tl.int32), mask=f < max_blocks)
    # this chunk's row of the count table: zero, then the counts of the keys present
    counts_row = counts_ptr + pid.to(tl.int64) * num_keys
    for i in range(0, num_keys, FILL):
        f = i + tl.arange(0, FILL)
        tl.store(counts_row + f, tl.zeros([FILL], tl.int32), mask=f < num_keys)
    local = tl.arange(0, CHUNK)
    key = _row_keys(topk_ids_ptr, slot_ids_ptr, pid * CHUNK + local, num_rows, top_k,
                    num_experts, num_slots, HAS_SLOTS, EXPERT_MAJOR)
    rank = tl.zeros([CHUNK], tl.int32)  # rows of the chunk before this one with its key
    total = tl.zeros([CHUNK], tl.int32)  # rows of the chunk with its key
    for j in tl.static_range(0, CHUNK, SUB):  # unrolled: the loads of all sub-tiles go out at once
        other_local = j + tl.arange(0, SUB)
        other = _row_keys(topk_ids_ptr, slot_ids_ptr, pid * CHUNK + other_local, num_rows, top_k,
                          num_experts, num_slots, HAS_SLOTS, EXPERT_MAJOR)
        same = (key[:, None] == other[None, :]) & (other[None, :] >= 0)  # [CHUNK, SUB]
        earlier = same & (other_local[None, :] < local[:, None])
        rank += tl.sum(earlier.to(tl.int32), 1)
        total += tl.sum(same.to(tl.int32), 1)
    valid = key >= 0
    tl.store(rank_ptr + pid * CHUNK + local, rank, mask=valid)
    tl.debug_barrier()  # the zeroing above lands before the counts
    tl.store(counts_row + key, total, mask=valid & (rank == total - 1))  # on each key's last row


@triton.jit(do_not_specialize=["num_chunks"])  # one compile per CHUNKS_P2, not per token count
def _key_scan_kernel(counts_ptr, key_block_ptr, tile_blocks_ptr, num_chunks, num_keys,
                     BLOCK_SIZE: tl.constexpr, CHUNKS_P2: tl.constexpr, KEY_TILE: tl.constexpr):
    pid = tl.program_id(0)
    keys = pid * KEY_TILE + tl.arange(0, KEY_TILE)
    chunks = tl.arange(0, CHUNKS_P2)
    in_keys = keys < num_keys
    ptrs = counts_ptr + chunks[:, None].to(tl.int64) * num_keys + keys[None, :]
    mask = (chunks[:, None] < num_chunks) & in_keys[None, :]
    counts = tl.load(ptrs, mask=mask, other=0)  # [CHUNKS_P2, KEY_TILE]
    tl.store(ptrs, tl.cumsum(counts, 0) - counts, mask=mask)  # rows of the key in earlier chunks
    blocks = (tl.sum(counts, 0) + BLOCK_SIZE - 1) // BLOCK_SIZE  # [KEY_TILE] padded blocks per key
    tl.store(key_block_ptr + keys, tl.cumsum(blocks, 0) - blocks, mask=in_keys)
    tl.store(tile_blocks_ptr + pid, tl.sum(blocks, 0))


@triton.jit(do_not_specialize=["num_rows", "num_tiles"])  # one compile for every token count
def _scatter_kernel(topk_ids_ptr, slot_ids_ptr, rank_ptr, counts_ptr, key_block_ptr, tile_blocks_ptr,
                    sorted_ids_ptr, block_expert_ptr, block_slot_ptr, num_blocks_ptr, num_rows, top_k,
                    num_experts, num_slots, num_keys, num_tiles,
                    HAS_SLOTS: tl.constexpr, EXPERT_MAJOR: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    CHUNK: tl.constexpr, KEY_TILE: tl.constexpr, TILES_P2: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * CHUNK + tl.arange(0, CHUNK)
    key = _row_keys(topk_ids_ptr, slot_ids_ptr, rows, num_rows, top_k, num_experts, num_slots,
                    HAS_SLOTS, EXPERT_MAJOR)
    valid = key >= 0
    key = tl.where(valid, key, 0)
    tiles = tl.arange(0, TILES_P2)
    tile_blocks = tl.load(tile_blocks_ptr + tiles, mask=tiles < num_tiles, other=0)
    tl.store(num_blocks_ptr, tl.sum(tile_blocks, 0), mask=pid == 0)
    # blocks of the key tiles before the row's own, then of the keys before it in its tile
    before_tile = (tiles[None, :] < (key // KEY_TILE)[:, None]) & (tiles[None, :] < num_tiles)
    first_block = tl.sum(tl.where(before_tile, tile_blocks[None, :], 0), 1)
    first_block += tl.load(key_block_ptr + key, mask=valid, other=0)
    pos = tl.load(counts_ptr + pid.to(tl.int64) * num_keys + key, mask=valid, other=0)
    pos += tl.load(rank_ptr + rows, mask=valid, other=0)  # position inside the key's rows
    block = first_block + pos // BLOCK_SIZE
    tl.store(sorted_ids_ptr + block * BLOCK_SIZE + pos % BLOCK_SIZE, rows, mask=valid)
    first = valid & (pos % BLOCK_SIZE == 0)
    if EXPERT_MAJOR:  # key = expert * (S + 1) + slot + 1
        expert, slot = key // (num_slots + 1), key % (num_slots + 1) - 1
    else:  # key = slot * E + expert
        expert, slot = key % num_experts, key // num_experts
    tl.store(block_expert_ptr + block, expert, mask=first)
    tl.store(block_slot_ptr + block, slot, mask=first)


def align_multi(topk_ids: Tensor, slot_ids: Tensor | None, space: KeySpace, block_size: int,
                max_blocks: int, chunk: int = CHUNK) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sorted_ids, block_expert, block_slot, num_blocks) as moe_align_virtual defines them.

    Needs multi_fits(rows, space, chunk); chunk (a power of two) is exposed for tests.
    """
    num_rows = topk_ids.numel()
    num_keys = space.num_keys
    chunks, key_tile, key_tiles = _tiling(num_rows, num_keys, chunk)
    num_sorted = max_blocks * block_size
    sizes = [num_sorted, max_blocks, max_blocks, 1, chunks * chunk, chunks * num_keys,
             key_tiles * key_tile, key_tiles]
    # each part starts 16-byte aligned: Triton specialises pointers on that, so a part at an odd
    # offset (max_blocks not a multiple of 4) would compile the kernels that read it once more
    padded = [-(-n // 4) * 4 for n in sizes]
    buf = torch.empty(sum(padded), dtype=torch.int32, device=topk_ids.device)
    parts = [part[:n] for part, n in zip(buf.split(padded), sizes)]
    sorted_ids, block_expert, block_slot, num_blocks, rank, counts, key_block, tile_blocks = parts
    ids = topk_ids.reshape(-1)
    slots = slot_ids if slot_ids is not None else ids
    common = dict(HAS_SLOTS=space.has_slots, EXPERT_MAJOR=space.expert_major)
    fill = 1024
    _chunk_count_kernel[(chunks,)](
        ids, slots, rank, counts, sorted_ids, block_expert, block_slot, num_rows, topk_ids.shape[1],
        space.num_experts, space.num_slots, num_keys, num_sorted, max_blocks,
        _share(num_sorted, chunks, fill), _share(max_blocks, chunks, fill),
        CHUNK=chunk, SUB=min(32, chunk), FILL=fill, num_warps=4, **common)
    _key_scan_kernel[(key_tiles,)](
        counts, key_block, tile_blocks, chunks, num_keys, BLOCK_SIZE=block_size,
        CHUNKS_P2=triton.next_power_of_2(chunks), KEY_TILE=key_tile, num_warps=8)
    _scatter_kernel[(chunks,)](
        ids, slots, rank, counts, key_block, tile_blocks, sorted_ids, block_expert, block_slot,
        num_blocks, num_rows, topk_ids.shape[1], space.num_experts, space.num_slots, num_keys,
        key_tiles, BLOCK_SIZE=block_size, CHUNK=chunk, KEY_TILE=key_tile,
        TILES_P2=max(2, triton.next_power_of_2(key_tiles)), num_warps=4, **common)
    return sorted_ids, block_expert, block_slot, num_blocks


def _share(length: int, programs: int, fill: int) -> int:
    """Elements each program fills: length split over programs, rounded up to whole fills."""
    per = -(-length // programs)
    return -(-per // fill) * fill
