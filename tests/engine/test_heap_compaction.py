"""The adapter heap compacted when a new image fits in its free bytes but in no free span: held
images slide down (bytes and offsets), never under a slot copy in flight, and every step reads
the same adapters as before."""
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from engine import LoRARequest
from engine.lora.adapter import load_adapter
from engine.lora.spans import SpanAllocator
from tests.engine.helpers import MIXED_PROMPTS, make_engine, step_logits, wait_for_adapters

FAMILY = "qwen3_moe"


def test_compacted_slides_live_spans_down_in_address_order_and_frees_one_span_above():
    heap = SpanAllocator(100)
    a, b, c = heap.allocate(30), heap.allocate(20), heap.allocate(30)
    heap.release(b, 20)
    assert heap.free == [(30, 20), (80, 20)] and not heap.can_allocate(40)
    assert heap.compacted([(c, 30), (a, 30)], 40) == [30, 0]  # the order given, slid by address
    assert heap.free == [(60, 40)] and heap.allocate(40) == 60
    with pytest.raises(ValueError, match="not the"):
        heap.compacted([(0, 30)], 40)  # a span left out would be overwritten


def test_compacted_for_a_size_slides_the_fewest_elements_that_open_a_span_that_large():
    heap = SpanAllocator(100)
    spans = [(heap.allocate(10), 10) for _ in range(7)]  # 0, 10, ..., 60
    for start, n in spans[1::2]:
        heap.release(start, n)  # free: [10, 20), [30, 40), [50, 60), [70, 100)
    live = spans[0::2]  # at 0, 20, 40, 60
    # 35 elements: sliding the span at 60 down to 50 opens [60, 100); full compaction moves 30
    assert heap.compacted(live, 35) == [0, 20, 40, 50]
    assert heap.free == [(10, 10), (30, 10), (60, 40)] and heap.allocate(35) == 60
    with pytest.raises(ValueError, match="do not fit"):
        heap.compacted(live[:3] + [(50, 10), (60, 35)], 30)  # 25 elements free


def _reserve(manager, request: LoRARequest) -> int:
    """A reference on the adapter's slot, once its host load has landed."""
    slot, deadline = None, time.monotonic() + 30
    while slot is None:
        assert time.monotonic() < deadline, f"{request.lora_name} found no room in the heap"
        slot = manager.reserve(request.lora_name, request.lora_path)
        manager.wait_for_loads(0.01)
        manager.collect_loads()
    return slot


def test_a_held_adapter_between_two_free_spans_moves_down_and_both_serve_as_before(tiny_checkpoint, tiny_adapter):
    """Heap = a + b + c images. b stays held in the middle; a and c are let go. d is larger
    than a or c, smaller than both: it fits only once b slides to the bottom. Then a step of
    b's and d's requests equals the same step on an engine whose heap never moved."""
    ckpt = tiny_checkpoint(FAMILY)
    paths = {"a": tiny_adapter(FAMILY, "per_expert", rank=4, alpha=8, seed=31),
             "b": tiny_adapter(FAMILY, "fused", rank=8, alpha=16, seed=32),
             "c": tiny_adapter(FAMILY, "per_expert", rank=4, alpha=8, seed=33),
             "d": tiny_adapter(FAMILY, "per_expert", rank=8, alpha=16, seed=34)}
    requests = {n: LoRARequest(f"t-{n}/ad@v1", str(p)) for n, p in paths.items()}
    probe = make_engine(ckpt, max_loras=4, max_lora_rank=8)
    pools = probe.runner.slot_pools
    numel = {n: pools.image_numel(load_adapter(n, p, probe.spec, pools.dtype, 8)) for n, p in paths.items()}
    assert max(numel["a"], numel["c"]) < numel["d"] <= numel["a"] + numel["c"]
    itemsize = pools.storage.element_size()
    capacity = numel["a"] + numel["b"] + numel["c"]
    engine = make_engine(ckpt, max_loras=4, max_lora_rank=8, lora_heap_bytes=capacity * itemsize,
                         kv_heap_sharing=False)  # d may not borrow KV blocks instead
    assert numel["b"] > numel["a"]  # b's move overlaps itself: it goes through the bounce buffer,
    engine.runner.slot_pools.MOVE_CHUNK = 48  # in many chunks
    manager = engine.lora_manager
    slots = {n: _reserve(manager, requests[n]) for n in "abc"}
    assert [manager.slot_spans[slots[n]][0] for n in "abc"] == [0, numel["a"], numel["a"] + numel["b"]]
    manager.release(slots["a"])
    manager.release(slots["c"])
    assert manager.spans.placement_after(numel["d"], [manager.slot_spans[slots[n]] for n in "ac"]) is None
    # b's slot copy still queued on the copier: its bytes move only once it has been issued
    copying, issued_before_move = Future(), []
    manager.slot_events[slots["b"]] = copying
    manager.copies.append((numel["a"], numel["a"] + numel["b"], copying))
    threading.Timer(0.2, copying.set_result, [None]).start()
    pools, move = engine.runner.slot_pools, engine.runner.slot_pools.move
    pools.move = lambda *args: (issued_before_move.append(copying.done()), move(*args))
    slots["d"] = _reserve(manager, requests["d"])
    assert issued_before_move == [True]
    assert manager.stats.compactions == 1 and manager.slot_spans[slots["b"]] == (0, numel["b"])
    assert manager.slot_spans[slots["d"]] == (numel["b"], numel["d"])
    assert set(manager.resident()) == {requests["b"].lora_name, requests["d"].lora_name}
    moved = step_logits(engine, MIXED_PROMPTS[:3], [requests["b"], None, requests["d"]])
    fresh = make_engine(ckpt, max_loras=4, max_lora_rank=8)
    wait_for_adapters(fresh, [requests["b"], requests["d"]])
    still = step_logits(fresh, MIXED_PROMPTS[:3], [requests["b"], None, requests["d"]])
    for got, want in zip(moved, still):
        assert torch.equal(got, want)


def test_a_move_by_less_than_its_chunk_goes_through_the_bounce_buffer_intact(tiny_checkpoint):
    """An image slid down by one offset unit (16 elements) in 32-element chunks: every chunk's
    destination covers the source of the one before, so a direct copy would smear it."""
    pools = make_engine(tiny_checkpoint(FAMILY), max_loras=2, max_lora_rank=8).runner.slot_pools
    pools.MOVE_CHUNK = 32
    image = torch.randn(5008, generator=torch.Generator().manual_seed(0))
    pools.storage[64:64 + 5008] = image
    pools.offsets[:, 1] = 4 + torch.arange(pools.offsets.shape[0])  # 64 elements in, and past it
    before = pools.offsets[:, 1].clone()
    pools.move(1, 64, 48, 5008)
    assert torch.equal(pools.storage[48:48 + 5008], image)
    assert torch.equal(pools.offsets[:, 1], before - 1) and not pools.offsets[:, 0].any()


def test_padded_slots_never_move_and_a_heap_moves_only_down_by_whole_units(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint(FAMILY), max_loras=2, max_lora_rank=8, lora_layout="slots")
    pools = engine.runner.slot_pools
    before = pools.storage.clone()
    pools.move(1, 4096, 0, 64)  # a padded slot keeps its row: nothing moves
    assert torch.equal(pools.storage, before)
    heap = make_engine(tiny_checkpoint(FAMILY), max_loras=2, max_lora_rank=8)
    with pytest.raises(ValueError, match="whole offset units"):
        heap.runner.slot_pools.move(0, 40, 30, 16)
    with pytest.raises(ValueError, match="whole offset units"):
        heap.runner.slot_pools.move(0, 16, 32, 16)
