"""BlockManager: hands out fixed-size KV-cache blocks to sequences (plain Python).

The adapter heap may borrow blocks no sequence uses (engine.lora.manager; EngineConfig
.kv_heap_sharing): the heap and the KV cache are one buffer, the heap at the bottom and block
b at heap floor + b blocks, so the heap grows over blocks 0, 1, ... and gives them back from
the top. To keep those low blocks free for it, sequences get the highest free block first.
The heap borrows only while `reserve_blocks` (what one step's new tokens can need) plus
`growth_blocks` (what the running sequences can still grow into, set by the scheduler) stay
free, and a sequence short of blocks takes them back first (`can_allocate`): adapters nobody
runs are a cache, the KV of running sequences is not. Without the growth term a full batch
lends blocks its own sequences claim back a few steps later, and each claim moves or evicts
adapters (a compaction, at worst a preemption and its recompute).
"""
import heapq

from engine.sequence import Sequence


def step_reserve(max_num_batched_tokens: int, block_size: int, max_num_seqs: int) -> int:
    """Blocks one step's new tokens can need: its token budget, plus a block begun by each
    sequence. The heap borrows only while this many stay free."""
    return -(-max_num_batched_tokens // block_size) + max_num_seqs


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, reserve_blocks: int = 0):
        self.num_blocks, self.block_size, self.reserve_blocks = num_blocks, block_size, reserve_blocks
        self._free = set(range(num_blocks))
        self._order = [-b for b in range(num_blocks)]  # max-heap of free ids; ids no longer free are skipped
        heapq.heapify(self._order)
        self._held: list[int] = []  # min-heap of ids handed to sequences; ids freed since are skipped
        self.lent = 0  # blocks [0, lent) are the adapter heap's
        self.growth_blocks = 0  # blocks the running sequences may still need (Scheduler sets it)
        self.borrower = None  # give_back(k) -> blocks it released from its top (engine.lora.manager)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_block_ids(self) -> list[int]:
        """Free block ids in the order they are handed out."""
        return sorted(self._free, reverse=True)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether seq's next `num_new_tokens` fit, taking back blocks the heap borrowed if
        needed (only when what it borrowed would cover them: no adapter moves for nothing)."""
        short = self.num_blocks_needed(seq, num_new_tokens) - self.num_free_blocks
        if 0 < short <= self.lent:
            self.take_back(short)
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to hold its computed tokens plus `num_new_tokens`."""
        for _ in range(self.num_blocks_needed(seq, num_new_tokens)):
            block = -heapq.heappop(self._order)
            while block not in self._free:
                block = -heapq.heappop(self._order)
            self._free.remove(block)
            heapq.heappush(self._held, block)
            seq.block_table.append(block)
        if len(self._held) > 2 * self.num_blocks:  # stale entries (freed since) past the bound: rebuild
            self._held = [b for b in range(self.lent, self.num_blocks) if b not in self._free]

    def deallocate(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self._release(block)
        seq.block_table.clear()

    def _release(self, block: int) -> None:
        self._free.add(block)
        heapq.heappush(self._order, -block)
        if len(self._order) > 2 * self.num_blocks:  # entries of blocks lent or handed out since: rebuild
            self._order = sorted(-b for b in self._free)

    # ---- the adapter heap's side ----------------------------------------------------
    def lendable(self) -> int:
        """Blocks the heap may borrow now: the free run from `lent` up to the lowest block a
        sequence holds, keeping reserve_blocks + growth_blocks free. Amortised O(log N) (the heap asks often):
        `_held` is a min-heap of handed-out ids, stale ones skipped here and dropped in bulk."""
        held = self._held
        while held and (held[0] in self._free or held[0] < self.lent):  # freed (perhaps lent) since
            heapq.heappop(held)
        run = (held[0] if held else self.num_blocks) - self.lent
        return max(0, min(run, self.num_free_blocks - self.reserve_blocks - self.growth_blocks))

    def lend(self, count: int) -> None:
        """Hand blocks [lent, lent + count) to the heap; they must be lendable."""
        if not 0 <= count <= self.lendable():
            raise ValueError(f"{count} blocks are not lendable ({self.lendable()} are)")
        for block in range(self.lent, self.lent + count):
            self._free.remove(block)  # its entry in _order is skipped when reached
        self.lent += count

    def take_back(self, count: int) -> int:
        """Ask the heap for up to `count` of its borrowed blocks (the highest first); returns how
        many came back free."""
        if self.borrower is None or self.lent == 0:
            return 0
        returned = self.borrower.give_back(min(count, self.lent))
        for block in range(self.lent - returned, self.lent):
            self._release(block)
        self.lent -= returned
        return returned
