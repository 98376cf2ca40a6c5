"""Scheduling under adapter pressure, simulated in scheduler steps (no clock, no threads): more
adapters than slots, one tenant flooding distinct adapters, hot tenants whose resident adapters
never drain on their own. Every request is admitted, none waits more than a bound once it
heads its tenant's queue (aging), and the flood never holds every slot while others wait."""
from collections import OrderedDict

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import LoRARequest, Sequence, SequenceStatus

LOAD_STEPS = 2  # steps from a slot's reservation until its adapter is ready


class SteppedLoRAManager:
    """Slots with reference counts, unreferenced ones evicted least recently used first; an
    adapter reserved into a slot is ready LOAD_STEPS steps (collect_loads calls) later. An adapter
    named in `host_ready` is in the host tier (so may take a slot) only from that step on."""

    def __init__(self, num_slots: int):
        self.names: list[str | None] = [None] * num_slots
        self.refs, self.ready_at = [0] * num_slots, [0] * num_slots
        self.free: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))
        self.step = 0
        self.loads = 0
        self.host_ready: dict[str, int] = {}
        self.drain_calls: list[tuple[str, set[int]]] = []  # (adapter, the slots chosen before) of each drain_for

    def collect_loads(self) -> None:
        self.step += 1

    def begin_step(self) -> None:  # the heap's want of room: this fake has no KV sharing
        pass

    host_bytes = None  # the host tier is bounded by count only

    def reserve(self, name: str, path: str, keep=()) -> int | None:
        if self.step < self.host_ready.get(name, 0):
            return None
        if name in self.names:
            slot = self.names.index(name)
        else:
            slot = next((s for s in self.free if self.names[s] is None or self.names[s] not in keep), None)
            if slot is None:
                return None
            del self.free[slot]
            self.names[slot], self.ready_at[slot] = name, self.step + LOAD_STEPS
            self.loads += 1
        self.refs[slot] += 1
        self.free.pop(slot, None)
        return slot

    def is_ready(self, slot: int) -> bool:
        return self.step >= self.ready_at[slot]

    def describe(self, name: str, reserved, running) -> str:
        return f"{name} in {reserved}; slots {self.names}, running {running}"

    def holds(self, name: str) -> bool:
        return name in self.names

    @property
    def num_slots(self) -> int:
        return len(self.names)

    def has_free_slot(self) -> bool:
        return bool(self.free)

    def in_host_tier(self, name: str) -> bool:
        return self.step >= self.host_ready.get(name, 0)

    def waits_for_slot(self, name: str) -> bool:
        return name not in self.names and not self.free and self.step >= self.host_ready.get(name, 0)

    def slot_of(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def is_referenced(self, slot: int) -> bool:
        return self.refs[slot] > 0

    def drain_for(self, name: str, rank: dict[int, tuple], keep=(), draining=(), held=()) -> set[int]:
        """Slots, not bytes: nothing while an unreferenced slot not in `keep` can be had, else one
        referenced slot outside `held` and `keep`: of `draining` if one is, else the lowest ranked."""
        self.drain_calls.append((name, set(draining)))
        if any(self.names[s] is None or self.names[s] not in keep for s in self.free):
            return set()
        live = [s for s in range(len(self.names)) if self.refs[s] > 0 and s not in held and self.names[s] not in keep]
        return {min(live, key=lambda s: (s not in draining, rank.get(s, ())))} if live else set()

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            self.free[slot] = None


class Simulation:
    """Drives a Scheduler step by step: each scheduled prefill chunk or decode computes, a
    sequence samples a token when its prompt is done and finishes after max_tokens."""

    def __init__(self, num_slots: int, max_num_seqs: int, **kw):
        self.slots = SteppedLoRAManager(num_slots)
        self.sched = Scheduler(max_num_seqs, 1024, BlockManager(4096, 4), self.slots, **kw)
        self.arrived, self.headed, self.admitted = {}, {}, {}
        self.num_seqs = 0

    def add(self, tenant: str, adapter: str, max_tokens: int = 3) -> Sequence:
        seq = Sequence(self.num_seqs, f"r{self.num_seqs}", [1, 2, 3, 4], SamplingParams(max_tokens=max_tokens),
                       LoRARequest(f"{tenant}/{adapter}", "/x"), tenant)
        self.num_seqs += 1
        self.arrived[seq.seq_id] = self.slots.step
        self.sched.add(seq)
        return seq

    def step(self) -> None:
        for queue in self.sched.waiting.values():  # when each request became its tenant's oldest
            self.headed.setdefault(queue[0].seq_id, self.slots.step)
        for seq, n in self.sched.schedule().scheduled:
            self.admitted.setdefault(seq.seq_id, self.slots.step)
            seq.num_computed_tokens += n
            if seq.num_uncomputed_tokens == 0:
                seq.output_token_ids.append(7)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.sched.finish(seq, "length")

    def slots_of(self, tenant: str) -> set[int]:
        seqs = [*self.sched.running, *self.sched.waiting.get(tenant, ())]
        return {s.lora_slot for s in seqs if s.tenant == tenant and s.lora_slot is not None}

    def head_waits(self) -> dict[int, int]:
        """Steps each admitted request waited after it became its tenant's oldest waiting one."""
        return {k: self.admitted[k] - self.headed.get(k, self.admitted[k]) for k in self.admitted}


def run_pressure(sim: Simulation, hot_steps: int, max_steps: int) -> None:
    """Two hot tenants send a request for their one adapter every step for `hot_steps` steps
    (on two slots their adapters stay referenced throughout); a flood tenant sends 20 requests
    for 20 distinct adapters and five quiet tenants one each, all at the start."""
    for k in range(20):
        sim.add("flood", f"ad{k}")
    for q in range(5):
        sim.add(f"quiet{q}", "ad")
    for _ in range(max_steps):
        if sim.slots.step < hot_steps:
            sim.add("hot0", "ad", max_tokens=4)
            sim.add("hot1", "ad", max_tokens=4)
        sim.step()
        if not sim.sched.has_unfinished():
            return


def test_every_request_is_admitted_within_a_bound_under_adapter_pressure():
    """With aging after 20 steps, a request that heads its tenant's queue is admitted within 20
    steps plus one slot turnover per tenant ahead of it: the hot tenants' slots drain because
    nobody takes a new reference to them while an aged request waits for a slot."""
    wait_steps, tenants, turnover = 20, 8, LOAD_STEPS + 4 + 3
    sim = Simulation(num_slots=2, max_num_seqs=4, max_adapter_wait_steps=wait_steps)
    run_pressure(sim, hot_steps=400, max_steps=2000)
    assert not sim.sched.has_unfinished() and len(sim.admitted) == sim.num_seqs
    quiet = [k for k in range(20, 25)]
    assert all(sim.admitted[k] < 400 for k in quiet)  # admitted while the hot tenants still send
    assert max(sim.head_waits().values()) <= wait_steps + tenants * turnover


def test_without_aging_hot_adapters_starve_the_rest():
    """The same load with aging off: the hot slots never drain while the hot tenants send, so
    the bound above does not hold (the reason for aging)."""
    sim = Simulation(num_slots=2, max_num_seqs=4, max_adapter_wait_steps=None)
    run_pressure(sim, hot_steps=400, max_steps=2000)
    assert max(sim.head_waits().values()) > 20 + 8 * (LOAD_STEPS + 4 + 3)


def test_a_flood_of_distinct_adapters_does_not_hold_every_slot_while_others_wait():
    """Two slots, a batch of two: the flood's 20 requests come first and hold both slots when
    three quiet tenants' requests arrive. From the first slot that frees on, the flood never
    holds both while a quiet request waits for one, though the flood comes first in round-robin
    order (nobody else was waiting when it was last served)."""
    sim = Simulation(num_slots=2, max_num_seqs=2)
    flood = [sim.add("flood", f"ad{k}", max_tokens=6) for k in range(20)]
    quiet, freed = [], False
    for step in range(400):
        if step == 5:
            quiet = [sim.add(f"quiet{q}", "ad") for q in range(3)]
            assert len(sim.slots_of("flood")) == 2
        sim.step()
        starved = [s for s in quiet if s.status is SequenceStatus.WAITING and s.lora_slot is None]
        assert not (freed and starved and len(sim.slots_of("flood")) == 2), f"step {step}: the flood holds every slot"
        freed |= bool(quiet) and 0 in sim.slots.refs
        if not sim.sched.has_unfinished():
            break
    assert not sim.sched.has_unfinished() and len(sim.admitted) == sim.num_seqs
    fourth = sorted(sim.admitted[s.seq_id] for s in flood)[3]
    assert all(sim.admitted[s.seq_id] <= fourth for s in quiet)


def long_requests_hold_every_slot(sim: Simulation, slots: int) -> tuple[list[Sequence], Sequence]:
    """Tenant "long" runs `slots` requests of 300 tokens over as many adapters, holding every slot;
    then tenant "short" asks for an 8-token completion with an adapter of its own."""
    longs = [sim.add("long", f"ad{k}", max_tokens=300) for k in range(slots)]
    for _ in range(slots * (LOAD_STEPS + 2)):  # one load in flight per tenant: one after another
        sim.step()
    assert all(s.status is SequenceStatus.RUNNING for s in longs) and 0 not in sim.slots.refs
    return longs, sim.add("short", "ad", max_tokens=8)


def run_to_completion(sim: Simulation, max_steps: int = 2000) -> None:
    """Step until every request finished; all of them were admitted."""
    for _ in range(max_steps):
        sim.step()
        if not sim.sched.has_unfinished():
            break
    assert not sim.sched.has_unfinished() and len(sim.admitted) == sim.num_seqs


def test_a_tenant_holding_every_slot_with_long_requests_gives_one_back_to_an_aged_request():
    """Slot-fair preemption: 20 steps after it heads its queue, the short request gets a slot
    (one long request is preempted and recomputed later); everything still finishes."""
    sim = Simulation(num_slots=4, max_num_seqs=8, max_adapter_wait_steps=20)
    longs, short = long_requests_hold_every_slot(sim, 4)
    run_to_completion(sim)
    assert sim.admitted[short.seq_id] - sim.arrived[short.seq_id] <= 20 + LOAD_STEPS + 3
    assert sim.sched.slots.num_slot_preemptions == 1
    assert sum(s.num_preemptions for s in longs) == 1


def test_without_aging_the_short_request_waits_for_a_long_one_to_finish():
    sim = Simulation(num_slots=4, max_num_seqs=8, max_adapter_wait_steps=None)
    _, short = long_requests_hold_every_slot(sim, 4)
    for _ in range(2000):
        sim.step()
        if short.status is not SequenceStatus.WAITING:
            break
    assert sim.admitted[short.seq_id] - sim.arrived[short.seq_id] >= 250  # until a long one ends


def test_no_slot_is_taken_from_a_tenant_at_its_fair_share():
    """Two slots, two tenants each running one long request: the second tenant's aged request for
    a second adapter waits for a slot (its own tenant holds a fair share already), no preemption."""
    sim = Simulation(num_slots=2, max_num_seqs=8, max_adapter_wait_steps=5)
    sim.add("a", "ad", max_tokens=100)
    sim.add("b", "ad", max_tokens=100)
    for _ in range(LOAD_STEPS + 2):
        sim.step()
    extra = sim.add("b", "other", max_tokens=2)
    for _ in range(60):
        sim.step()
    assert extra.status is SequenceStatus.WAITING and sim.sched.slots.num_slot_preemptions == 0


def test_a_slotless_head_gets_a_slot_drained_after_slot_reclaim_steps_without_aging():
    sim = Simulation(num_slots=4, max_num_seqs=8, max_adapter_wait_steps=None, slot_reclaim_steps=3)
    longs, short = long_requests_hold_every_slot(sim, 4)
    run_to_completion(sim)
    assert sim.admitted[short.seq_id] - sim.arrived[short.seq_id] <= 3 + LOAD_STEPS + 2
    assert sim.sched.slots.num_slot_preemptions == 1 and sum(s.num_preemptions for s in longs) == 1


def test_a_floods_own_older_waiting_requests_neither_block_nor_take_the_drained_slot():
    """Tenant "long" holds every slot and queues 8 more requests over 8 other adapters before
    "short" arrives; its heads are older (and aged) but it already holds more than its share: the
    slot drained goes to "short", and no slot is drained again for "long" afterwards."""
    sim = Simulation(num_slots=4, max_num_seqs=16, max_adapter_wait_steps=5, slot_reclaim_steps=3)
    longs = [sim.add("long", f"ad{k}", max_tokens=300) for k in range(4)]
    for _ in range(4 * (LOAD_STEPS + 2)):
        sim.step()
    assert all(s.status is SequenceStatus.RUNNING for s in longs)
    queued = [sim.add("long", f"more{k}", max_tokens=300) for k in range(8)]
    for _ in range(10):
        sim.step()
    short = sim.add("short", "ad", max_tokens=8)
    for _ in range(3 + LOAD_STEPS + 2):
        sim.step()
    assert short.status is not SequenceStatus.WAITING
    assert all(s.status is SequenceStatus.WAITING for s in queued)
    for _ in range(200):
        sim.step()
    assert sim.sched.slots.num_slot_preemptions == 1


def test_with_more_tenants_than_slots_no_single_slot_is_preempted():
    """Eight tenants, one long request each, four slots: the four without a slot wait for the
    first four to finish; no slot is drained, as taking a tenant's only slot helps nobody."""
    sim = Simulation(num_slots=4, max_num_seqs=16, max_adapter_wait_steps=5, slot_reclaim_steps=3)
    for t in range(8):
        sim.add(f"t{t}", "ad", max_tokens=60)
    run_to_completion(sim)
    assert sim.sched.slots.num_slot_preemptions == 0


def test_waiting_requests_of_resident_adapters_keep_them_from_eviction():
    """Four slots hold adapters ad4-ad7 from earlier requests (unreferenced) when eight tenants'
    requests for ad0-ad7 arrive at once. The requests for the resident four take their
    references first, so only ad0-ad3 load (4 loads); reserving in arrival order instead evicts
    each of ad4-ad7 just before its own request's turn (8 loads)."""
    sim = Simulation(num_slots=4, max_num_seqs=8)
    for k in range(4, 8):
        sim.add(f"early{k}", f"ad{k}", max_tokens=1)
    while sim.sched.has_unfinished():
        sim.step()
    sim.slots.loads = 0
    for k in range(8):
        sim.add(f"early{k}", f"ad{k}")
    for _ in range(200):
        sim.step()
        if not sim.sched.has_unfinished():
            break
    assert not sim.sched.has_unfinished() and sim.slots.loads == 4


def test_adapter_ready_is_stamped_by_the_schedulers_clock_when_its_slot_is_first_found_ready():
    """The stepped manager loads in LOAD_STEPS steps; with the scheduler's clock counting steps,
    a request's adapter_ready is its arrival plus the load, and a request without an adapter
    gets none. One slot: the second adapter waits for the first request to finish."""
    sim = Simulation(num_slots=1, max_num_seqs=4)
    sim.sched.clock = lambda: sim.slots.step
    first, second = sim.add("a", "ad"), sim.add("b", "ad")
    plain = Sequence(99, "plain", [1, 2], SamplingParams(max_tokens=2))
    sim.sched.add(plain)
    for _ in range(30):
        sim.step()
    assert not sim.sched.has_unfinished()
    # reserved at the first step after its arrival, ready LOAD_STEPS steps later
    assert first.adapter_ready == sim.arrived[first.seq_id] + 1 + LOAD_STEPS
    assert second.adapter_ready >= sim.admitted[first.seq_id] + LOAD_STEPS  # its slot freed first
    assert second.adapter_ready <= sim.admitted[second.seq_id]
    assert plain.adapter_ready is None


def _flood_and_short_requests(sim: Simulation, shorts: int) -> list[int]:
    """Tenant "flood" keeps 12 long requests over 6 adapters running on 4 slots (each replaced
    by the next adapter's as it ends); "quiet" sends one 4-token request at a time on its one
    adapter, the next 3 steps after the last ends. Returns each quiet request's steps from its
    arrival to its last token."""
    for k in range(12):
        sim.add("flood", f"ad{k % 6}", max_tokens=40)
    turns, latencies, quiet, next_at, sent = 12, [], None, 30, 0
    for _ in range(3000):
        sim.step()
        flood_running = sum(s.tenant == "flood" for s in sim.sched.running) + len(sim.sched.waiting.get("flood", ()))
        while flood_running < 12:
            sim.add("flood", f"ad{turns % 6}", max_tokens=40)
            turns, flood_running = turns + 1, flood_running + 1
        if quiet is not None and quiet.status is SequenceStatus.FINISHED:
            latencies.append(sim.slots.step - sim.arrived[quiet.seq_id])
            quiet, next_at = None, sim.slots.step + 3
        if quiet is None and sim.slots.step >= next_at:
            if sent == shorts:
                break
            quiet, sent = sim.add("quiet", "ad", max_tokens=4), sent + 1
    return latencies


def test_a_quiet_tenants_adapter_stays_resident_between_its_requests_under_a_flood():
    """The flood holds more than its fair share (2 of 4 slots with two tenants): the adapter the
    quiet tenant ran lately is not evicted for it between requests, so only the quiet tenant's
    first request waits for a drained slot and a load; the rest run at once (4 steps + 1)."""
    sim = Simulation(num_slots=4, max_num_seqs=16, slot_reclaim_steps=3)
    latencies = _flood_and_short_requests(sim, shorts=10)
    assert len(latencies) == 10
    assert all(steps <= 5 for steps in latencies[1:]), latencies
    assert sim.sched.slots.num_slot_preemptions == 1


def test_without_keeping_the_quiet_tenants_adapter_each_request_waits_for_a_drained_slot():
    sim = Simulation(num_slots=4, max_num_seqs=16, slot_reclaim_steps=3)
    sim.sched.slots.keep_steps = 0
    latencies = _flood_and_short_requests(sim, shorts=10)
    assert len(latencies) == 10
    assert sum(steps > 5 for steps in latencies[1:]) >= 5, latencies


def test_a_one_token_request_also_keeps_its_tenants_adapter():
    """A request that finishes in the step that admits it never runs at a step's start: its
    adapter counts as run lately from its admission, so the flood does not evict it."""
    sim = Simulation(num_slots=2, max_num_seqs=8, slot_reclaim_steps=3)
    sim.add("flood", "ad0", max_tokens=500)
    for _ in range(LOAD_STEPS + 2):
        sim.step()
    quick = sim.add("quiet", "ad", max_tokens=1)
    for _ in range(LOAD_STEPS + 3):
        sim.step()
    assert quick.status is SequenceStatus.FINISHED
    flood = sim.add("flood", "ad1", max_tokens=500)  # the flood holds 1 of 2 slots: its fair share
    for _ in range(10):
        sim.step()
    assert sim.slots.holds("quiet/ad") and flood.status is SequenceStatus.WAITING


def test_a_request_aged_on_its_adapters_host_load_does_not_hold_back_resident_adapters():
    """The flood's request ages while its adapter loads into the host tier (200 steps): it waits for
    no slot (one is free), so a quiet tenant's request on its resident adapter runs at once instead
    of waiting for that load (H200, bench_floods' slot_hog: ~1 s a request)."""
    sim = Simulation(num_slots=2, max_num_seqs=8, max_adapter_wait_steps=20, slot_reclaim_steps=3)
    first = sim.add("quiet", "ad", max_tokens=1)
    for _ in range(LOAD_STEPS + 2):
        sim.step()
    assert first.status is SequenceStatus.FINISHED and sim.slots.holds("quiet/ad")
    sim.slots.host_ready["flood/ad0"] = sim.slots.step + 200
    slow = sim.add("flood", "ad0", max_tokens=5)
    for _ in range(30):  # the flood's request ages (20 steps) on its host load
        sim.step()
    assert slow in sim.sched.slots.aged
    quick = sim.add("quiet", "ad", max_tokens=2)
    for _ in range(4):
        sim.step()
    assert quick.status is SequenceStatus.FINISHED and slow.status is SequenceStatus.WAITING


def test_an_aged_request_under_its_share_runs_within_one_drain_of_its_host_load_landing():
    """Two hot tenants keep both slots referenced with 30-token requests; a third tenant's request
    ages while its adapter loads into the host tier (200 steps). Under its share with no slot
    free, it holds new references back during the load, so it runs within one drain of a hot
    request (30 steps) once the load lands; holding nobody back, it waited 75 steps more."""
    sim = Simulation(num_slots=2, max_num_seqs=8, max_adapter_wait_steps=20)
    sim.slots.host_ready["small/ad"] = 200
    small = sim.add("small", "ad", max_tokens=2)
    while small.status is not SequenceStatus.FINISHED and sim.slots.step < 600:
        if sim.slots.step < 500:
            sim.add("hot0", "ad", max_tokens=30)
            sim.add("hot1", "ad", max_tokens=30)
        sim.step()
    assert sim.admitted[small.seq_id] <= 200 + 30 + LOAD_STEPS + 3, sim.admitted[small.seq_id]


def test_aged_waits_are_logged_at_most_once_a_second_with_the_rest_counted(caplog):
    """Three tenants' requests age in one step on one slot that a long request holds: one line
    then; a fourth aging a second later gets the next line, which counts the two not written."""
    now = [0.0]
    sim = Simulation(num_slots=1, max_num_seqs=8, max_adapter_wait_steps=5, clock=lambda: now[0])
    sim.add("hold", "ad", max_tokens=100)
    for _ in range(LOAD_STEPS + 2):
        sim.step()
    for tenant in ("a", "b", "c"):
        sim.add(tenant, "ad")
    with caplog.at_level("WARNING", logger="engine.slot_policy"):
        for _ in range(8):
            sim.step()
        now[0] = 1.5
        sim.add("d", "ad")
        for _ in range(8):
            sim.step()
    lines = [r.getMessage() for r in caplog.records if "steps for adapter" in r.getMessage()]
    assert len(lines) == 2
    assert "more aged" not in lines[0] and "d/ad (2 more aged since the last such line)" in lines[1]


def busy_slots(sim: Simulation, hot_tokens: int, other_tokens: int, per_step: int = 1) -> Sequence:
    """Tenant "other" runs one request of `other_tokens` on its adapter; tenant "hot" sends
    `per_step` requests of `hot_tokens` a step on another: both slots referenced. Returns other's."""
    other = sim.add("other", "ad", max_tokens=other_tokens)
    for _ in range(LOAD_STEPS + 2):
        for _ in range(per_step):
            sim.add("hot", "ad", max_tokens=hot_tokens)
        sim.step()
    assert other.status is SequenceStatus.RUNNING and not sim.slots.free
    return other


def test_a_busy_adapter_keeps_taking_requests_while_an_aged_request_waits_for_another_slot_to_drain():
    """An aged request waits for a slot; the slot drained for it is the one whose longest request
    ends soonest (other's 40 tokens against hot's 80). The hot adapter's slot is not drained, so
    its new requests keep being admitted during the wait, and the aged request runs once other's
    request ends."""
    sim = Simulation(num_slots=2, max_num_seqs=128, max_adapter_wait_steps=10)
    other = busy_slots(sim, hot_tokens=80, other_tokens=40)
    small = sim.add("small", "ad", max_tokens=2)
    hot_admitted_while_blocked = 0
    while small.status is not SequenceStatus.FINISHED and sim.slots.step < 300:
        hot = sim.add("hot", "ad", max_tokens=80)
        sim.step()
        blocked = small in sim.sched.slots.aged and small.lora_slot is None
        hot_admitted_while_blocked += blocked and hot.seq_id in sim.admitted
    assert other.status is SequenceStatus.FINISHED and small.status is SequenceStatus.FINISHED
    assert hot_admitted_while_blocked >= 10
    # it ran within its aging, other's remaining decode steps and its load
    assert sim.admitted[small.seq_id] - sim.arrived[small.seq_id] <= 10 + 40 + LOAD_STEPS + 3


def test_an_aged_request_gets_a_seat_though_resident_adapters_requests_could_fill_them():
    """Seats are the other half of an aged request's room: with requests riding the hot adapter
    able to fill every seat, one seat is left while an aged request blocks or its copy is in
    flight, so it runs as soon as its slot is ready."""
    sim = Simulation(num_slots=2, max_num_seqs=4, max_adapter_wait_steps=10)
    other = sim.add("other", "ad", max_tokens=40)
    hot = [sim.add("hot", "ad", max_tokens=100) for _ in range(3)]
    for _ in range(LOAD_STEPS + 2):
        sim.step()
    assert all(s.status is SequenceStatus.RUNNING for s in (other, *hot)) and not sim.slots.free
    small = sim.add("small", "ad", max_tokens=2)
    while small.seq_id not in sim.admitted and sim.slots.step < 300:
        for _ in range(3):  # more than the seats: the hot tenant alone would fill them
            sim.add("hot", "ad", max_tokens=100)
        sim.step()
    assert other.status is SequenceStatus.FINISHED and small.seq_id in sim.admitted
    slot_ready = sim.slots.ready_at[small.lora_slot]
    assert sim.admitted[small.seq_id] <= slot_ready + 1


def test_the_slots_chosen_to_drain_are_offered_again_while_the_request_blocks():
    """Each step the slot policy asks the manager for the blocking request's drain set with the
    slots it chose before, so the choice stays put as the batch changes."""
    sim = Simulation(num_slots=2, max_num_seqs=8, max_adapter_wait_steps=10)
    busy_slots(sim, hot_tokens=80, other_tokens=40)
    small = sim.add("small", "ad", max_tokens=2)
    for _ in range(30):
        sim.add("hot", "ad", max_tokens=80)
        sim.step()
    asked = [chosen for name, chosen in sim.slots.drain_calls if name == "small/ad"]
    assert len(asked) >= 10 and asked[0] == set() and all(chosen == asked[1] == {0} for chosen in asked[1:])


def test_aged_requests_go_in_the_order_they_became_their_tenants_head():
    """A flood's five requests, queued first, age together; a quiet tenant's request queued a step
    later is the quiet tenant's head from then on, while each of the flood's later requests
    heads the flood's queue only once the one before ran: the quiet request runs after the
    flood's first, not after all five (one slot)."""
    sim = Simulation(num_slots=1, max_num_seqs=2, max_adapter_wait_steps=2)
    flood = [sim.add("flood", f"ad{k}", max_tokens=5) for k in range(5)]
    sim.step()
    quiet = sim.add("quiet", "ad", max_tokens=5)
    run_to_completion(sim)
    assert sim.admitted[flood[0].seq_id] < sim.admitted[quiet.seq_id] < sim.admitted[flood[2].seq_id]


def test_a_slot_that_waiting_requests_hold_is_drained_after_one_nobody_waits_for():
    """Busy's slot runs requests that end sooner than long's one request, but busy's queued
    requests hold it: long's slot is the one drained for the aged request, and busy's queue keeps
    moving meanwhile instead of its adapter being evicted from under it."""
    sim = Simulation(num_slots=2, max_num_seqs=3, max_adapter_wait_steps=10)
    long = sim.add("long", "ad", max_tokens=60)
    for _ in range(LOAD_STEPS + 2):
        sim.add("busy", "ad", max_tokens=6)
        sim.step()
    long_slot = long.lora_slot
    small = sim.add("small", "ad", max_tokens=2)
    busy = []
    while small.seq_id not in sim.admitted and sim.slots.step < 300:
        busy.append(sim.add("busy", "ad", max_tokens=6))
        sim.step()
    asked = [chosen for name, chosen in sim.slots.drain_calls if name == "small/ad"]
    assert small.lora_slot == long_slot and long.status is SequenceStatus.FINISHED
    assert {long_slot} in asked and all(chosen in (set(), {long_slot}) for chosen in asked)
    assert sum(s.seq_id in sim.admitted for s in busy) >= 10  # busy's queue moved while small waited
