"""BlockManager: hands out fixed-size KV-cache blocks to sequences (plain Python).

The adapter heap may borrow blocks no sequence uses (engine.lora.manager; EngineConfig
.kv_heap_sharing): the heap and the KV cache are one buffer, the heap at the bottom and block
b at heap floor + b blocks, so the heap grows over blocks 0, 1, ... and gives them back from
the top. To keep those low blocks free for it, sequences get the highest free block first.
The heap borrows only while `reserve_blocks` (what one step's new tokens can need) plus
`growth_blocks` (what the running sequences can still grow into, and the waiting ones holding
an adapter reference will take, as many as seats are free: set by the scheduler) stay
free, and a sequence short of blocks takes them back first (`can_allocate`): adapters nobody
runs are a cache, the KV of running sequences is not. Without the growth term a full batch
lends blocks its own sequences claim back a few steps later, and each claim moves or evicts
adapters (a compaction, at worst a preemption and its recompute).

With prefix caching (`prefix_cache`: engine.prefix_cache) a block may sit in several sequences'
tables (a reference count), and a cached block no sequence holds stays free but keeps its KV
until it is handed out for other tokens or lent. A new block is then, without the heap, the
highest free block that holds no prefix, and only when none is left the cached block let go
longest ago. Where the heap borrows KV blocks, a new block is one that leaves the heap as much
to borrow as any would (`_keeps_lendable`: above the lowest held block, or high enough that the
free count, not the run, bounds what the heap may take): of those, the highest holding no
prefix, else the oldest cached one among the first OLDEST_SCAN let go; failing both, the
highest free block. Handing out the highest free block always, as without a cache, would evict
the newest prefixes first: sequences hold the top blocks, so the blocks a request has just let
go are the highest free ones. What the heap may borrow counts in full only while it wants room
(`heap_wants`: a placement lately found its free spans short); otherwise one largest image's
blocks (`heap_band`) are kept lendable and the prefix cache has the rest: guarding every spare
block left it the few above them (~`reserve_blocks`) however idle the heap.
"""
import heapq

from engine.prefix_cache import PrefixCache
from engine.sequence import Sequence

OLDEST_SCAN = 64  # cached blocks looked at, oldest first, for one the heap's run can spare


def step_reserve(max_num_batched_tokens: int, block_size: int, max_num_seqs: int) -> int:
    """Blocks one step's new tokens can need: its token budget, plus a block begun by each
    sequence. The heap borrows only while this many stay free."""
    return -(-max_num_batched_tokens // block_size) + max_num_seqs


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, reserve_blocks: int = 0,
                 prefix_cache: PrefixCache | None = None):
        self.num_blocks, self.block_size, self.reserve_blocks = num_blocks, block_size, reserve_blocks
        self.cache = prefix_cache
        self._refs: dict[int, int] = {}  # handed-out block -> sequences holding it
        self._free = set(range(num_blocks))
        self._order = [-b for b in range(num_blocks)]  # max-heap of free ids; ids no longer free are skipped
        heapq.heapify(self._order)
        self._plain = list(self._order) if prefix_cache is not None else []  # the same, of blocks holding no prefix
        self._held: list[int] = []  # min-heap of ids handed to sequences; ids freed since are skipped
        self.lent = 0  # blocks [0, lent) are the adapter heap's
        self.growth_blocks = 0  # blocks the running and the reserved sequences may still need (Scheduler sets it)
        self.borrower = None  # give_back(k) -> blocks it released from its top (engine.lora.manager)
        # While the heap wants no more room (no placement lately found its free spans short), the
        # run kept lendable above it is `heap_band` blocks (one largest image, so an adapter that
        # comes can borrow at once), not every spare block: the prefix cache keeps the rest
        # (the borrower sets both)
        self.heap_band = 0
        self.heap_wants = False

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

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding a cached prefix of seq, a sequence with no blocks yet (none without a
        cache); `can_allocate` and `allocate` take them as its first blocks."""
        return self.cache.match(seq) if self.cache is not None and not seq.block_table else []

    def free_needed(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> int:
        """Free blocks seq's next tokens take: new ones, and those of `prefix` no sequence holds."""
        if not prefix:
            return self.num_blocks_needed(seq, num_new_tokens)
        total = len(prefix) * self.block_size + num_new_tokens
        return -(-total // self.block_size) - len(prefix) + sum(block in self._free for block in prefix)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = (), spare: int = 0) -> bool:
        """Whether seq's next `num_new_tokens` fit (after `prefix`, a sequence's cached first
        blocks) with `spare` blocks left free, taking back blocks the heap borrowed if needed
        (only when what it borrowed would cover them: no adapter moves for nothing)."""
        short = self.free_needed(seq, num_new_tokens, prefix) + spare - self.num_free_blocks
        if 0 < short <= self.lent:
            self.take_back(short)
        return self.free_needed(seq, num_new_tokens, prefix) + spare <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> None:
        """Grow seq's block table to hold its computed tokens plus `num_new_tokens`; a sequence
        with no blocks first takes `prefix` (its cached first blocks), whose tokens count as
        computed."""
        if self.cache is not None and not seq.block_table:
            for block in prefix:
                self._hold(block)
            seq.block_table.extend(prefix)
            seq.num_computed_tokens = len(prefix) * self.block_size
            self.cache.attached(seq, prefix)
        for _ in range(self.num_blocks_needed(seq, num_new_tokens)):
            block = self._take_free()
            self._refs[block] = 1
            heapq.heappush(self._held, block)
            seq.block_table.append(block)
        if len(self._held) > 2 * self.num_blocks:  # stale entries (freed since) past the bound: rebuild
            self._held = [b for b in range(self.lent, self.num_blocks) if b not in self._free]

    def _hold(self, block: int) -> None:
        """One more sequence holds this cached block."""
        if block in self._free:
            self._free.remove(block)  # its entry in _order is skipped when reached
            self.cache.unused.pop(block)
            self._refs[block] = 1
            heapq.heappush(self._held, block)
        else:
            self._refs[block] += 1

    def _take_free(self) -> int:
        """A free block for new tokens (the module's docstring says which)."""
        cache = self.cache
        if cache is None:
            return self._taken(self._highest(self._order, lambda b: True))
        plain = self._highest(self._plain, lambda b: b not in cache)  # holds no prefix
        if self.borrower is None:
            return self._taken(plain if plain is not None else cache.oldest_unused())
        keeps = self._keeps_lendable()
        if plain is not None and plain >= keeps:
            return self._taken(plain)
        old = cache.oldest_unused(at_least=keeps, within=OLDEST_SCAN)
        return self._taken(old if old is not None else self._highest(self._order, lambda b: True))

    def _keeps_lendable(self) -> int:
        """The lowest block whose handing out leaves `lendable()` what handing out any free block
        would: one above the lowest held block (the heap's run is unchanged), or one high enough
        that the run up to it still covers every block the free count lets the heap borrow."""
        spare = max(0, self.num_free_blocks - 1 - self.reserve_blocks - self.growth_blocks)
        if not self.heap_wants:
            spare = min(spare, self.heap_band)
        return min(self._lowest_held() + 1, self.lent + spare)

    def _highest(self, order: list[int], valid) -> int | None:
        """The highest free block of a max-heap of ids that `valid` accepts; entries of blocks
        no longer free or no longer accepted are dropped on the way (a block that is free and
        accepted again has been pushed again by then: `_release`)."""
        while order and not (-order[0] in self._free and valid(-order[0])):
            heapq.heappop(order)
        return -order[0] if order else None

    def _taken(self, block: int) -> int:
        self._free.remove(block)  # its entries in the heaps of ids are skipped when reached
        if self.cache is not None and block in self.cache:
            self.cache.forget(block)
        return block

    def _lowest_held(self) -> int:
        """The lowest block a sequence holds (num_blocks if none). Amortised O(log N): `_held`
        is a min-heap of handed-out ids, stale ones (freed or lent since) dropped here."""
        held = self._held
        while held and (held[0] in self._free or held[0] < self.lent):
            heapq.heappop(held)
        return held[0] if held else self.num_blocks

    def cache_computed(self, seq: Sequence) -> None:
        """Cache seq's full blocks that launched steps computed (no-op without a cache)."""
        if self.cache is not None:
            self.cache.register(seq)

    def deallocate(self, seq: Sequence) -> None:
        """Let go of seq's blocks; with a cache, its computed full blocks stay cached, its last
        ones let go first (evicted first: a prefix outlives its continuations)."""
        self.cache_computed(seq)
        for block in reversed(seq.block_table):
            refs = self._refs.pop(block) - 1
            if refs:
                self._refs[block] = refs
                continue
            self._release(block)
            if self.cache is not None and block in self.cache:
                self.cache.unused[block] = None
        seq.block_table.clear()
        seq.num_cached_blocks, seq.prefix_parent = 0, None

    def _release(self, block: int) -> None:
        self._free.add(block)
        heapq.heappush(self._order, -block)
        if len(self._order) > 2 * self.num_blocks:  # entries of blocks lent or handed out since: rebuild
            self._order = sorted(-b for b in self._free)
        if self.cache is not None and block not in self.cache:
            heapq.heappush(self._plain, -block)
            if len(self._plain) > 2 * self.num_blocks:
                self._plain = sorted(-b for b in self._free if b not in self.cache)

    # ---- the adapter heap's side ----------------------------------------------------
    def lendable(self) -> int:
        """Blocks the heap may borrow now: the free run from `lent` up to the lowest block a
        sequence holds, keeping reserve_blocks + growth_blocks free. Amortised O(log N) (the heap asks often):
        `_held` is a min-heap of handed-out ids, stale ones skipped here and dropped in bulk."""
        run = self._lowest_held() - self.lent
        return max(0, min(run, self.num_free_blocks - self.reserve_blocks - self.growth_blocks))

    def lend(self, count: int) -> None:
        """Hand blocks [lent, lent + count) to the heap; they must be lendable."""
        if not 0 <= count <= self.lendable():
            raise ValueError(f"{count} blocks are not lendable ({self.lendable()} are)")
        for block in range(self.lent, self.lent + count):
            self._free.remove(block)  # its entry in _order is skipped when reached
            if self.cache is not None and block in self.cache:
                self.cache.forget(block)
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
