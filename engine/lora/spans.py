"""Free space of the adapter heap: first fit over address-ordered free spans (plain Python).

Why first fit, and not pages: an adapter's image is copied in one transfer and read through one
offset per factor and slot, so it must be contiguous. Adapters are few (tens to hundreds) and
large, so a sorted list of free spans is small, and freeing merges neighbours back at once.
Fragmentation is bounded by the evictions the cache makes anyway: `placement_after` tells how
many least-recently-used adapters must go before an image fits. Where it stops fitting though
the free bytes would hold it (a large image between held small ones), `compacted` slides the
fewest bytes of live spans down that open a free span that large, for the caller to move.
The heap's top moves when it borrows KV blocks or gives them back (engine.block_manager):
`grow` adds free elements above it, `shrink` removes free ones from the top.
"""
import bisect


class SpanAllocator:
    """Spans [start, start + size) of a heap of `capacity` elements."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)] if capacity > 0 else []  # (start, size), by start

    @property
    def free_size(self) -> int:
        return sum(size for _, size in self.free)

    def can_allocate(self, size: int) -> bool:
        return _first_fit(self.free, size) is not None

    def allocate(self, size: int, below: int | None = None) -> int | None:
        """Start of a new span of `size` elements (ending at or under `below`, if given), or None
        when no free span is that large."""
        i = _first_fit(self.free, size, below)
        if i is None:
            return None
        start, span = self.free[i]
        if span == size:
            del self.free[i]
        else:
            self.free[i] = (start + size, span - size)
        return start

    def release(self, start: int, size: int) -> None:
        _insert(self.free, start, size)

    @property
    def free_at_top(self) -> int:
        """Elements of the free span that ends at the top (0 when a span is allocated there)."""
        return self.free[-1][1] if self.free and sum(self.free[-1]) == self.capacity else 0

    def grow(self, size: int) -> None:
        """Add `size` free elements at the top."""
        _insert(self.free, self.capacity, size)
        self.capacity += size

    def shrink(self, size: int) -> None:
        """Remove `size` elements from the top; they must be free."""
        if size > self.free_at_top:
            raise ValueError(f"the top {size} elements are not free ({self.free_at_top} are)")
        start, span = self.free.pop()
        if span > size:
            self.free.append((start, span - size))
        self.capacity -= size

    def compacted(self, spans: list[tuple[int, int]], size: int) -> list[int]:
        """Slide some of `spans` (start, size), which must be every allocated span, down so that a
        free span of `size` elements opens; returns each span's new start, in the order given. Of
        the runs of consecutive spans whose sliding onto the span before them opens one, the run
        of fewest elements moves (at worst all: `size` must fit in the free space). A span never
        moves up, so moving their bytes in address order never overwrites a span not yet moved."""
        self._check_all_allocated(spans)
        if size > self.free_size:
            raise ValueError(f"{size} elements do not fit in {self.free_size} free")
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        below = lambda k: sum(spans[order[k - 1]]) if k else 0  # noqa: E731 - where the k-th span may slide to
        best = None  # (elements moved, first span to slide, spans to slide)
        for first in range(len(order) + 1):
            at, moved = below(first), 0
            for last in range(first, len(order) + 1):
                end = spans[order[last]][0] if last < len(order) else self.capacity
                if end - at >= size:
                    if best is None or moved < best[0]:
                        best = (moved, first, last)
                    break
                if last < len(order):
                    start, n = spans[order[last]]
                    moved, at = moved + (n if start != at else 0), at + n
        _, first, last = best
        starts, at = [start for start, _ in spans], below(first)
        for i in order[first:last]:
            starts[i], at = at, at + spans[i][1]
        self.free, at = [], 0  # the free list again, from where the spans now are
        for start, n in sorted((starts[i], spans[i][1]) for i in order):
            if start > at:
                self.free.append((at, start - at))
            at = start + n
        if at < self.capacity:
            self.free.append((at, self.capacity - at))
        return starts

    def packed(self, spans: list[tuple[int, int]]) -> list[int]:
        """Slide every one of `spans` (all the allocated spans) down onto the one before, from
        the bottom: the free space becomes one span at the top. Returns each span's new start, in
        the order given; moving them in address order never overwrites a span not yet moved."""
        self._check_all_allocated(spans)
        starts, at = [0] * len(spans), 0
        for i in sorted(range(len(spans)), key=lambda i: spans[i][0]):
            starts[i], at = at, at + spans[i][1]
        self.free = [(at, self.capacity - at)] if at < self.capacity else []
        return starts

    def _check_all_allocated(self, spans: list[tuple[int, int]]) -> None:
        """A slide must know every allocated span: one left out would be overwritten."""
        used = sum(n for _, n in spans)
        if used != self.capacity - self.free_size:
            raise ValueError(f"spans of {used} elements are not the {self.capacity - self.free_size} allocated")

    def placement_after(self, size: int, spans: list[tuple[int, int]]) -> int | None:
        """How many of `spans` (in eviction order) must be released before `size` fits: 0 if it
        fits now, None if it does not fit even with all of them released."""
        if self.can_allocate(size):
            return 0
        free = list(self.free)
        for n, (start, span) in enumerate(spans, 1):
            _insert(free, start, span)
            if _first_fit(free, size) is not None:
                return n
        return None


def _first_fit(free: list[tuple[int, int]], size: int, below: int | None = None) -> int | None:
    return next((i for i, (start, span) in enumerate(free)
                 if span >= size and (below is None or start + size <= below)), None)


def _insert(free: list[tuple[int, int]], start: int, size: int) -> None:
    """Adds [start, start + size) to the sorted free list, merged with the spans it touches."""
    if size <= 0:
        return
    i = bisect.bisect_left(free, (start, 0))
    if i > 0 and free[i - 1][0] + free[i - 1][1] == start:  # joins the span before
        i -= 1
        start, size = free[i][0], free[i][1] + size
        del free[i]
    if i < len(free) and start + size == free[i][0]:  # and the one after
        size += free[i][1]
        del free[i]
    free.insert(i, (start, size))
