"""The adapter heap and the KV cache in one buffer (EngineConfig.kv_heap_sharing): the heap
borrows KV blocks no sequence uses before it evicts an adapter, keeps the KV reserve free, and
gives blocks back (evicting idle adapters, moving held ones down) when a sequence is short."""
import threading
from concurrent.futures import Future

import pytest
import torch

from engine import LoRARequest, SamplingParams
from engine.block_manager import BlockManager
from engine.lora.adapter import LoRAAdapter, load_adapter
from engine.lora.manager import LoRAManager
from engine.lora.spans import SpanAllocator
from engine.sequence import Sequence, SequenceStatus
from tests.engine.helpers import MIXED_PROMPTS, make_engine, step_logits, wait_for_adapters

FAMILY = "qwen3_moe"
BLOCK = 16  # elements of a KV block in the stand-in pools


def _seq(k: int, tokens: int) -> Sequence:
    return Sequence(k, f"r{k}", [1] * tokens, SamplingParams(max_tokens=1))


def test_sequences_take_the_highest_free_blocks_and_the_heap_borrows_the_free_run_from_the_bottom():
    kv = BlockManager(10, 4, reserve_blocks=2)
    seq = _seq(0, 12)
    kv.allocate(seq, 12)
    assert seq.block_table == [9, 8, 7]
    assert kv.lendable() == 5  # blocks 0..6 are free; 2 stay for the sequences
    kv.lend(3)
    assert kv.lent == 3 and kv.num_free_blocks == 4 and kv.free_block_ids == [6, 5, 4, 3]
    with pytest.raises(ValueError, match="not lendable"):
        kv.lend(3)
    other = _seq(1, 16)
    kv.allocate(other, 16)
    assert other.block_table == [6, 5, 4, 3] and kv.lendable() == 0
    kv.deallocate(seq)
    assert kv.lendable() == 0  # block 3, next above the heap, is a sequence's: the run is empty


def test_the_heap_does_not_borrow_the_blocks_running_sequences_will_grow_into():
    from engine.scheduler import Scheduler
    kv = BlockManager(20, 4)
    sched = Scheduler(4, 64, kv, max_model_len=40)
    long = Sequence(0, "r0", [1] * 8, SamplingParams(max_tokens=100))  # 8 + 100 tokens, cut at 40
    short = Sequence(1, "r1", [1] * 5, SamplingParams(max_tokens=3))  # 8 tokens: 2 blocks
    sched.add(long)
    sched.add(short)
    sched.schedule()  # admits both: 2 blocks each for the prompts
    assert kv.num_free_blocks == 16
    assert kv.growth_blocks == (10 - 2) + (2 - 2)  # the long one grows to 10 blocks, the short one is whole
    assert kv.lendable() == 16 - 8
    sched.finish(long, "length")
    sched.schedule()
    assert kv.growth_blocks == 0 and kv.lendable() == 16  # the free run below the short one's blocks


class Borrower:
    def __init__(self, returns: int):
        self.returns, self.asked = returns, []

    def give_back(self, count: int) -> int:
        self.asked.append(count)
        return min(count, self.returns)


def test_a_sequence_short_of_blocks_takes_back_the_highest_borrowed_blocks_first():
    kv = BlockManager(8, 4)
    kv.lend(6)
    kv.borrower = Borrower(returns=2)
    assert kv.can_allocate(_seq(0, 12), 12)  # 3 blocks: 2 free, 1 taken back
    assert kv.borrower.asked == [1] and kv.lent == 5 and kv.free_block_ids == [7, 6, 5]
    assert not kv.can_allocate(_seq(1, 32), 32)  # 8 blocks: the heap gives 2 of the 5 asked
    assert kv.borrower.asked == [1, 5] and kv.lent == 3 and kv.num_free_blocks == 5


def test_the_heap_grows_by_free_elements_at_its_top_and_shrinks_only_by_free_ones():
    heap = SpanAllocator(32)
    a = heap.allocate(20)
    assert heap.free_at_top == 12
    heap.grow(16)
    assert heap.capacity == 48 and heap.free == [(20, 28)] and heap.allocate(28) == 20
    assert heap.free_at_top == 0
    with pytest.raises(ValueError, match="not free"):
        heap.shrink(16)
    heap.release(20, 28)
    heap.shrink(16)
    assert heap.capacity == 32 and heap.free == [(20, 12)]
    assert heap.packed([(a, 20)]) == [0]


class MarkedPools:
    """SlotPools' interface over a small buffer: an image is its adapter's number repeated, so a
    read shows where each one is; `move` copies the bytes like SlotPools.move."""

    dtype, device, can_move = torch.float32, torch.device("cpu"), True

    def __init__(self, heap_numel: int, num_blocks: int, num_slots: int = 4, stream=None):
        self.num_slots, self.heap_numel, self.stream = num_slots, heap_numel, stream
        self.max_image_numel = heap_numel  # the largest image these tests place
        self.storage = torch.zeros(heap_numel + (num_blocks + 1) * BLOCK)
        self.events: list[str] = []
        self.handovers = 0  # with a stream: each reservation's handed_over, logged in events

    def image_numel(self, adapter: LoRAAdapter) -> int:
        return adapter.packed.numel()

    def handed_over(self):
        self.handovers += 1
        self.events.append(f"handed over {self.handovers}")
        return self.handovers

    def write(self, slot: int, start: int, adapter: LoRAAdapter, after=None):
        if after is not None:
            self.events.append(f"write {adapter.name} after {after}")
        self.storage[start:start + adapter.packed.numel()] = adapter.packed
        return None

    def move(self, slot: int, old: int, new: int, numel: int) -> None:
        self.events.append(f"move {old}->{new}")
        self.storage[new:new + numel] = self.storage[old:old + numel].clone()

    def order_after(self, event) -> None:
        self.events.append(f"order_after {event.name}")

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        return []


def _manager(heap_numel: int, num_blocks: int, reserve: int = 0, sizes: dict | None = None, stream=None):
    pools, kv = MarkedPools(heap_numel, num_blocks, stream=stream), BlockManager(num_blocks, 4, reserve)
    manager = LoRAManager(pools, spec=None, max_rank=8, host_capacity=8, kv=kv, block_numel=BLOCK)
    for k, (name, numel) in enumerate((sizes or {}).items(), 1):
        manager.host[name] = LoRAAdapter(name, packed=torch.full((numel,), float(k)))
    return manager, pools, kv


def _holds(manager: LoRAManager, pools: MarkedPools, name: str) -> bool:
    start, numel = manager.slot_spans[manager.name_to_slot[name]]
    return bool((pools.storage[start:start + numel] == float(manager.host[name].packed[0])).all())


def test_an_image_that_fits_nowhere_borrows_free_kv_blocks_before_evicting_an_idle_adapter():
    manager, pools, kv = _manager(32, 8, sizes={"a": 32, "b": 40})
    try:
        manager.release(manager.reserve("a", ""))  # idle: an eviction would make room
        slot = manager.reserve("b", "")
        assert manager.stats.evictions == 0 and set(manager.resident()) == {"a", "b"}
        assert kv.lent == 3 and manager.stats.kv_blocks_borrowed == 3  # 40 elements: 2.5 blocks
        assert manager.slot_spans[slot] == (32, 40) and manager.heap_bytes == (32 + 3 * BLOCK) * 4
        assert _holds(manager, pools, "a") and _holds(manager, pools, "b")
    finally:
        manager.shutdown()


def test_the_heap_borrows_no_block_of_the_kv_reserve_and_evicts_an_idle_adapter_instead():
    manager, pools, kv = _manager(32, 8, reserve=6, sizes={"a": 32, "b": 32})
    try:
        manager.release(manager.reserve("a", ""))
        assert kv.lendable() == 2  # b needs 2 blocks, but 6 of the 8 stay free
        kv.allocate(_seq(0, 4), 4)  # one block to a sequence: 1 lendable
        manager.reserve("b", "")
        assert kv.lent == 0 and manager.stats.evictions == 1 and set(manager.resident()) == {"b"}
        assert _holds(manager, pools, "b")
    finally:
        manager.shutdown()


def test_an_image_that_neither_borrowing_nor_evicting_places_alone_evicts_the_top_and_borrows_the_rest():
    manager, pools, kv = _manager(32, 8, reserve=6, sizes={"a": 16, "b": 16, "c": 48})
    try:
        a, b = manager.reserve("a", ""), manager.reserve("b", "")  # a at 0, b at 16: the heap is full
        manager.release(b)  # b idle longest: the first to go
        manager.release(a)
        assert kv.lendable() == 2  # c needs 3 blocks borrowed alone, and the heap's 32 is too small
        slot = manager.reserve("c", "")
        assert slot is not None and set(manager.resident()) == {"a", "c"} and manager.stats.evictions == 1
        assert kv.lent == 2 and manager.slot_spans[slot] == (16, 48)
        assert _holds(manager, pools, "a") and _holds(manager, pools, "c")
    finally:
        manager.shutdown()


def test_an_image_placed_by_compacting_a_held_one_down_borrows_what_the_free_bytes_lack():
    manager, pools, kv = _manager(48, 8, reserve=6, sizes={"a": 16, "b": 16, "c": 64})
    try:
        a, b = manager.reserve("a", ""), manager.reserve("b", "")  # a at 0, b at 16 (held), 16 free at the top
        manager.release(a)
        slot = manager.reserve("c", "")
        assert slot is not None and set(manager.resident()) == {"b", "c"}
        assert kv.lent == 2 and manager.stats.compactions == 1
        assert manager.slot_spans[b] == (0, 16) and manager.slot_spans[slot] == (16, 64)
        assert _holds(manager, pools, "b") and _holds(manager, pools, "c")
    finally:
        manager.shutdown()


def test_a_reservation_hands_its_bytes_over_after_its_compaction_moves_and_its_copy_waits_for_that():
    """The copy waits on the device for the work issued before the handover: the moves that read
    the bytes it overwrites come first (taken before them, it could land under a move)."""
    pools = MarkedPools(112, 0, stream=object())  # with a stream: copies go through the copier thread
    manager = LoRAManager(pools, spec=None, max_rank=8, host_capacity=8)
    for k, (name, numel) in enumerate({"a": 32, "b": 32, "c": 32, "d": 48}.items(), 1):
        manager.host[name] = LoRAAdapter(name, packed=torch.full((numel,), float(k)))
    try:
        slots = {n: manager.reserve(n, "") for n in "abc"}
        for slot in slots.values():
            manager.slot_events[slot].result(timeout=10)
        manager.release(slots["b"])  # 32 idle + 16 free: d (48) fits once b goes and c slides down
        slot = manager.reserve("d", "")
        manager.slot_events[slot].result(timeout=10)
        assert pools.events[6:] == ["move 64->32", "handed over 4", "write d after 4"]
        assert manager.slot_spans[slot] == (64, 48) and _holds(manager, pools, "d") and _holds(manager, pools, "c")
    finally:
        manager.shutdown()


def test_blocks_go_back_once_an_idle_adapter_under_them_is_evicted_and_a_held_one_slides_down():
    manager, pools, kv = _manager(64, 8, sizes={"a": 32, "b": 32, "c": 32})
    try:
        slots = {n: manager.reserve(n, "") for n in "abc"}  # c borrows 2 blocks
        assert kv.lent == 2 and manager.slot_spans[slots["c"]] == (64, 32)
        manager.release(slots["b"])  # idle at [32, 64), under the borrowed blocks: c has nowhere to go
        assert kv.take_back(2) == 2
        assert kv.lent == 0 and manager.spans.capacity == 64 and manager.stats.evictions == 1
        assert manager.slot_spans[slots["c"]] == (32, 32) and _holds(manager, pools, "c")
        assert _holds(manager, pools, "a") and set(manager.resident()) == {"a", "c"}
        assert pools.events == ["move 64->32"] and manager.stats.compactions == 1
    finally:
        manager.shutdown()


def test_a_held_image_moves_into_a_free_span_under_the_blocks_and_nobody_is_evicted():
    manager, pools, kv = _manager(64, 8, sizes={"a": 32, "b": 32, "c": 32})
    try:
        slots = {n: manager.reserve(n, "") for n in "abc"}
        manager.release(slots["b"])
        manager._evict(slots["b"])  # as a placement would have: a free span at [32, 64)
        evictions = manager.stats.evictions
        assert kv.take_back(2) == 2
        assert manager.slot_spans[slots["c"]] == (32, 32) and _holds(manager, pools, "c")
        assert kv.lent == 0 and manager.stats.evictions == evictions and manager.stats.compactions == 0
        assert pools.events == ["move 64->32"]
    finally:
        manager.shutdown()


def test_a_held_image_with_nowhere_to_go_keeps_its_borrowed_blocks():
    manager, pools, kv = _manager(32, 8, sizes={"a": 32, "c": 32})
    try:
        slots = {n: manager.reserve(n, "") for n in "ac"}
        assert kv.lent == 2
        assert kv.take_back(2) == 0
        assert kv.lent == 2 and manager.slot_spans[slots["c"]] == (32, 32) and _holds(manager, pools, "c")
        assert manager.stats.evictions == 0 and pools.events == []
    finally:
        manager.shutdown()


class InFlight:
    """A copy's CUDA event that has not passed."""

    def __init__(self, name: str):
        self.name = name

    def query(self) -> bool:
        return False


def test_blocks_go_back_after_the_copies_in_flight_into_them_and_no_other():
    """b, idle on the borrowed blocks, is evicted while its copy is still queued: the compute
    stream is ordered after that copy before a sequence can write KV there. a's copy, in flight
    elsewhere, holds nothing up (waiting on it would stall the step for a whole load)."""
    manager, pools, kv = _manager(32, 8, sizes={"a": 32, "b": 32})
    try:
        slots = {n: manager.reserve(n, "") for n in "ab"}
        manager.release(slots["b"])
        copying, elsewhere = Future(), Future()
        manager.copies += [(0, 32, elsewhere), (32, 64, copying)]
        threading.Timer(0.2, copying.set_result, [InFlight("b")]).start()
        threading.Timer(5.0, elsewhere.set_result, [InFlight("a")]).start()
        assert kv.take_back(2) == 2
        assert pools.events == ["order_after b"] and not elsewhere.done()
        assert kv.lent == 0 and set(manager.resident()) == {"a"} and manager.copies == [(0, 32, elsewhere)]
    finally:
        manager.shutdown()


def _sizes(engine, paths: dict) -> dict:
    pools = engine.runner.slot_pools
    return {n: pools.image_numel(load_adapter(n, p, engine.spec, pools.dtype, 8)) for n, p in paths.items()}


@pytest.fixture
def three(tiny_adapter):
    return {"a": tiny_adapter(FAMILY, "per_expert", rank=4, alpha=8, seed=41),
            "b": tiny_adapter(FAMILY, "fused", rank=8, alpha=16, seed=42),
            "c": tiny_adapter(FAMILY, "per_expert", rank=8, alpha=16, seed=43)}


SHARED = dict(max_loras=4, max_lora_rank=8, block_size=16, num_kv_blocks=128, max_num_batched_tokens=64,
              dtype="float32")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # fp32 both: outputs compared bitwise


@pytest.mark.parametrize("device", DEVICES)
def test_adapters_on_borrowed_kv_blocks_and_moved_back_serve_as_on_a_heap_of_their_own(tiny_checkpoint, three,
                                                                                       device):
    """A heap for b and c: a, then b, take it, and c borrows KV blocks (nobody is evicted); a
    step over a, b, c and the base model equals an engine whose heap is its own. Then every
    borrowed block goes back (a, idle, is evicted; b and c, held, slide down) and the step is
    still equal, with a back in on borrowed blocks."""
    ckpt = tiny_checkpoint(FAMILY)
    fresh = make_engine(ckpt, **SHARED, device=device, kv_heap_sharing=False)
    numel = _sizes(fresh, three)
    assert numel["a"] < numel["b"] == numel["c"]
    requests = {n: LoRARequest(f"t-{n}/ad@v1", str(p)) for n, p in three.items()}
    loras = [requests["a"], None, requests["b"], requests["c"], None]
    wait_for_adapters(fresh, list(requests.values()))
    want = step_logits(fresh, MIXED_PROMPTS, loras)

    itemsize = fresh.runner.slot_pools.storage.element_size()
    engine = make_engine(ckpt, **SHARED, device=device, lora_heap_bytes=(numel["b"] + numel["c"]) * itemsize)
    assert engine.runner.arena is not None and engine.lora_manager.kv is engine.block_manager
    wait_for_adapters(engine, list(requests.values()))
    manager, kv = engine.lora_manager, engine.block_manager
    assert manager.stats.evictions == 0 and kv.lent == -(-numel["a"] // engine.runner.kv_block_numel)
    assert engine.stats()["kv_blocks_lent"] == kv.lent
    assert engine.stats()["lora_heap_bytes"] == (numel["b"] + numel["c"] + kv.lent * engine.runner.kv_block_numel) * 4
    for got, expected in zip(step_logits(engine, MIXED_PROMPTS, loras), want):
        assert torch.equal(got, expected)
    for k in range(len(MIXED_PROMPTS)):
        engine.abort(f"s{k}")
    held = [manager.reserve(requests[n].lora_name, "") for n in "bc"]
    assert kv.take_back(kv.lent) > 0 and kv.lent == 0
    assert set(manager.resident()) == {requests["b"].lora_name, requests["c"].lora_name}
    assert manager.stats.bytes_compacted == (numel["b"] + numel["c"]) * 4  # b through the bounce buffer
    for slot in held:
        manager.release(slot)
    wait_for_adapters(engine, [requests["a"]])  # back in, on borrowed blocks again
    assert kv.lent > 0 and manager.stats.evictions == 1
    for got, expected in zip(step_logits(engine, MIXED_PROMPTS, loras), want):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_sequences_that_need_the_borrowed_blocks_get_them_back_and_generate_as_without_sharing(
        tiny_checkpoint, three, device):
    """a, b and c borrow most of a small KV cache; then eight requests over a, b and the base
    model need more blocks than are free: the scheduler takes blocks back (c, idle, is evicted)
    and every greedy output equals an engine whose heap keeps its own bytes."""
    ckpt = tiny_checkpoint(FAMILY)
    kw = {**SHARED, "num_kv_blocks": 96, "max_model_len": 256, "device": device}
    requests = {n: LoRARequest(f"t-{n}/ad@v1", str(p)) for n, p in three.items()}
    prompts = [list(range(10 + k, 110 + k)) for k in range(8)]
    loras = [[requests["a"], requests["b"], None][k % 3] for k in range(8)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    own = make_engine(ckpt, kv_heap_sharing=False, **kw)
    numel = _sizes(own, three)
    want = [o["token_ids"] for o in own.generate(prompts, params, loras)]
    engine = make_engine(ckpt, lora_heap_bytes=numel["a"] * own.runner.slot_pools.storage.element_size(), **kw)
    wait_for_adapters(engine, list(requests.values()))
    kv = engine.block_manager
    assert kv.lent > 0 and kv.num_free_blocks < 8 * 8  # 124 tokens each: 8 blocks
    got = [o["token_ids"] for o in engine.generate(prompts, params, loras)]
    assert got == want
    stats = engine.stats()
    assert stats["lora_kv_blocks_returned"] > 0 and requests["c"].lora_name not in engine.lora_manager.resident()
    assert stats["free_kv_blocks"] + stats["kv_blocks_lent"] == 96


class Landed(InFlight):
    def query(self) -> bool:
        return True


def test_a_held_image_moves_only_after_its_own_copy_has_landed():
    """c's copy is still queued on the copier when a sequence needs the blocks c sits on: the
    move must read c's bytes, so it waits for that copy (a move first would leave KV bytes in
    c's new span, and c's copy landing later in a block handed to a sequence)."""
    manager, pools, kv = _manager(64, 8, sizes={"a": 32, "b": 32, "c": 32}, stream=object())
    gate, write = threading.Event(), pools.write

    def queued_write(slot, start, adapter, after=None):
        if adapter.name == "c":
            gate.wait(timeout=30)
        pools.events.append(f"write {adapter.name}")
        write(slot, start, adapter)
        return Landed(adapter.name)
    pools.write = queued_write
    try:
        slots = {n: manager.reserve(n, "") for n in "abc"}  # c on borrowed blocks, at 64
        manager.slot_events[slots["b"]].result(timeout=30)
        manager.release(slots["b"])
        manager._evict(slots["b"])  # a free span at [32, 64) for c
        threading.Timer(0.2, gate.set).start()
        assert kv.take_back(2) == 2
        assert pools.events[-3:] == ["write c", "order_after c", "move 64->32"]
        assert manager.slot_spans[slots["c"]] == (32, 32) and _holds(manager, pools, "c")
    finally:
        gate.set()
        manager.shutdown()


def test_idle_adapters_stay_when_the_held_ones_could_not_fit_under_the_blocks_anyway():
    manager, pools, kv = _manager(64, 8, sizes={"a": 32, "b": 16, "c": 32, "d": 16})
    try:
        slots = {n: manager.reserve(n, "") for n in "abcd"}  # a, b in the heap's own bytes; c, d borrow
        manager.release(slots["b"])
        assert kv.lent == 2 and kv.take_back(2) == 0  # held a, c, d: 80 elements, 64 under the blocks
        assert manager.stats.evictions == 0 and set(manager.resident()) == {"a", "b", "c", "d"}
    finally:
        manager.shutdown()


def test_a_sequence_short_by_more_than_the_heap_borrowed_moves_no_adapter():
    kv = BlockManager(8, 4)
    kv.lend(2)
    kv.borrower = Borrower(returns=2)
    assert not kv.can_allocate(_seq(0, 36), 36)  # 9 blocks of 8: no give-back can make them fit
    assert kv.borrower.asked == [] and kv.lent == 2


def test_the_block_heaps_stay_bounded_over_many_requests():
    kv = BlockManager(100, 4)
    kv.borrower = Borrower(returns=1)
    for k in range(20000):
        seq = _seq(k, 8)
        kv.allocate(seq, 8)
        if k % 7 == 0:  # the heap borrows a block and gives it back
            kv.lend(1)
            assert kv.take_back(1) == 1
        kv.deallocate(seq)
    assert len(kv._held) <= 2 * 100 + 2 and len(kv._order) <= 2 * 100 + 1
    assert kv.num_free_blocks == 100 and kv.lent == 0 and kv.lendable() == 100


def test_landed_copies_are_forgotten_each_step():
    manager, pools, kv = _manager(64, 8, sizes={"a": 32}, stream=object())
    pools.write = lambda slot, start, adapter, after=None: Landed(adapter.name)
    try:
        manager.slot_events[manager.reserve("a", "")].result(timeout=30)
        assert len(manager.copies) == 1
        manager.collect_loads()
        assert manager.copies == []
    finally:
        manager.shutdown()


def _run(sched, steps: int) -> int:
    """`steps` steps of a scheduler whose sequences sample token 7; returns the preemptions."""
    preempted = 0
    for _ in range(steps):
        out = sched.schedule()
        sched.launched(out, [True] * len(out.scheduled))
        for seq, _token in sched.update_from_output(out, [7] * len(out.scheduled), 0.0):
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.finish(seq, "length")
        preempted += out.num_preempted
    return preempted


def test_a_running_sequence_short_of_blocks_drops_waiting_prefetches_before_anyone_is_preempted():
    """c (64 elements on a 32-element heap) borrows 2 of the 8 blocks for a waiting request that
    keeps only its own 2 from the heap; two base requests then take both seats and grow to 4
    blocks each. Nothing under c can move, so the prefetch is dropped and c evicted, and nobody
    is preempted (with the reference kept, one of them was)."""
    from engine.scheduler import Scheduler

    manager, pools, kv = _manager(32, 8, reserve=1, sizes={"c": 64})
    try:
        sched = Scheduler(2, 64, kv, manager, max_model_len=64)
        grow = SamplingParams(max_tokens=12, ignore_eos=True)  # 4 prompt tokens + 12: 4 blocks
        running = [Sequence(k, f"r{k}", [1] * 4, grow, None, f"t{k}") for k in range(2)]
        waiting = Sequence(2, "w", [1] * 4, SamplingParams(max_tokens=4, ignore_eos=True), LoRARequest("c", "x"), "t2")
        for seq in (*running, waiting):
            sched.add(seq)
        preempted = _run(sched, 1)
        assert kv.lent == 2 and waiting.lora_slot is not None and waiting.status is SequenceStatus.WAITING
        preempted += _run(sched, 11)
        assert preempted == 0 and all(len(seq.output_token_ids) == 12 for seq in running)
        assert manager.stats.kv_blocks_returned == 2 and manager.stats.evictions == 1
    finally:
        manager.shutdown()


def test_a_reservation_borrows_none_of_the_blocks_a_reserved_sequence_with_a_free_seat_will_take():
    """r runs on a (the whole 64-element heap) and w reserves c (32 elements: 2 blocks to borrow),
    each to grow to 4 of the 8 blocks. With 2 seats the free blocks are theirs: c waits for a's
    room rather than borrowing, and nobody is preempted (when c borrowed them, w ran beside r on
    them and one of the two was preempted). With one seat w cannot run next, and c borrows."""
    from engine.scheduler import Scheduler

    for seats, lent in ((2, 0), (1, 2)):
        manager, pools, kv = _manager(64, 8, reserve=1, sizes={"a": 64, "c": 32})
        try:
            sched = Scheduler(seats, 64, kv, manager, max_model_len=64)
            params = SamplingParams(max_tokens=12, ignore_eos=True)
            first = Sequence(0, "r", [1] * 4, params, LoRARequest("a", "x"), "t0")
            second = Sequence(1, "w", [1] * 4, params, LoRARequest("c", "x"), "t1")
            sched.add(first)
            sched.add(second)
            preempted = _run(sched, 1)
            assert first.status is SequenceStatus.RUNNING and kv.lent == lent, seats
            preempted += _run(sched, 40)
            assert preempted == 0 and [len(s.output_token_ids) for s in (first, second)] == [12, 12], seats
        finally:
            manager.shutdown()


def test_a_holder_that_leaves_the_queue_unreserved_gives_its_kept_blocks_back_to_the_heap():
    """Two waiting requests reserve adapters and keep their 4 blocks each from the heap; one is
    aborted, the other's reference dropped (release_waiting): each time the heap may borrow
    again what it kept, and the holders stay the waiting sequences with a slot."""
    from engine.scheduler import Scheduler, SchedulerOutput

    manager, pools, kv = _manager(64, 16, reserve=1, sizes={"a": 32, "c": 32})
    try:
        sched = Scheduler(4, 64, kv, manager, max_model_len=64)
        params = SamplingParams(max_tokens=12, ignore_eos=True)  # 4 prompt tokens + 12: 4 blocks
        seqs = [Sequence(k, f"w{k}", [1] * 4, params, LoRARequest(n, "x"), f"t{k}") for k, n in enumerate("ac")]
        for seq in seqs:
            sched.add(seq)
            assert sched.slots.adapter_state(seq, SchedulerOutput()) == "ok"  # reserved, not admitted
        assert list(sched.holders) == [0, 1] and kv.growth_blocks == 8 and kv.lendable() == 16 - 1 - 8
        sched.finish(seqs[0], "abort")
        assert list(sched.holders) == [1] and kv.growth_blocks == 4 and kv.lendable() == 16 - 1 - 4
        kv.lend(2)  # release_waiting drops references only while the heap holds borrowed blocks
        assert sched.slots.release_waiting()
        assert not sched.holders and kv.growth_blocks == 0 and seqs[1].lora_slot is None
        assert seqs[1].status is SequenceStatus.WAITING and set(manager.resident()) == {"a", "c"}  # idle, cached
    finally:
        manager.shutdown()


def test_the_slots_drained_for_a_waiting_adapter_are_the_soonest_done_until_it_can_be_placed():
    """drain_for: referenced slots in the caller's order (the lowest rank first, the larger image
    first among equals) until a trial placement, with them counted as idle, finds room for the
    waiting image; slots chosen before come first whatever their rank, and a slot that sequences
    running next hold is never drained."""
    manager, pools, kv = _manager(64, 4, reserve=4, sizes={"a": 16, "b": 16, "c": 32, "d": 32, "e": 48})
    try:
        a, b, c = (manager.reserve(name, "") for name in "abc")
        left = {a: (0, 30), b: (0, 5), c: (0, 5)}
        assert kv.lendable() == 0 and manager.spans.free_size == 0 and manager.waits_for_slot("d")
        assert manager.drain_for("d", left) == {c}  # b and c end soonest: c's 32 elements hold d
        assert manager.drain_for("e", left) == {c, b}  # 48: both
        assert manager.drain_for("d", left, draining={a}) == {a, c}  # a first, then the room it lacks
        assert manager.drain_for("d", left, held={c}) == {b, a}  # c runs next: the others make the room
        manager.release(b)  # b idle: its 16 elements count without draining anything for them
        assert manager.drain_for("d", left) == {c} and manager.drain_for("e", left) == {c}
        assert manager.drain_for("not-in-the-host-tier", left) == set()  # b's slot is free: all it needs
    finally:
        manager.shutdown()


def test_no_slot_is_drained_for_an_adapter_that_evicting_compacting_and_borrowing_together_place():
    """Free bytes, an idle adapter's and the lendable blocks add up to the image, which fits in
    no span and cannot borrow enough alone: the idle one goes, the held one above it slides
    down, the top borrows the rest. Before, no placement borrowed while compacting, so a
    referenced slot had to drain for it."""
    manager, pools, kv = _manager(64, 8, reserve=6, sizes={"a": 16, "x": 16, "c": 32, "d": 48})
    try:
        a, x, c = (manager.reserve(name, "") for name in ("a", "x", "c"))
        manager.release(x)
        assert not manager.waits_for_slot("d") and manager.drain_for("d", {a: (0, 3), c: (0, 3)}) == set()
        slot = manager.reserve("d", "")
        assert slot is not None and set(manager.resident()) == {"a", "c", "d"} and kv.lent == 2
        assert all(_holds(manager, pools, name) for name in ("a", "c", "d"))
    finally:
        manager.shutdown()


def test_a_slot_whose_adapter_is_kept_from_the_waiting_tenant_is_not_drained_for_it():
    """Drained, a kept adapter still could not be evicted for that tenant: the slots chosen are
    others, and once they drain the waiting adapter is placed."""
    manager, pools, kv = _manager(64, 4, reserve=4, sizes={"a": 16, "b": 16, "c": 32, "d": 32})
    try:
        a, b, c = (manager.reserve(name, "") for name in "abc")
        drain = manager.drain_for("d", {a: (0, 3), b: (0, 2), c: (0, 1)}, keep={"c"})
        assert c not in drain and drain == {b, a}
        for slot in drain:
            manager.release(slot)
        assert manager.reserve("d", "", keep={"c"}) is not None
    finally:
        manager.shutdown()


def test_an_idle_heap_leaves_the_prefix_cache_the_kv_blocks_past_one_image(tiny_checkpoint):
    """Twelve prompts of 8 full blocks, one at a time, into 400 blocks with no adapter in sight:
    every prefix is still cached for the second pass, as without sharing (the heap kept every
    spare block lendable and the cache had ~reserve_blocks)."""
    engine = make_engine(tiny_checkpoint(FAMILY), max_loras=2, block_size=4, max_model_len=128, max_num_seqs=4,
                         num_kv_blocks=400, max_num_batched_tokens=64)
    assert engine.lora_manager.kv is engine.block_manager and engine.block_manager.heap_band < 400 - 96
    prompts = [[3 + (7 * k + 5 * i) % 370 for i in range(33)] for k in range(12)]
    params = SamplingParams(max_tokens=1, temperature=0)
    for prompt in prompts:
        engine.generate([prompt], params)
    again = []
    for prompt in prompts:
        hits = engine.stats()["prefix_cache_hits"]
        engine.generate([prompt], params)
        again.append(engine.stats()["prefix_cache_hits"] - hits)
    assert again == [32] * 12
