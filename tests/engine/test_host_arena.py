"""HostArena: host-tier images page-locked a piece at a time (a recording stand-in for the
driver's cudaHostRegister), kept and reused, within a limit; and the adapter cache's use of it:
images of the tier live there, a dropped one comes back once no slot copy can read it."""
import gc
import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from engine.lora import host_arena
from engine.lora.adapter import LoRAAdapter
from engine.lora.host_arena import HostArena
from engine.lora.manager import LoRAManager
from tests.engine.helpers import make_engine
from tests.engine.test_slots_loading import FakeEvent

PIECE = 64 * 4  # bytes of fp32: 64 elements a piece


class Driver:
    """Records each page-locking call; refuses once `refuse_after` pieces are locked."""

    def __init__(self, refuse_after: int | None = None):
        self.calls: list[tuple[int, int]] = []
        self.refuse_after = refuse_after

    def __call__(self, ptr: int, nbytes: int) -> bool:
        if self.refuse_after is not None and len(self.calls) >= self.refuse_after:
            return False
        self.calls.append((ptr, nbytes))
        return True


def arena(driver: Driver, limit_pieces: int = 16, chunk_pieces: int = 4, **kw) -> HostArena:
    kw.setdefault("unregister", lambda ptr: None)
    return HostArena(torch.float32, limit_pieces * PIECE, chunk_pieces * PIECE, pin=True, piece_bytes=PIECE,
                     pause_s=0.0, register=driver, **kw)


def test_pieces_are_locked_aligned_and_only_as_far_as_images_need():
    driver = Driver()
    a = arena(driver)
    first = a.allocate(100)  # 112 elements (16-aligned): 2 pieces of a 4-piece chunk
    base = first.data_ptr()
    assert first.numel() == 100 and base % PIECE == 0
    assert driver.calls == [(base, PIECE), (base + PIECE, PIECE)]
    second = a.allocate(10)  # fits in the second piece's rest: nothing more locked
    assert len(driver.calls) == 2 and second.data_ptr() == base + 112 * 4
    third = a.allocate(150)  # 160 elements: more than the chunk's 128 unlocked ones, so a second chunk
    assert len(a.chunks) == 2 and len(driver.calls) == 5 and a.pinned_bytes == 5 * PIECE
    assert all(ptr % PIECE == 0 and n == PIECE for ptr, n in driver.calls)
    assert third.numel() == 150 and a.used_bytes == (112 + 16 + 160) * 4


def test_a_released_span_is_reused_without_locking_more():
    driver = Driver()
    a = arena(driver)
    image = a.allocate(200)
    ptr, calls = image.data_ptr(), len(driver.calls)
    assert a.release(image)
    again = a.allocate(190)
    assert again.data_ptr() == ptr and len(driver.calls) == calls and a.used_bytes == 192 * 4


def test_the_limit_bounds_locked_bytes_and_an_image_past_it_gets_none():
    driver = Driver()
    a = arena(driver, limit_pieces=4, chunk_pieces=4)
    kept = a.allocate(3 * 64)
    assert a.allocate(2 * 64) is None  # 3 + 2 pieces > 4
    assert a.unpinned_images == 1 and a.pinned_bytes == 3 * PIECE
    assert a.allocate(64) is not None and a.pinned_bytes == 4 * PIECE  # the last piece
    a.release(kept)
    assert a.allocate(3 * 64) is not None and len(driver.calls) == 4


def test_a_refused_lock_stops_growth_but_keeps_serving_what_is_locked():
    driver = Driver(refuse_after=2)
    a = arena(driver)
    small = a.allocate(64)
    assert a.allocate(3 * 64) is None and a.refused and a.unpinned_images == 1
    a.release(small)
    assert a.allocate(2 * 64) is not None  # the two locked pieces still serve
    assert a.allocate(64) is None and len(driver.calls) == 2


def test_an_image_larger_than_a_chunk_gets_a_chunk_of_its_own():
    driver = Driver()
    a = arena(driver, chunk_pieces=2)
    big = a.allocate(5 * 64)
    assert big.numel() == 5 * 64 and len(a.chunks) == 1 and a.chunks[0].numel == 5 * 64


def test_pieces_are_locked_with_a_pause_of_twice_the_last_hold_between_them(monkeypatch):
    """The step loop's CUDA calls wait for the driver while it locks: between two pieces the
    loader sleeps twice as long as the driver held the last one (at least pause_s), so they get
    it two thirds of the time."""
    sleeps, clock = [], [0.0]
    holds = iter([0.010, 0.001, 0.003, 0.0])

    def slow_driver(ptr, nbytes):
        clock[0] += next(holds)
        return True
    def sleep(seconds):
        sleeps.append(seconds)
        clock[0] += seconds
    monkeypatch.setattr(host_arena, "sleep", sleep)
    monkeypatch.setattr(host_arena, "perf_counter", lambda: clock[0])
    a = HostArena(torch.float32, 16 * PIECE, 4 * PIECE, pin=True, piece_bytes=PIECE, pause_s=0.004,
                  register=slow_driver, unregister=lambda ptr: None)
    a.allocate(4 * 64)
    assert sleeps == pytest.approx([0.020, 0.004, 0.006]) and a.pin_seconds == pytest.approx(0.014)


def test_a_loader_growing_a_chunk_for_a_large_image_keeps_another_off_its_top(monkeypatch):
    """Loader A pins a 35-piece image into a chunk; in a pause after its 20th piece loader B asks
    for 64 elements. B gets a chunk of its own instead of the top A is building, so A's image
    still fits in its chunk: 36 pieces pinned in all, nothing pageable (from that top, A would
    need a new chunk of 35 past the limit of 45)."""
    real_sleep, b_result, pauses = time.sleep, [], []

    def sleep(seconds):
        pauses.append(seconds)
        if len(pauses) == 20:
            b = threading.Thread(target=lambda: b_result.append(a.allocate(64)))
            b.start()
            b.join(timeout=10)
        real_sleep(seconds)
    monkeypatch.setattr(host_arena, "sleep", sleep)
    a = HostArena(torch.float32, 45 * PIECE, 35 * PIECE, pin=True, piece_bytes=PIECE, pause_s=0.0001,
                  register=lambda ptr, n: True, unregister=lambda ptr: None)
    big = a.allocate(35 * 64)
    assert big is not None and b_result and b_result[0] is not None and a.unpinned_images == 0
    lo, hi = big.data_ptr(), big.data_ptr() + big.numel() * 4
    assert not lo <= b_result[0].data_ptr() < hi and a.pinned_bytes == 36 * PIECE


def test_the_pause_after_a_piece_holds_for_every_loader(monkeypatch):
    """Two loaders growing at once: neither pins a piece before the pause after the other's
    last one has passed."""
    clock, starts = [0.0], []

    def register(ptr, nbytes):
        starts.append(clock[0])
        clock[0] += 0.010  # each piece holds the driver 10 ms
        return True

    def sleep(seconds):
        clock[0] += seconds
    monkeypatch.setattr(host_arena, "sleep", sleep)
    monkeypatch.setattr(host_arena, "perf_counter", lambda: clock[0])
    a = HostArena(torch.float32, 64 * PIECE, 8 * PIECE, pin=True, piece_bytes=PIECE, pause_s=0.0,
                  register=register, unregister=lambda ptr: None)
    threads = [threading.Thread(target=a.allocate, args=(3 * 64,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(starts) == 6 and all(b - a_ >= 0.010 + 0.020 - 1e-9 for a_, b in zip(starts, starts[1:]))


def test_a_loader_keeps_growing_its_own_chunk_when_another_loader_frees_one(monkeypatch):
    """Loader B is growing a chunk of its own (A grows the first) when A finishes: B goes on with
    its chunk instead of starting over on A's, so the two images pin 6 pieces, not 7."""
    clock, pinned_by = [0.0], []
    b_pinned, a_done = threading.Event(), threading.Event()

    def register(ptr, nbytes):
        pinned_by.append(threading.current_thread().name)
        if threading.current_thread().name == "b":
            b_pinned.set()
        clock[0] += 0.010
        return True

    def sleep(seconds):
        name = threading.current_thread().name
        if name == "a":
            assert b_pinned.wait(timeout=30)  # A holds its chunk until B has one of its own going
        elif b_pinned.is_set():
            assert a_done.wait(timeout=30)  # B pauses until A is done
        clock[0] += seconds
    monkeypatch.setattr(host_arena, "sleep", sleep)
    monkeypatch.setattr(host_arena, "perf_counter", lambda: clock[0])
    a = HostArena(torch.float32, 64 * PIECE, 8 * PIECE, pin=True, piece_bytes=PIECE, pause_s=0.0,
                  register=register, unregister=lambda ptr: None)

    def load_a():
        a.allocate(3 * 64)
        a_done.set()
    first = threading.Thread(target=load_a, name="a")
    second = threading.Thread(target=a.allocate, args=(3 * 64,), name="b")
    first.start()
    while not pinned_by:
        time.sleep(0.001)
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)
    assert sorted(pinned_by) == ["a"] * 3 + ["b"] * 3 and len(a.chunks) == 2


def test_after_close_an_allocation_gets_pageable_memory():
    driver = Driver()
    a = arena(driver)
    a.allocate(64)
    a.close()
    assert a.allocate(64) is None and len(driver.calls) == 1


def test_a_failing_driver_call_leaves_the_image_pageable_not_the_load_failed():
    def broken(ptr, nbytes):
        raise RuntimeError("CUDA error: out of memory")
    a = HostArena(torch.float32, 16 * PIECE, 4 * PIECE, pin=True, piece_bytes=PIECE, pause_s=0.0,
                  register=broken, unregister=lambda ptr: None)
    assert a.allocate(64) is None and a.unpinned_images == 1 and not a.refused


def test_each_piece_is_faulted_in_before_the_driver_locks_it(monkeypatch):
    """Its pages are written before the call: the driver's lock is held to pin, not to allocate
    pages."""
    events = []
    monkeypatch.setattr(HostArena, "_fault_in", staticmethod(lambda piece: events.append(("fault", piece.data_ptr()))))
    a = HostArena(torch.float32, 16 * PIECE, 4 * PIECE, pin=True, piece_bytes=PIECE, pause_s=0.0,
                  register=lambda ptr, n: events.append(("lock", ptr)) or True, unregister=lambda ptr: None)
    base = a.allocate(2 * 64).data_ptr()
    assert events == [("fault", base), ("lock", base), ("fault", base + PIECE), ("lock", base + PIECE)]


def test_release_never_waits_for_a_loader_that_is_locking():
    a = arena(Driver())
    image = a.allocate(64)
    done = threading.Event()
    with a.lock:  # a loader thread in the middle of locking pieces
        worker = threading.Thread(target=lambda: (a.release(image), done.set()))
        worker.start()
        assert done.wait(timeout=10)
    worker.join()
    assert a.allocate(64).data_ptr() == image.data_ptr()  # the next allocate took it back
    assert a.used_bytes == 64 * 4


def test_release_of_memory_the_arena_did_not_give_is_refused():
    a = arena(Driver())
    a.allocate(64)
    assert not a.release(torch.zeros(64))


def test_piece_bytes_must_hold_whole_units():
    with pytest.raises(ValueError, match="piece_bytes"):
        HostArena(torch.float32, 1 << 20, 1 << 20, pin=False, piece_bytes=100)


def test_close_unregisters_every_piece_and_a_dropped_chunk_unregisters_its_own():
    unregistered = []
    driver = Driver()
    a = arena(driver, unregister=unregistered.append)
    a.allocate(3 * 64)
    a.close()
    assert sorted(unregistered) == sorted(ptr for ptr, _ in driver.calls) and a.chunks == []
    unregistered.clear()
    b = arena(Driver(), unregister=unregistered.append)
    b.allocate(2 * 64)
    pieces = list(b.chunks[0].pieces)
    del b
    gc.collect()
    assert sorted(unregistered) == sorted(pieces) and len(pieces) == 2


def test_loaders_allocating_at_once_get_disjoint_spans_and_all_come_back():
    """Two loader threads allocate and release images of random sizes at once (a third pins
    pieces in between): no two live images overlap, and when all are released the arena holds
    none."""
    a = HostArena(torch.float32, 64 * PIECE, 8 * PIECE, pin=True, piece_bytes=PIECE, pause_s=0.0,
                  register=lambda ptr, n: True, unregister=lambda ptr: None)
    live, lock, errors = {}, threading.Lock(), []

    def loader(seed):
        rng = random.Random(seed)
        mine = []
        for _ in range(300):
            if mine and rng.random() < 0.5:
                view = mine.pop(rng.randrange(len(mine)))
                with lock:
                    del live[view.data_ptr()]
                a.release(view)
                continue
            view = a.allocate(rng.randint(1, 200))
            if view is None:
                continue
            lo, hi = view.data_ptr(), view.data_ptr() + view.numel() * 4
            with lock:
                if any(lo < h and l < hi for l, h in live.values()):
                    errors.append((lo, hi))
                live[lo] = (lo, hi)
            mine.append(view)
        for view in mine:
            with lock:
                del live[view.data_ptr()]
            a.release(view)

    threads = [threading.Thread(target=loader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    a.allocate(1)
    assert a.used_bytes == 16 * 4  # everything else came back


def test_copy_pieces_cover_the_buffer_without_crossing_a_pinned_piece():
    from engine.lora.slots import copy_pieces
    rng = random.Random(0)
    for _ in range(2000):
        itemsize = rng.choice([2, 4])
        align = rng.choice([0, 64, 256]) * itemsize
        step = rng.choice([0, 13, 64, 100]) * itemsize
        ptr = rng.randrange(0, 10_000) * itemsize
        numel = rng.randint(0, 1000)
        pieces = copy_pieces(ptr, numel, itemsize, step, align)
        assert pieces[0][0] == 0 and pieces[-1][1] == numel
        assert all(end == nxt for (_, end), (nxt, _) in zip(pieces, pieces[1:]))
        assert all(at < end for at, end in pieces) or numel == 0
        for at, end in pieces:
            assert step == 0 or (end - at) * itemsize <= step
            if align:  # the first and last byte lie in the same aligned piece
                assert (ptr + at * itemsize) // align == (ptr + end * itemsize - 1) // align
        if not align and (step == 0 or numel * itemsize <= step):
            assert pieces == [(0, numel)]  # a small image stays one copy


def test_without_pinning_nothing_is_locked():
    driver = Driver()
    a = HostArena(torch.float32, 16 * PIECE, 4 * PIECE, pin=False, piece_bytes=PIECE, register=driver)
    assert a.allocate(300) is not None and driver.calls == []


# --- the adapter cache ---

FAMILY = "qwen3_moe"


def _host(manager, name: str, path) -> LoRAAdapter:
    """Load `name` into the host tier (on the loader threads) and wait for it."""
    manager._host_adapter(name, str(path))
    deadline = time.monotonic() + 30
    while name not in manager.host:
        assert time.monotonic() < deadline, f"{name} never loaded"
        time.sleep(0.01)
        manager.collect_loads()
    return manager.host[name]


def test_host_tier_images_live_in_the_arena_and_a_dropped_ones_span_is_reused(checkpoints, adapters):
    """A host tier of one adapter: "a"'s image is a span of the arena; loading "b" drops "a",
    whose span goes back (no slot copy reads it); "a" loaded again under a new version lands in
    that span, byte for byte what a fresh pack gives, and nothing more is reserved."""
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout="bytes", max_cpu_loras=1)
    manager, pools, arena = engine.lora_manager, engine.runner.slot_pools, engine.lora_manager.arena
    first = _host(manager, "t/a@v1", adapters[FAMILY]["a"])
    base = arena.chunks[0].buffer.data_ptr()
    assert first.packed.data_ptr() == base and arena.used_bytes >= first.packed.nbytes
    _host(manager, "t/b@v1", adapters[FAMILY]["b"])
    assert list(manager.host) == ["t/b@v1"] and manager.retired == []
    held = arena.held_bytes
    again = _host(manager, "t/a@v2", adapters[FAMILY]["a"])
    assert again.packed.data_ptr() == base and arena.held_bytes == held
    fresh = pools.pack(_loaded(engine, adapters[FAMILY]["a"]))
    assert torch.equal(again.packed, fresh.packed) and manager.host_bytes_used == again.num_bytes
    assert engine.stats()["lora_host_pinned_bytes"] == 0  # a CPU engine pins nothing


def test_the_start_up_memory_line_names_the_host_tiers_bounds(checkpoints):
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, max_cpu_loras=5,
                         max_cpu_lora_bytes=3 << 30)
    assert engine.memory_summary().endswith("; host tier up to 5 adapters, 3.0 GiB, pageable (CPU)")
    assert engine.memory_summary().startswith(engine.runner.memory_plan.summary())


def _loaded(engine, path) -> LoRAAdapter:
    from engine.lora.adapter import load_adapter
    return load_adapter("fresh", str(path), engine.spec, engine.runner.slot_pools.dtype, 16)


class HeldCopies:
    """Slot pools whose copies wait for `go` (as a copy in flight on the side stream), with a
    pinning arena over a recording driver."""
    num_slots, dtype, device = 2, torch.float32, torch.device("cpu")
    stream = SimpleNamespace(synchronize=lambda: None)  # not None: copies go through the copier thread
    slot_bytes, copy_chunk_bytes, align_bytes, packs_into_arena = host_arena.PIECE_BYTES, PIECE, 0, True

    def __init__(self):
        self.go = threading.Event()
        self.storage = torch.zeros(1024)

    def image_numel(self, adapter):
        return adapter.packed.numel()

    def handed_over(self):
        return None  # no device steps to order after

    def write(self, slot, start, adapter, after=None):
        assert self.go.wait(timeout=30)

    def unsupported_targets(self, adapter):
        return []


def test_a_dropped_image_is_not_reused_while_a_slot_copy_may_read_it(monkeypatch):
    monkeypatch.setattr(host_arena, "cuda_host_register", Driver())
    monkeypatch.setattr(host_arena, "cuda_host_unregister", lambda ptr: None)
    pools = HeldCopies()
    manager = LoRAManager(pools, spec=None, max_rank=4, host_capacity=1)
    try:
        assert pools.align_bytes == manager.arena.piece_bytes  # a pinning arena: copies split at its pieces
        image = manager.arena.allocate(200)
        manager.host["a"] = LoRAAdapter("a", packed=image, packed_ranks=torch.zeros(1, dtype=torch.int32),
                                        packed_offsets=torch.zeros(1, dtype=torch.int64))
        assert manager.reserve("a", "unused") == 0  # its copy now waits
        manager._admit_to_host("b", LoRAAdapter("b", packed=torch.zeros(16), packed_ranks=torch.zeros(1),
                                                packed_offsets=torch.zeros(1)))  # drops "a"
        assert [adapter.name for adapter, _ in manager.retired] == ["a"]
        assert manager.arena.allocate(200).data_ptr() != image.data_ptr()
        pools.go.set()
        manager.slot_events[0].result(timeout=10)
        manager.collect_loads()
        assert manager.retired == []
        assert manager.arena.allocate(200).data_ptr() == image.data_ptr()
    finally:
        pools.go.set()
        manager.shutdown()


class InFlightCopies(HeldCopies):
    """Copies issued at once whose events pass when the test says so (a copy still reading the
    host image on the GPU's copy engine)."""

    def __init__(self):
        super().__init__()
        self.events = []
        self.go.set()

    def write(self, slot, start, adapter, after=None):
        self.events.append(FakeEvent())
        return self.events[-1]

    def order_after(self, event):
        pass


def test_an_image_whose_copy_a_heap_move_waited_for_is_not_reused_until_the_copy_landed(monkeypatch):
    """A heap move orders the compute stream after the copies into the bytes it touches and
    stops tracking them as heap copies; the copy still reads the host image, so dropping the
    adapter from the host tier must not free its span until the copy's event passed."""
    monkeypatch.setattr(host_arena, "cuda_host_register", Driver())
    monkeypatch.setattr(host_arena, "cuda_host_unregister", lambda ptr: None)
    pools = InFlightCopies()
    manager = LoRAManager(pools, spec=None, max_rank=4, host_capacity=1)
    try:
        image = manager.arena.allocate(200)
        manager.host["a"] = LoRAAdapter("a", packed=image, packed_ranks=torch.zeros(1, dtype=torch.int32),
                                        packed_offsets=torch.zeros(1, dtype=torch.int64))
        assert manager.reserve("a", "unused") == 0
        manager.slot_events[0].result(timeout=10)  # issued; its event has not passed
        manager._order_after_copies(0, 1024)  # as a move over its bytes does
        assert manager.copies == []
        manager._admit_to_host("b", LoRAAdapter("b", packed=torch.zeros(16), packed_ranks=torch.zeros(1),
                                                packed_offsets=torch.zeros(1)))  # drops "a"
        manager.collect_loads()
        assert manager.arena.allocate(200).data_ptr() != image.data_ptr()
        pools.events[0].done = True
        manager.collect_loads()
        assert manager.retired == [] and manager.arena.allocate(200).data_ptr() == image.data_ptr()
    finally:
        manager.shutdown()


@pytest.mark.parametrize("layout", ["bytes", "slots"])
def test_pack_into_the_arena_equals_a_pack_without_it_and_falls_back_to_pageable_memory(checkpoints, adapters,
                                                                                       layout):
    """Either layout: an image packed into the arena holds the same bytes as one packed without
    it; an arena with no room gives pageable memory with the same bytes (counted)."""
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout=layout)
    pools = engine.runner.slot_pools
    plain = pools.pack(_loaded(engine, adapters[FAMILY]["b"]))
    roomy = HostArena(pools.dtype, 64 << 20, 1 << 20, pin=False, piece_bytes=1 << 16)
    full = HostArena(pools.dtype, 0, 1 << 20, pin=False, piece_bytes=1 << 16)
    for arena, inside in ((roomy, True), (full, False)):
        packed = pools.pack(_loaded(engine, adapters[FAMILY]["b"]), arena)
        assert torch.equal(packed.packed, plain.packed) and torch.equal(packed.packed_ranks, plain.packed_ranks)
        assert torch.equal(packed.packed_offsets, plain.packed_offsets)
        assert arena.release(packed.packed) == inside and arena.unpinned_images == int(not inside)


def test_a_pack_that_fails_gives_its_image_back(checkpoints, adapters):
    engine = make_engine(checkpoints[FAMILY], max_loras=2, max_lora_rank=16, lora_layout="bytes")
    pools = engine.runner.slot_pools
    arena = HostArena(pools.dtype, 64 << 20, 1 << 20, pin=False, piece_bytes=1 << 16)
    broken = _loaded(engine, adapters[FAMILY]["b"])
    key = next(iter(broken.dense))
    broken.dense[key].a = broken.dense[key].a[:, :-1]  # one column short
    with pytest.raises(RuntimeError):
        pools.pack(broken, arena)
    arena.allocate(16)
    assert arena.used_bytes == 16 * arena.itemsize


@pytest.mark.gpu
def test_arena_images_are_page_locked_by_the_driver_and_copy_to_the_gpu_whole():
    """On CUDA: the driver locks the pieces (each unregisters cleanly), and an image that spans
    several pieces, copied in pieces that end at their boundaries, arrives whole."""
    a = HostArena(torch.bfloat16, 64 << 20, 16 << 20, pin=True, piece_bytes=1 << 20)
    a.allocate(1000)  # the next image starts mid-piece
    image = a.allocate(3 << 20)
    # (torch's is_pinned asks about the allocation's start, which lies before the first piece)
    assert image is not None and a.pinned_bytes == 7 << 20 and a.pin_seconds > 0
    image.copy_(torch.randn(image.numel()).to(torch.bfloat16))
    target = torch.empty(image.numel(), dtype=torch.bfloat16, device="cuda")
    from engine.lora.slots import SlotPools
    pools = SlotPools.__new__(SlotPools)  # _upload only needs its piece settings and stream
    pools.copy_chunk_bytes, pools.align_bytes, pools.stream = 1 << 20, 1 << 20, torch.cuda.Stream()
    with torch.cuda.stream(pools.stream):
        pools._upload(target, image)
    pools.stream.synchronize()
    assert torch.equal(target.cpu(), image)
    pieces = a.chunks[0].pieces
    assert [int(torch.cuda.cudart().cudaHostUnregister(ptr)) for ptr in pieces] == [0] * 7  # each was registered
    pieces.clear()
