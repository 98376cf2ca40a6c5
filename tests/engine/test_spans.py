"""SpanAllocator: first fit, neighbours merged on release, and how many evictions make room."""
from engine.lora.spans import SpanAllocator


def test_first_fit_and_release_merges_neighbours():
    heap = SpanAllocator(10)
    assert [heap.allocate(3), heap.allocate(3), heap.allocate(3)] == [0, 3, 6]
    assert heap.allocate(2) is None and heap.free == [(9, 1)]
    heap.release(0, 3)
    heap.release(6, 3)
    assert heap.free == [(0, 3), (6, 4)] and heap.allocate(4) == 6
    heap.release(3, 3)  # joins the span before it
    assert heap.free == [(0, 6)] and heap.free_size == 6
    heap.release(6, 4)  # and the one after
    assert heap.free == [(0, 10)]


def test_placement_counts_the_evictions_in_order_that_make_a_contiguous_fit():
    heap = SpanAllocator(12)
    spans = [(heap.allocate(4), 4) for _ in range(3)]  # [0, 4) [4, 8) [8, 12)
    assert heap.placement_after(1, []) is None
    assert heap.placement_after(4, spans) == 1
    assert heap.placement_after(8, [spans[0], spans[2], spans[1]]) == 3  # 0 and 2 are not adjacent
    assert heap.placement_after(8, [spans[1], spans[2]]) == 2
    assert heap.placement_after(13, spans) is None
    assert heap.free == []  # a simulation: nothing was released
