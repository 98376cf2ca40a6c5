"""Adapter cache: disk -> pinned host tier (background threads) -> a slot of the device heap.

The scheduler drives it with plain calls: `reserve` (a slot for a waiting request, or None
while the adapter is still loading, or no slot or heap room can be had), `is_ready`, `release`.
An adapter takes its own bytes in the heap (engine.lora.slots); to place one, adapters no
request references are evicted least recently used first until its image fits (or it waits:
a full cache delays work). When the image does not fit in any free span though the free bytes
(after those evictions) would hold it, the heap is compacted first: the run of resident images
that opens a span that large with the fewest bytes moved slides down on the compute stream,
between steps, and their slots' offsets follow (not on a replica over several GPUs, whose ranks
would all have to move alike). A failed load is remembered for
`failure_ttl_s` (requests fail fast with its message), then retried; one whose files could not
be read (AdapterFilesError) only while those files stay as they were: a fetch that replaces
them (the replica fetches again on that error) is loaded at its next request.

Where the heap shares its buffer with the KV cache (`kv`: engine.block_manager), an image that
fits in no free span borrows the free KV blocks above the heap's top before any adapter is
evicted: KV memory no sequence uses holds adapters instead of sitting idle. When a sequence is
short of blocks, the heap gives borrowed blocks back from its top (`give_back`): unreferenced
adapters there are evicted, referenced ones move to free spans lower down.
"""
import logging
import time
from collections.abc import Callable, Collection
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from adapter_store.cache import files_signature
from engine.errors import AdapterFilesError, AdapterLoadError, EngineError
from engine.lora.adapter import LoRAAdapter, load_adapter
from engine.lora.host_arena import HostArena
from engine.lora.slots import SlotPools
from engine.lora.spans import SpanAllocator
from engine.models.spec import ModelSpec


log = logging.getLogger("engine.lora")


@dataclass(slots=True)
class LoRAStats:
    slot_hits: int = 0
    slot_misses: int = 0
    slot_loads: int = 0
    host_loads: int = 0
    host_load_seconds: float = 0.0
    slot_load_seconds: float = 0.0
    failures: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    compactions: int = 0
    bytes_compacted: int = 0
    kv_blocks_borrowed: int = 0  # blocks the heap took from the KV cache (a count of events, not held)
    kv_blocks_returned: int = 0
    recent_errors: list[str] = field(default_factory=list)


class LoRAManager:
    def __init__(self, pools: SlotPools, spec: ModelSpec, max_rank: int, host_capacity: int,
                 load_threads: int = 2, failure_ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, host_bytes: int | None = None,
                 kv=None, block_numel: int = 0):
        """host_capacity: adapters the pinned host tier holds; host_bytes, if given, bounds it
        further by bytes: each adapter there is its own compact image (in the host arena at its
        own bytes; without one, on CUDA, rounded up to a power of two by torch's pinned
        allocator), so small adapters take little of it.
        kv: the BlockManager whose blocks lie above the heap in `pools.storage`, `block_numel`
        elements each, for the heap to borrow (None: the heap keeps its own bytes)."""
        self.pools, self.spec, self.max_rank = pools, spec, max_rank
        self.kv, self.block_numel = (kv, block_numel) if kv is not None and block_numel > 0 else (None, 0)
        if self.kv is not None:
            self.kv.borrower = self
            self.kv.heap_band = -(-pools.max_image_numel // block_numel)
        self._heap_wanted = False  # a placement since the last begin_step found the free spans short
        # adapter -> the step a reservation of it last came back empty (loading, or no room yet):
        # its host image is waited for, not a copy to drop first
        self._asked: dict[str, int] = {}
        self._step = 0
        self._largest_seen = 0  # the largest host image admitted so far
        self.sources: dict[str, str] = {}  # adapter -> the directory its copies here came from
        self.failure_ttl_s, self.clock = failure_ttl_s, clock
        self.host_capacity, self.host_bytes = max(1, host_capacity), host_bytes
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.host_bytes_used = 0
        self.spans = SpanAllocator(getattr(pools, "heap_numel", pools.storage.numel()))
        self._check_largest_fits()
        self.slot_spans: list[tuple[int, int] | None] = [None] * pools.num_slots  # (start, numel) in the heap
        self.loading: dict[str, Future] = {}
        # name -> (message, clock time it expires, for a failure to read the files: what they were)
        self.failed: dict[str, tuple[str, float, tuple | None]] = {}
        self.slot_names: list[str | None] = [None] * pools.num_slots
        self.slot_refs = [0] * pools.num_slots
        self.slot_events: list = [None] * pools.num_slots
        # a failed copy leaves a slot half written: every holder must fail, not only the first
        self.slot_errors: list[str | None] = [None] * pools.num_slots
        self.name_to_slot: dict[str, int] = {}
        self.free_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(pools.num_slots))
        self.arena = self._host_arena(load_threads)
        # slot copies that read an arena image, until they landed: (adapter, its copy's future)
        self.reads: list[tuple[LoRAAdapter, Future]] = []
        # host-tier images dropped while copies that read them were in flight: (adapter, those
        # copies); their arena spans are given back once the copies landed
        self.retired: list[tuple[LoRAAdapter, list[Future]]] = []
        self.executor = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="lora-load")
        # one thread issues every slot copy, in reservation order: a slot re-reserved while an
        # older copy into it is still queued must not have that copy land over the new one
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-copy")
        # (start, end, future) of heap copies on the side stream not yet known to have landed
        self.copies: list[tuple[int, int, Future]] = []
        self.stats = LoRAStats()

    def _check_largest_fits(self) -> None:
        """EngineError where the largest adapter this engine takes (max_lora_rank on every target)
        would fit in no heap, even with every KV block it could borrow: its requests would wait
        for good, and once aged hold back every other tenant's new adapters."""
        largest, heap = getattr(self.pools, "max_image_numel", 0), self.spans.capacity  # 0: pools that do not say
        borrowable = (self.kv.num_blocks - self.kv.reserve_blocks) * self.block_numel if self.kv is not None else 0
        if largest > heap + max(0, borrowable):
            size = self.pools.storage.element_size()
            kv = f", and {borrowable * size} of the KV cache" if borrowable > 0 else ""
            raise EngineError(f"the adapter heap ({heap * size} bytes{kv}) cannot hold an adapter of rank "
                              f"{self.max_rank} on every target ({largest * size} bytes): raise "
                              "lora_heap_bytes or lower max_lora_rank")

    def _host_arena(self, load_threads: int) -> HostArena | None:
        """Where host-tier images live (engine.lora.host_arena): pinned a piece at a time up to the
        tier's byte bound (else its count of largest images), plus a largest image for each loader
        thread's load in flight before the tier drops one. None for pools that pack images of
        their own (a replica over several GPUs: engine.parallel.pools)."""
        if not getattr(self.pools, "packs_into_arena", False):
            return None
        largest = self.pools.slot_bytes
        bound = self.host_bytes if self.host_bytes is not None else self.host_capacity * largest
        cuda = self.pools.stream is not None
        arena = HostArena(self.pools.dtype, bound + load_threads * largest, largest, pin=cuda,
                          device=self.pools.device)
        if cuda:
            self.pools.align_bytes = arena.piece_bytes  # copies never read across two pinned pieces
        return arena

    @property
    def num_slots(self) -> int:
        return self.pools.num_slots

    def reserve(self, name: str, path: str, keep: Collection[str] = ()) -> int | None:
        """A slot holding (or loading) adapter `name` with a reference taken, or None for now.
        Unreferenced adapters named in `keep` are not evicted for it (the slot policy's fair
        share: engine.slot_policy).

        Raises AdapterLoadError when the adapter cannot be loaded (the caller fails its request).
        """
        self._raise_remembered_failure(name, path)
        self._check_source(name, path)
        slot = self.name_to_slot.get(name)
        if slot is not None:
            self.stats.slot_hits += 1
            self._take(slot)
            return slot
        adapter = self._host_adapter(name, path)
        placement = None if adapter is None else self._placement(adapter, keep)
        if placement is None:
            self._asked[name] = self._step
            return None
        self._asked.pop(name, None)
        slot, victims, compact, borrow = placement
        for victim in victims:
            self._evict(victim)
        numel = self.pools.image_numel(adapter)
        if borrow:
            self.kv.lend(borrow)
            self.spans.grow(borrow * self.block_numel)
            self.stats.kv_blocks_borrowed += borrow
        if compact:
            self._compact(numel)
        start = self.spans.allocate(numel)
        self.free_lru.pop(slot)
        self.stats.slot_misses += 1
        self._take(slot)
        self.name_to_slot[name], self.slot_names[slot] = slot, name
        self.slot_spans[slot] = (start, numel)
        self.stats.slot_loads += 1
        self.stats.bytes_loaded += numel * self.pools.storage.element_size()
        if self.pools.stream is None:
            self._write_slot(slot, start, adapter)
        else:  # issue the copies from a loader thread: the step loop's host time is not spent on them
            after = self.pools.handed_over()  # after the steps issued so far, which may read these bytes
            self.slot_events[slot] = self.copier.submit(self._write_slot, slot, start, adapter, after)
            self.copies.append((start, start + numel, self.slot_events[slot]))
            if self.arena is not None:
                self.reads.append((adapter, self.slot_events[slot]))
        return slot

    def _placement(self, adapter: LoRAAdapter, keep: Collection[str] = (),
                   drained: Collection[int] = ()) -> tuple[int, list[int], bool, int] | None:
        """(slot, slots to evict first, compact the heap then, KV blocks to borrow first) for a
        new adapter, or None while none can be had: an empty unreferenced slot, else the least
        recently used one; then the image fits in a free span, or in the top one grown by
        lendable KV blocks, or else, least recently used first, unreferenced adapters go until
        it fits in a free span, or, with compaction, until the free bytes hold it. Adapters in
        `keep` are neither replaced nor evicted. `drained`: referenced slots to count as
        unreferenced, released last (a trial for drain_for). Where neither alone places it, adapters
        go until the blocks left to borrow at the top do, or compaction over the free bytes and
        the lendable blocks does."""
        free = [s for s in (*self.free_lru, *drained) if self.slot_names[s] not in keep]  # an empty slot's name is None
        if not free:
            return None
        slot = next((s for s in free if self.slot_names[s] is None), free[0])
        taken = self.slot_names[slot] is not None  # a slot holding an adapter holds its span
        order = ([slot] if taken else []) + [s for s in free if s != slot and self.slot_spans[s] is not None]
        numel = self.pools.image_numel(adapter)
        n = self.spans.placement_after(numel, [self.slot_spans[s] for s in order])
        if n is not None and n <= int(taken):
            return slot, order[:int(taken)], False, 0
        def blocks_to_borrow(m: int) -> int:  # once order[:m] are evicted
            return -(-(numel - self._free_at_top_after(order[:m])) // self.block_numel)

        lendable = 0
        if self.kv is not None:
            self.kv.heap_wants = self._heap_wanted = True  # the KV cache keeps the heap's run free
            lendable = self.kv.lendable()
            if (blocks := blocks_to_borrow(int(taken))) <= lendable:
                return slot, order[:int(taken)], False, blocks
        if n is not None:
            return slot, order[:max(n, int(taken))], False, 0  # the reused slot's adapter goes in any case
        # neither borrowing alone nor evicting alone places it: evictions that free the heap's top,
        # then the blocks the rest needs (two idle images under a top too small held it for good)
        for m in range(int(taken) + 1, len(order) + 1 if lendable else 0):
            if (blocks := blocks_to_borrow(m)) <= lendable:
                return slot, order[:m], False, max(0, blocks)
        if not getattr(self.pools, "can_move", False):
            return None
        room, borrowable = self.spans.free_size, lendable * self.block_numel
        for m in range(len(order) + 1):
            if m >= int(taken) and room + borrowable >= numel:  # borrowed blocks join the free bytes compacted
                return slot, order[:m], True, max(0, -(-(numel - room) // self.block_numel)) if lendable else 0
            if m < len(order):
                room += self.slot_spans[order[m]][1]
        return None

    def _free_at_top_after(self, victims: list[int]) -> int:
        """Free elements at the heap's top once `victims`' spans are released."""
        top = self.spans.capacity
        spans = [*self.spans.free, *(self.slot_spans[s] for s in victims)]
        for start, size in sorted(spans, key=lambda span: -span[0]):
            if start + size == top:
                top = start
        return self.spans.capacity - top

    def begin_step(self) -> None:
        """The heap wants room this step as far as the placements of the last one found: a
        placement wanting room keeps the KV cache's blocks lendable at once, and a step with
        none lets them go to the prefix cache from the next (engine.block_manager). Adapters
        asked for in the last step and not placed count as waited for (`_waited_for`)."""
        if self.kv is not None:
            self.kv.heap_wants, self._heap_wanted = self._heap_wanted, False
        self._step += 1
        self._asked = {name: step for name, step in self._asked.items() if step >= self._step - 1}

    def give_back(self, count: int) -> int:
        """Release up to `count` borrowed KV blocks from the heap's top (engine.block_manager
        asks, for a sequence short of blocks); returns how many. Unreferenced adapters reaching
        into those blocks are evicted; a referenced one moves to a free span under them where
        one fits; if some still reach in, unreferenced adapters are evicted least recently used
        first until the rest fit under them, and all slide down. What cannot be made to fit
        stays (fewer blocks come back). A move, and the blocks' next use, come after any copy
        still in flight into the bytes they touch, on the compute stream."""
        limit = self.spans.capacity - count * self.block_numel
        for slot in [s for s in self.free_lru if self.slot_spans[s] is not None and sum(self.slot_spans[s]) > limit]:
            self._evict(slot)
        movable = getattr(self.pools, "can_move", False)
        reaching = lambda: [s for s, span in enumerate(self.slot_spans)  # noqa: E731
                            if span is not None and sum(span) > limit]
        if movable and reaching():
            for slot in sorted(reaching(), key=lambda s: -self.slot_spans[s][1]):
                old, size = self.slot_spans[slot]
                # a free span cannot cross the image, and it ends under `limit`: it lies under `old`
                new = self.spans.allocate(size, below=limit)
                if new is not None:
                    self._order_after_copies(new, new + size)
                    self._order_after_copies(old, old + size)  # its own copy lands before it is read
                    self._move(slot, new)
                    self.spans.release(old, size)
        held = sum(span[1] for s, span in enumerate(self.slot_spans) if span is not None and s not in self.free_lru)
        if movable and reaching() and held <= limit:  # else no eviction lets the held images fit under
            victims = [s for s in self.free_lru if self.slot_spans[s] is not None]
            while victims and self.spans.capacity - self.spans.free_size > limit:
                self._evict(victims.pop(0))
            if self.spans.capacity - self.spans.free_size <= limit:
                live = self._live_slots()
                self._slide(live, self.spans.packed([self.slot_spans[s] for s in live]))
        blocks = min(count, self.spans.free_at_top // self.block_numel)
        if blocks:  # an evicted adapter's copy still in flight lands before KV is written there
            self._order_after_copies(self.spans.capacity - blocks * self.block_numel, self.spans.capacity)
            self.spans.shrink(blocks * self.block_numel)
            self.stats.kv_blocks_returned += blocks
        return blocks

    def _move(self, slot: int, start: int) -> None:
        """Move the slot's image (bytes and offsets) down to `start`; the allocator already
        counts it there, and the caller has ordered the copies in flight into either place
        before it (`_order_after_copies`)."""
        old, size = self.slot_spans[slot]
        if start != old:
            self.pools.move(slot, old, start, size)
            self.slot_spans[slot] = (start, size)
            self.stats.bytes_compacted += size * self.pools.storage.element_size()

    def _live_slots(self) -> list[int]:
        """Slots holding an image, in address order."""
        return sorted((s for s, span in enumerate(self.slot_spans) if span is not None),
                      key=lambda s: self.slot_spans[s][0])

    def _slide(self, live: list[int], starts: list[int]) -> None:
        """Move the `live` slots (in address order) to `starts` (none up), after the copies in
        flight into the bytes between the lowest destination and the highest source end."""
        moved = [(slot, start) for slot, start in zip(live, starts) if start != self.slot_spans[slot][0]]
        if moved:
            self._order_after_copies(min(start for _, start in moved), max(sum(self.slot_spans[s]) for s, _ in moved))
        for slot, start in moved:
            self._move(slot, start)
        self.stats.compactions += 1

    def _order_after_copies(self, lo: int, hi: int) -> None:
        """Order the compute stream after every slot copy still in flight into heap elements
        [lo, hi): a move or a KV write there issued before such a copy lands would be
        overwritten by it, or read bytes not there yet. Only those: waiting on the side stream as
        a whole would hold the step for every prefetch in flight (gigabytes at PCIe speed).
        A copy the copier thread has not issued whole yet (it issues an image in pieces, two in
        flight: SlotPools.copy_chunk_bytes) is waited for on the host."""
        kept = []
        for start, end, future in self.copies:
            if self._landed(future):
                continue
            if start < hi and lo < end:
                wait([future])
                if not future.cancelled() and future.exception() is None and future.result() is not None:
                    self.pools.order_after(future.result())
                continue
            kept.append((start, end, future))
        self.copies = kept

    def _compact(self, numel: int) -> None:
        """Slide the resident images that open a free span of `numel` elements with the fewest
        bytes moved (SpanAllocator.compacted) down, their bytes and their slots' offsets
        (SlotPools.move), in address order, after the copies in flight into the bytes they
        touch: no image moves from under its own copy, nor under an evicted one's."""
        live = self._live_slots()
        self._slide(live, self.spans.compacted([self.slot_spans[s] for s in live], numel))

    def _write_slot(self, slot: int, start: int, adapter: LoRAAdapter, after=None):
        began = time.perf_counter()
        event = self.pools.write(slot, start, adapter, after)
        self.stats.slot_load_seconds += time.perf_counter() - began
        return event

    def is_ready(self, slot: int) -> bool:
        """Whether the slot's copies have completed (on CUDA: issued, then its event passed)."""
        if self.slot_errors[slot] is not None:
            raise AdapterLoadError(self.slot_errors[slot])
        pending = self.slot_events[slot]
        if pending is None:
            return True
        if not pending.done():
            return False
        try:
            event = pending.result()
        except Exception as exc:  # a failed copy fails the adapter's requests, not the loop
            name = self.slot_names[slot]
            self.slot_events[slot] = None
            self.slot_errors[slot] = f"copying adapter {name!r} into its slot failed: {exc}"
            self._evict(slot)
            self._fail(name, self.slot_errors[slot])
        if event is None or event.query():
            self.slot_events[slot] = None
            return True
        return False

    def describe(self, name: str, reserved: int | None, running: dict[int, int]) -> str:
        """Where adapter `name` stands (`reserved`: the slot its request holds, if any) and each
        slot's adapter, references and running sequences (`running`, by slot): for the log line of
        a request that waits long for its adapter."""
        if reserved is not None:
            where = f"slot {reserved} reserved, copy {'landed' if self.slot_events[reserved] is None else 'in flight'}"
        elif name in self.name_to_slot:
            where = f"in slot {self.name_to_slot[name]}"
        else:
            where = "in the host tier" if name in self.host else (
                "loading to the host tier" if name in self.loading else "not loaded")
        slots = "; ".join(f"{k}: {self.slot_names[k]} (refs {self.slot_refs[k]}, running {running.get(k, 0)})"
                          for k in range(self.num_slots))
        return (f"{where}; waits for a slot: {self.waits_for_slot(name)}; heap {self.spans.free_size} of "
                f"{self.spans.capacity} elements free; slots: {slots}")

    def in_host_tier(self, name: str) -> bool:
        """Whether adapter `name` is in the host tier, so that only device room can keep it out of
        a slot (not a load from disk still under way, or not begun)."""
        return name in self.host

    def has_free_slot(self) -> bool:
        """Whether some slot is unreferenced (empty, or holding an adapter it may evict)."""
        return bool(self.free_lru)

    def waits_for_slot(self, name: str) -> bool:
        """Whether adapter `name` waits for nothing but device room: in the host tier, in no slot,
        and no slot, or not heap room enough, can be freed for it (the rest is referenced)."""
        if name in self.name_to_slot or name not in self.host:
            return False
        return self._placement(self.host[name]) is None

    def drain_for(self, name: str, rank: dict[int, tuple], keep: Collection[str] = (),
                  draining: Collection[int] = (), held: Collection[int] = ()) -> set[int]:
        """The referenced slots to let drain so that adapter `name` (waiting for device room) can
        be placed as `reserve` would place it, with `keep`'s adapters neither replaced nor evicted.
        Candidates: those of `draining` first (the ones chosen before: a choice that moved with
        the batch would leave every slot half drained), then in the caller's order (`rank`, by
        slot, lowest first: the slot policy's is the cheapest and soonest drained), the larger image
        first among equals; never a slot of `held` (sequences that run next hold it) or one whose
        adapter is in `keep` (drained, it still could not be evicted for `name`). Each candidate
        counts as unreferenced in a trial of the placement once its bytes, the free bytes, the idle
        adapters' and the KV blocks the heap may borrow add up to the image: bytes alone would
        miss what a placement needs (one span where the heap cannot move its images).
        An adapter not yet in the host tier needs a slot only. Every candidate when none of this
        makes room."""
        adapter = self.host.get(name)
        candidates = sorted((s for s in range(self.num_slots) if self.slot_refs[s] > 0 and s not in held
                             and self.slot_names[s] not in keep),
                            key=lambda s: (s not in draining, rank.get(s, ()), -(self.slot_spans[s] or (0, 0))[1]))
        if adapter is None:
            has_slot = any(self.slot_names[s] not in keep for s in self.free_lru)
            return set() if has_slot or not candidates else {candidates[0]}
        if self._placement(adapter, keep) is not None:
            return set()
        need = self.pools.image_numel(adapter)
        room = self.spans.free_size + sum(self.slot_spans[s][1] for s in self.free_lru
                                          if self.slot_spans[s] is not None and self.slot_names[s] not in keep)
        if self.kv is not None:
            room += self.kv.lendable() * self.block_numel
        drain: list[int] = []
        for slot in candidates:
            drain.append(slot)
            room += (self.slot_spans[slot] or (0, 0))[1]
            if room >= need and self._placement(adapter, keep, drained=drain) is not None:
                break
        return set(drain)

    def slot_of(self, name: str) -> int | None:
        """The slot holding adapter `name` (resident or its copy in flight), if any."""
        return self.name_to_slot.get(name)

    def is_referenced(self, slot: int) -> bool:
        return self.slot_refs[slot] > 0

    def release(self, slot: int) -> None:
        self.slot_refs[slot] -= 1
        if self.slot_refs[slot] == 0:
            self.slot_errors[slot] = None  # nobody reads the half-written slot any more
            self.free_lru[slot] = None

    def collect_loads(self) -> None:
        """Move finished host loads into the host tier (or remember their failure) on the step
        thread, whether or not their request still waits: a load whose request was aborted must
        not keep its pinned image outside the tier's bound. Also drops expired failures, and
        the slot copies known to have landed."""
        for name in [n for n, f in self.loading.items() if f.done()]:
            try:
                self._host_adapter(name, "")
            except AdapterLoadError:
                pass  # remembered in self.failed; the next request for it fails fast
        now = self.clock()
        for name in [n for n, (_, expires, _) in self.failed.items() if now >= expires]:
            del self.failed[name]
        landed = _Landed(self._landed)  # each copy's event queried once (copies and reads share them)
        self.copies = [c for c in self.copies if not landed(c[2])]
        self.reads = [(a, f) for a, f in self.reads if not landed(f)]
        self._release_retired(landed)

    def _retire(self, adapter: LoRAAdapter) -> None:
        """An adapter left the host tier: its arena image goes back once the slot copies that
        read it have landed (ordering the compute stream after a copy, as a heap move does,
        leaves the copy reading the host image)."""
        if self.arena is not None:
            self.retired.append((adapter, [f for a, f in self.reads if a is adapter]))
            self._release_retired()

    def _release_retired(self, landed: Callable[[Future], bool] | None = None) -> None:
        landed = landed or _Landed(self._landed)
        kept = []
        for adapter, copies in self.retired:
            if all(landed(future) for future in copies):
                self.arena.release(adapter.packed)  # parts (several GPUs) never come from the arena
            else:
                kept.append((adapter, copies))
        self.retired = kept

    def wait_for_loads(self, timeout: float) -> bool:
        """Block up to `timeout` s (GIL released) until a host load or slot copy in flight
        finishes; False at once when nothing is in flight."""
        futures = [f for f in (*self.loading.values(), *self.slot_events)
                   if isinstance(f, Future) and not f.done()]
        if futures:
            wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
            return True
        if any(self._copy_in_flight(f) for f in self.slot_events):
            time.sleep(timeout)  # copies issued, CUDA events not passed yet: poll again soon
            return True
        return False

    @classmethod
    def _landed(cls, future: Future) -> bool:
        """Whether a slot copy is issued and its event passed (or it failed: is_ready reports it)."""
        return future.done() and not cls._copy_in_flight(future)

    @staticmethod
    def _copy_in_flight(pending) -> bool:
        if not isinstance(pending, Future) or pending.cancelled() or pending.exception() is not None:
            return False
        event = pending.result()
        return event is not None and not event.query()

    def holds(self, name: str) -> bool:
        """Whether adapter `name` has a slot (resident, or its copy in flight)."""
        return name in self.name_to_slot

    def resident(self) -> dict[str, int]:
        return dict(self.name_to_slot)

    @property
    def heap_bytes_used(self) -> int:
        """Device bytes the resident adapters' images take."""
        return (self.spans.capacity - self.spans.free_size) * self.pools.storage.element_size()

    @property
    def heap_bytes(self) -> int:
        """Device bytes the heap spans now: its own plus the KV blocks it borrowed."""
        return self.spans.capacity * self.pools.storage.element_size()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.arena is None:
            self.copier.shutdown(wait=False, cancel_futures=True)
            return
        # the arena's pieces are unregistered once no copy can still read them; after a device
        # error that cannot be known, and they stay pinned until the process ends
        try:
            self.copier.shutdown(wait=True, cancel_futures=True)
            if self.pools.stream is not None:
                self.pools.stream.synchronize()
        except Exception:
            log.exception("adapter copies did not finish at shutdown; the host arena stays pinned")
            return
        self.arena.close()

    def _take(self, slot: int) -> None:
        self.slot_refs[slot] += 1
        self.free_lru.pop(slot, None)

    def _evict(self, slot: int) -> None:
        old = self.slot_names[slot]
        if old is not None:
            del self.name_to_slot[old]
            self.slot_names[slot] = None
            self.stats.evictions += 1
        if self.slot_spans[slot] is not None:
            self.spans.release(*self.slot_spans[slot])
            self.slot_spans[slot] = None

    def _host_adapter(self, name: str, path: str) -> LoRAAdapter | None:
        if name in self.host:
            self.host.move_to_end(name)
            return self.host[name]
        future = self.loading.get(name)
        if future is None:
            if self._loads_fill_host_tier():
                return None  # asked again next step, when a load has landed
            self.loading[name] = self.executor.submit(self._load_to_host, name, path)
            return None
        if not future.done():
            return None
        del self.loading[name]
        try:
            adapter = future.result()
        except AdapterFilesError as exc:
            return self._fail(name, str(exc), exc.files, exc.path)
        except AdapterLoadError as exc:
            return self._fail(name, str(exc))
        except Exception as exc:  # a broken file must fail its request, never the step loop
            return self._fail(name, f"cannot load adapter {name!r}: {type(exc).__name__}: {exc}")
        return self._admit_to_host(name, adapter)

    def _check_source(self, name: str, path: str) -> None:
        """AdapterLoadError where `name` is held here (a slot, the host tier, a load) from other
        files than `path`: a name stands for one adapter version (LoRARequest), and serving the
        copy held would answer with the old weights (and their cached prefixes) unannounced."""
        if not path:  # "the copy held", as tests and the manager's own calls ask
            return
        known = self.sources.get(name)
        if known is not None and known != path and self._has_copy(name):
            raise AdapterLoadError(f"adapter {name!r} is loaded here from {known}; a request names it with "
                                   f"{path}: give each version of an adapter a name of its own")
        self.sources[name] = path
        if len(self.sources) > 2 * (self.num_slots + self.host_capacity) + 64:  # names no longer held
            self.sources = {n: p for n, p in self.sources.items() if n == name or self._has_copy(n)}

    def _has_copy(self, name: str) -> bool:
        """Whether adapter `name` is here: in a slot, in the host tier or loading into it."""
        return name in self.name_to_slot or name in self.host or name in self.loading

    def _waited_for(self, name: str) -> bool:
        """Whether a reservation asked for `name` in this step or the last and found no place yet."""
        return self._asked.get(name, -2) >= self._step - 1 and name not in self.name_to_slot

    def _loads_fill_host_tier(self) -> bool:
        """Whether the loads in flight (each counted at the most an adapter takes) and the host
        images waited for fill the host tier: one more load would drop one of them before its
        request could use it, and it would be loaded again (ten tenants' admissions in one step
        started ten loads into a tier of two large images)."""
        waited = [a for n, a in self.host.items() if self._waited_for(n)]
        if not self.loading and not waited:
            return False
        pending = len(self.loading) + len(waited)
        pending_bytes = len(self.loading) * self._largest_host_cost() + sum(map(self._host_cost, waited))
        return pending >= self.host_capacity or (
            self.host_bytes is not None and pending_bytes + self._largest_host_cost() > self.host_bytes)

    def _admit_to_host(self, name: str, adapter: LoRAAdapter) -> LoRAAdapter:
        """Put a loaded adapter in the host tier, dropping others while it holds more than
        host_capacity adapters or host_bytes bytes (the new one always stays), least recently
        used first: those a slot holds (their copy on the device serves them), then those no
        reservation waits for, then the rest (a request waits for them: loaded again)."""
        self.host[name] = adapter
        self.host_bytes_used += self._host_cost(adapter)
        self._largest_seen = max(self._largest_seen, self._host_cost(adapter))
        while len(self.host) > 1 and (len(self.host) > self.host_capacity or
                                      (self.host_bytes is not None and self.host_bytes_used > self.host_bytes)):
            others = [n for n in self.host if n != name]
            victim = next((n for n in others if n in self.name_to_slot),
                          next((n for n in others if not self._waited_for(n)), others[0]))
            dropped = self.host.pop(victim)
            self.host_bytes_used -= self._host_cost(dropped)
            self._retire(dropped)
        return adapter

    def host_cost_of(self, name: str) -> int:
        """Host-tier bytes adapter `name` takes: its image's where the tier holds it, else the
        most an adapter may take (its size is known once loaded)."""
        adapter = self.host.get(name)
        return self._host_cost(adapter) if adapter is not None else self._largest_host_cost()

    def _largest_host_cost(self) -> int:
        """The most an adapter takes in the host tier: the largest device image, or the largest
        host image seen (the host's pack may carry more than the device image)."""
        largest = getattr(self.pools, "max_image_numel", 0) * self.pools.storage.element_size()
        return max(self._rounded(largest), self._largest_seen)

    def _host_cost(self, adapter: LoRAAdapter) -> int:
        """Bytes the adapter holds in the host tier: its own in the arena; without one, on CUDA,
        what torch's pinned allocator gives it (rounded up to a power of two)."""
        return self._rounded(adapter.num_bytes)

    def _rounded(self, n: int) -> int:
        return 1 << max(0, (n - 1).bit_length()) if self.arena is None and self.pools.stream is not None else n

    def _raise_remembered_failure(self, name: str, path: str) -> None:
        """Raise `name`'s last failure while it is remembered; forget it once expired (a transient
        failure, e.g. pinned memory or a copy, must not block the adapter for good) or, for files
        that could not be read, once the files at `path` are other than those that failed."""
        entry = self.failed.get(name)
        if entry is None:
            return
        message, expires, files = entry
        if self.clock() >= expires or (files is not None and files_signature(path) != files):
            del self.failed[name]
            return
        raise AdapterLoadError(message) if files is None else AdapterFilesError(message, path, files)

    def _fail(self, name: str, message: str, files: tuple | None = None, path: str | None = None) -> None:
        """Remember and raise a failure; `files`: the files_signature of the files in `path` that
        could not be read."""
        self.failed[name] = (message, self.clock() + self.failure_ttl_s, files)
        self.stats.failures += 1
        raise AdapterLoadError(message) if files is None else AdapterFilesError(message, path, files)

    def _load_to_host(self, name: str, path: str) -> LoRAAdapter:
        start = time.perf_counter()
        adapter = load_adapter(name, path, self.spec, self.pools.dtype, self.max_rank)
        # refuses targets no pool holds; one compact image per adapter, in the arena when there is one
        self.pools.pack(adapter) if self.arena is None else self.pools.pack(adapter, self.arena)
        self.stats.host_loads += 1
        self.stats.host_load_seconds += time.perf_counter() - start
        return adapter

    def forget_failure(self, name: str) -> None:
        """Let the next request retry an adapter that failed (e.g. after the file was fixed),
        without waiting for failure_ttl_s."""
        self.failed.pop(name, None)


class _Landed:
    """`landed(future)` remembered per future for one pass (an event query each)."""

    def __init__(self, landed: Callable[[Future], bool]):
        self.landed, self.seen = landed, {}

    def __call__(self, future: Future) -> bool:
        key = id(future)
        if key not in self.seen:
            self.seen[key] = self.landed(future)
        return self.seen[key]
