"""Adapter prefetch: the adapters of requests queued behind a full batch load (disk -> host tier
-> a free slot) before the requests are admitted, in admission order, within the window, the
host tier's count and the free slots, and never over an adapter a running request uses.

The real LoRAManager over stand-in pools (copies done at once, no stream); host loads run on
its loader threads, and each round waits for them, so the rounds are deterministic."""
from concurrent.futures import wait

import torch

from engine.block_manager import BlockManager
from engine.lora.adapter import LoRAAdapter
from engine.lora.manager import LoRAManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import LoRARequest, Sequence, SequenceStatus


class InstantPools:
    """`num_slots` slots whose copies complete inside `write` (as on CPU)."""

    stream, dtype, device = None, torch.float32, torch.device("cpu")

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.storage = torch.zeros(num_slots)  # a heap of one element per adapter

    def image_numel(self, adapter: LoRAAdapter) -> int:
        return 1

    def write(self, slot: int, start: int, adapter: LoRAAdapter, after=None) -> None:
        return None

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        return []


def make_manager(num_slots: int, host_capacity: int = 8) -> LoRAManager:
    """A manager whose host loads read no files; `manager.host_loaded` lists the adapters loaded."""
    manager = LoRAManager(InstantPools(num_slots), spec=None, max_rank=4, host_capacity=host_capacity)
    manager.host_loaded = []

    def load(name: str, path: str) -> LoRAAdapter:
        manager.host_loaded.append(name)
        return LoRAAdapter(name)
    manager._load_to_host = load
    return manager


def make_seq(k: int, adapter: str, max_tokens: int = 50) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Sequence(k, f"r{k}", [1, 2, 3], params, LoRARequest(adapter, "/x"), adapter.split("/")[0])


def run_round(sched: Scheduler) -> list[Sequence]:
    """One step: schedule, run it (a prefill's last chunk and each decode sample a token), then
    let the loader threads finish what the step started. Returns the sequences it admitted."""
    before = set(map(id, sched.running))
    for seq, n in sched.schedule().scheduled:
        seq.num_computed_tokens += n
        if seq.num_uncomputed_tokens == 0:
            seq.output_token_ids.append(7)
    wait(list(sched.lora_manager.loading.values()), timeout=10)
    return [seq for seq in sched.running if id(seq) not in before]


def full_batch(manager: LoRAManager, names: list[str], **kw) -> tuple[Scheduler, list[Sequence]]:
    """A scheduler of max_num_seqs = len(names), running one request per adapter in `names`."""
    sched = Scheduler(len(names), 256, BlockManager(256, 4), manager, **kw)
    running = [make_seq(k, name) for k, name in enumerate(names)]
    for seq in running:
        sched.add(seq)
    for _ in range(3):
        run_round(sched)
    assert sched.running == running
    return sched, running


def test_queued_requests_load_their_adapters_before_admission_in_queue_order():
    manager = make_manager(num_slots=3)
    try:
        sched, _ = full_batch(manager, ["t1/a", "t2/b"])
        queued = [make_seq(10 + k, name) for k, name in enumerate(["t9/z", "t3/c", "t5/e"])]
        for seq in queued:
            sched.add(seq)
        for _ in range(2):
            assert run_round(sched) == []  # the batch is full: nobody is admitted
        z, c, e = queued
        assert all(seq.status is SequenceStatus.WAITING for seq in queued)
        # the one free slot went to the first in the queue, and it is ready to run
        assert manager.resident() == {"t1/a": 0, "t2/b": 1, "t9/z": 2} and z.lora_slot == 2
        assert manager.is_ready(2) and c.lora_slot is None and e.lora_slot is None
        assert {"t3/c", "t5/e"} <= set(manager.host)  # the others wait in the host tier
        assert sched.slots.num_prefetched == 1 and len(manager.host_loaded) == 5
    finally:
        manager.shutdown()


def test_a_prefetched_request_runs_in_the_step_a_seat_frees():
    manager = make_manager(num_slots=3)
    try:
        sched, running = full_batch(manager, ["t1/a", "t2/b"])
        queued = make_seq(10, "t3/c")
        sched.add(queued)
        run_round(sched)
        run_round(sched)
        sched.finish(running[0], "stop")
        assert run_round(sched) == [queued]
    finally:
        manager.shutdown()


def test_prefetch_never_evicts_an_adapter_a_running_request_uses():
    manager = make_manager(num_slots=2)
    try:
        sched, running = full_batch(manager, ["t1/a", "t2/b"])
        queued = [make_seq(10, "t3/c"), make_seq(11, "t1/a")]  # the second shares a's slot
        for seq in queued:
            sched.add(seq)
        for _ in range(4):
            assert run_round(sched) == []
        assert manager.resident() == {"t1/a": 0, "t2/b": 1} and manager.stats.evictions == 0
        assert "t3/c" in manager.host and queued[0].lora_slot is None  # staged in the host tier only
        assert queued[1].lora_slot == 0  # a hit on the running adapter's slot: nothing evicted
        sched.finish(running[1], "stop")  # b's slot is free now: c's copy may replace b
        assert run_round(sched) == [queued[0]]
        assert manager.resident() == {"t1/a": 0, "t3/c": 1} and manager.stats.evictions == 1
    finally:
        manager.shutdown()


def test_prefetch_stays_within_the_window_and_the_host_tier():
    """Seven tenants queue behind a full batch with no slot free: only the first window's worth
    load, and no more of them than the host tier holds, so no load evicts another."""
    manager = make_manager(num_slots=2, host_capacity=3)
    try:
        sched, _ = full_batch(manager, ["t1/a", "t2/b"], prefetch_window=5, max_staged_adapters=3)
        queued = [make_seq(10 + k, f"q{k}/ad") for k in range(7)]
        for seq in queued:
            sched.add(seq)
        for _ in range(5):
            run_round(sched)
        assert sorted(manager.host_loaded[2:]) == ["q0/ad", "q1/ad", "q2/ad"]  # each once, in queue order
        assert set(manager.host) == {"q0/ad", "q1/ad", "q2/ad"} and manager.loading == {}
    finally:
        manager.shutdown()


def test_no_prefetch_with_a_window_of_zero():
    manager = make_manager(num_slots=3)
    try:
        sched, _ = full_batch(manager, ["t1/a", "t2/b"], prefetch_window=0)
        sched.add(make_seq(10, "t3/c"))
        run_round(sched)
        assert sorted(manager.host_loaded) == ["t1/a", "t2/b"] and "t3/c" not in manager.resident()
    finally:
        manager.shutdown()


def test_slot_fair_preemption_with_the_real_manager_gives_the_aged_request_a_slot():
    """Tenant "long" runs two adapters on both slots; tenant "short" waits: once its request ages,
    the manager reports it waiting for a slot only, one of long's adapters is preempted, and the
    short request runs on that slot while the other long request keeps running."""
    manager = make_manager(num_slots=2)
    sched = Scheduler(4, 256, BlockManager(256, 4), manager, max_adapter_wait_steps=3)
    longs = [make_seq(k, f"long/ad{k}", max_tokens=500) for k in range(2)]
    for seq in longs:
        sched.add(seq)
    for _ in range(6):
        run_round(sched)
    assert all(s.status is SequenceStatus.RUNNING for s in longs)
    short = make_seq(9, "short/ad", max_tokens=4)
    sched.add(short)
    run_round(sched)  # its host load starts
    run_round(sched)  # the load lands in the host tier; both slots stay referenced, not aged yet
    assert manager.waits_for_slot("short/ad") and sched.slots.num_slot_preemptions == 0
    for _ in range(8):
        run_round(sched)
    assert short.status is not SequenceStatus.WAITING and sched.slots.num_slot_preemptions == 1
    assert sorted(s.status.name for s in longs) == ["RUNNING", "WAITING"]
    assert not manager.waits_for_slot("short/ad")


def test_a_host_tier_bounded_by_bytes_loads_each_adapter_once_through_a_queue_of_many(tiny_checkpoint, tiny_adapter):
    """Twelve distinct adapters on every target for four slots, ten tenants, a host tier of two
    such images: prefetch and admission start no more loads than the tier holds, so none is
    dropped before its request used it (before: every admission started a load, and 40 such
    adapters took 402 host loads)."""
    from tests.engine.helpers import make_engine

    probe = make_engine(tiny_checkpoint("qwen3_moe"), max_loras=1, max_lora_rank=16)
    largest = probe.runner.slot_pools.slot_bytes
    engine = make_engine(tiny_checkpoint("qwen3_moe"), max_loras=4, max_lora_rank=16, max_num_seqs=4,
                         max_cpu_loras=16, max_cpu_lora_bytes=2 * largest, kv_heap_sharing=False)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for k in range(12):
        path = tiny_adapter("qwen3_moe", "per_expert", rank=16, seed=100 + k)
        engine.add_request(f"r{k}", list(range(5, 15)), params, lora=LoRARequest(f"t{k % 10}/ad{k}@v1", str(path)),
                           tenant=f"t{k % 10}")
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.stats()
    assert stats["lora_host_loads"] == 12 and stats["lora_slot_loads"] == 12
