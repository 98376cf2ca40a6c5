"""Scheduler and BlockManager in plain Python: budgets, fairness, adapter slots, preemption."""
from engine.block_manager import BlockManager
from engine.errors import AdapterLoadError
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import LoRARequest, Sequence


class FakeLoRAManager:
    """Slots with reference counts; adapters listed in `loading` are not ready yet."""

    def __init__(self, num_slots: int, failing=()):
        self.names: list[str | None] = [None] * num_slots
        self.refs = [0] * num_slots
        self.failing, self.loading = set(failing), set()

    def reserve(self, name, path, keep=()):
        if name in self.failing:
            raise AdapterLoadError(f"{name} is broken")
        if name in self.names:
            slot = self.names.index(name)
        else:
            free = [s for s in range(len(self.refs)) if self.refs[s] == 0]
            if not free:
                return None
            slot = free[0]
            self.names[slot] = name
        self.refs[slot] += 1
        return slot

    def is_ready(self, slot):
        return self.names[slot] not in self.loading

    def holds(self, name):
        return name in self.names

    @property
    def num_slots(self):
        return len(self.names)

    def collect_loads(self):
        self.collected = getattr(self, "collected", 0) + 1

    def begin_step(self):  # the heap's want of room: this fake has no KV sharing
        pass

    host_bytes = None  # the host tier is bounded by count only

    def release(self, slot):
        self.refs[slot] -= 1


def seq(i, tenant="", n=4, adapter=None, max_tokens=4):
    lora = LoRARequest(adapter, "/x") if adapter else None
    return Sequence(i, f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), lora, tenant)


def make(num_blocks=64, block_size=4, max_seqs=64, budget=64, slots=None):
    return Scheduler(max_seqs, budget, BlockManager(num_blocks, block_size), slots)


def test_round_robin_over_tenants_flood_does_not_starve_others():
    sched = make(max_seqs=4)
    for i in range(20):
        sched.add(seq(i, "flood"))
    sched.add(seq(100, "quiet"))
    sched.add(seq(101, "other"))
    picked = [s.tenant for s, _ in sched.schedule().scheduled]
    assert picked.count("quiet") == 1 and picked.count("other") == 1 and len(picked) == 4


def test_never_more_distinct_adapters_than_slots_and_loading_adapters_wait():
    slots = FakeLoRAManager(2)
    sched = make(slots=slots)
    for i, name in enumerate(["t1/a", "t2/b", "t3/c", "t1/a", "t4/d"]):
        sched.add(seq(i, name.split("/")[0], adapter=name))
    first = sched.schedule().scheduled
    assert {s.lora.lora_name for s, _ in first} == {"t1/a", "t2/b"} and len(first) == 3
    slots.loading.add("t1/a")
    for s, n in first:
        s.num_computed_tokens += n
    later = make(slots=slots)
    later.add(seq(9, "t9", adapter="t1/a"))
    assert later.schedule().scheduled == []  # resident but still loading: not admitted


def test_released_slot_lets_next_adapter_in():
    slots = FakeLoRAManager(1)
    sched = make(slots=slots)
    a, b = seq(0, "t1", adapter="t1/a"), seq(1, "t2", adapter="t2/b")
    sched.add(a)
    sched.add(b)
    assert [s for s, _ in sched.schedule().scheduled] == [a]
    sched.finish(a, "stop")
    assert [s for s, _ in sched.schedule().scheduled] == [b]
    assert slots.refs == [1]


def test_failed_adapter_is_reported_and_others_run():
    sched = make(slots=FakeLoRAManager(2, failing={"t1/bad"}))
    bad, good = seq(0, "t1", adapter="t1/bad"), seq(1, "t2")
    sched.add(bad)
    sched.add(good)
    out = sched.schedule()
    assert out.failed == [bad] and isinstance(bad.error, AdapterLoadError)
    assert [s for s, _ in out.scheduled] == [good] and bad.finish_reason == "abort"


def test_token_budget_chunks_prefill_and_decodes_go_first():
    sched = make(budget=6)
    long, short = seq(0, n=10), seq(1, "t", n=3)
    sched.add(long)
    out = sched.schedule()
    assert [(s.seq_id, n) for s, n in out.scheduled] == [(0, 6)]
    long.num_computed_tokens += 6
    sched.add(short)
    assert [(s.seq_id, n) for s, n in sched.schedule().scheduled] == [(0, 4), (1, 2)]


def test_preemption_frees_newest_and_requeues_it_first():
    sched = make(num_blocks=3, block_size=4, budget=64)
    a, b = seq(0, n=4), seq(1, "t", n=4)
    sched.add(a)
    sched.add(b)
    for s, n in sched.schedule().scheduled:
        s.num_computed_tokens += n
        s.output_token_ids.append(7)
    out = sched.schedule()  # both need a second block; only one is free
    assert out.num_preempted == 1 and [s for s, _ in out.scheduled] == [a]
    assert b.num_computed_tokens == 0 and b.block_table == [] and sched.waiting["t"][0] is b
    assert sched.block_manager.num_free_blocks == 1


def test_block_manager_allocates_incrementally_and_frees():
    bm = BlockManager(num_blocks=5, block_size=4)
    s = seq(0, n=9)
    assert bm.num_blocks_needed(s, 9) == 3 and bm.can_allocate(s, 9)
    bm.allocate(s, 9)
    s.num_computed_tokens = 9
    assert bm.num_blocks_needed(s, 3) == 0 and bm.num_blocks_needed(s, 4) == 1
    assert not bm.can_allocate(s, 20)
    bm.deallocate(s)
    assert bm.num_free_blocks == 5 and s.block_table == []


def test_adapter_flood_of_one_tenant_leaves_slots_for_others():
    slots = FakeLoRAManager(4)
    slots.loading = {f"flood/ad{k}" for k in range(10)}  # every flood adapter still loading
    sched = make(slots=slots)
    for k in range(10):
        sched.add(seq(k, "flood", adapter=f"flood/ad{k}"))
    sched.add(seq(50, "quiet", adapter="quiet/ad"))
    out = sched.schedule()
    assert [s.seq_id for s, _ in out.scheduled] == [50]
    assert sum(r > 0 for r in slots.refs) == 2  # one slot for the flood this pass, one for quiet


def test_the_scheduler_advances_request_state_at_launch_and_from_the_sampled_tokens():
    sched = make(budget=6)
    long_prompt, short_prompt = seq(1, n=8), seq(2, n=2)
    for s in (long_prompt, short_prompt):
        sched.add(s)
    out = sched.schedule()
    assert [(s.seq_id, n) for s, n in out.scheduled] == [(1, 6)]  # a 6-token chunk of the 8
    sched.launched(out, [False])
    assert long_prompt.num_computed_tokens == 6 and long_prompt.num_pending == 0
    assert sched.update_from_output(out, [None], now=1.0) == [] and long_prompt.output_token_ids == []

    out = sched.schedule()  # the last 2 of the long prompt, then the short prompt: each samples
    assert [(s.seq_id, n) for s, n in out.scheduled] == [(1, 2), (2, 2)]
    sched.launched(out, [True, True])
    assert (long_prompt.num_computed_tokens, long_prompt.num_pending) == (8, 1)
    sched.finish(short_prompt, "abort")  # finished while the step ran: its token is dropped
    appended = sched.update_from_output(out, [7, 9], now=2.0)
    assert appended == [(long_prompt, 7)]
    assert long_prompt.output_token_ids == [7] and long_prompt.num_pending == 0
    assert long_prompt.first_token_time == 2.0 and short_prompt.output_token_ids == []
