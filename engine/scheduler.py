"""Scheduler: continuous batching with chunked prefill, preemption by recompute, LoRA slots
and round-robin fairness between tenants. Plain Python: no torch here.

Each step spends a token budget: running sequences first (decodes, then the rest of
chunked prefills), then waiting sequences in admission order: round-robin over tenants,
FIFO within a tenant, behind the sequences that waited too long for an adapter slot
(aging, below). A waiting sequence is admitted only when its adapter holds a ready slot
and its KV blocks fit.

Adapter pressure, three rules:
- one adapter load in flight per tenant, so a flood of one tenant's adapters cannot take
  every slot;
- prefetch: each step, before admission, the first `prefetch_window` waiting sequences in
  admission order reserve their adapters (LoRAManager.reserve starts the host load, and
  takes a free slot once the adapter is in the host tier), so an adapter loads while its
  request queues behind a full batch. Tenants holding fewer slots go first (a slot that
  frees goes to a tenant that waits, not back to the flood that held it); per tenant, one
  waiting sequence at a time may hold or load an adapter no running sequence uses; no more
  distinct adapters than the host tier holds (`max_staged_adapters`) are staged, so
  prefetched loads do not evict each other from it. A slot that a running sequence
  references is never evicted (the manager evicts unreferenced slots only);
- aging: a tenant's queue head with an adapter that has waited `max_adapter_wait_steps`
  steps is visited first (oldest first, one per tenant), and while such a sequence has no
  slot nobody else takes a slot reference, so the next slot that frees is its own;
- slot-fair preemption: when a queue head has waited `slot_reclaim_steps` steps (or aged)
  for a slot, every slot is held, and one tenant holds more than its fair share (slots /
  tenants that want one, and never less than one slot), that tenant's adapter with the fewest running sequences is
  preempted (recompute) so its slot drains for the waiting one: long requests over many
  adapters cannot keep another tenant out until they finish. The wait is short (a few
  steps), since a tenant under its share loses nothing to a flood only if it gets a slot
  about as fast as a free one would load; the freed slot goes to it because the prefetch
  serves tenants holding fewer slots first.

The prefetch is triggered here, not in LoRAManager: only the scheduler knows the admission
order, the tenants and the aging, and a prefetch is an ordinary `reserve` taken on the
waiting sequence's behalf, so the slot is reference counted (never evicted before its
request runs, released if the request is aborted) and the manager stays a cache with no
second path into its slots. The loads still run on the manager's loader and copy threads:
the step only asks, it never waits on them.

With async scheduling the engine schedules step n+1 while step n runs: a sequence that step n
samples counts that token as pending (Sequence.num_pending) and decodes it next, its id fed
on the device; one whose pending token is its last is left out.
"""
from collections import deque
from dataclasses import dataclass, field
from itertools import islice

from engine.block_manager import BlockManager
from engine.errors import AdapterLoadError
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    failed: list[Sequence] = field(default_factory=list)  # adapter errors, to be reported
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager,
                 lora_manager=None, max_model_len: int | None = None, prefetch_window: int | None = None,
                 max_adapter_wait_steps: int | None = None, max_staged_adapters: int | None = None,
                 slot_reclaim_steps: int | None = None):
        """prefetch_window: waiting sequences whose adapters are reserved ahead (None: 2 x
        max_num_seqs, 0: none); max_adapter_wait_steps: steps before a queue head with an
        adapter gets first claim on a slot (None: no aging); max_staged_adapters: distinct
        adapters the prefetch keeps staged for waiting sequences (the host tier's count; None:
        no bound); slot_reclaim_steps: steps a queue head waits for a slot, while another tenant
        holds more than its fair share of them, before one of that tenant's slots is drained for
        it (None: only for aged heads)."""
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len or float("inf")
        self.block_manager, self.lora_manager = block_manager, lora_manager
        self.prefetch_window = 2 * max_num_seqs if prefetch_window is None else prefetch_window
        self.max_adapter_wait_steps, self.max_staged_adapters = max_adapter_wait_steps, max_staged_adapters
        self.slot_reclaim_steps = slot_reclaim_steps
        self.waiting: dict[str, deque[Sequence]] = {}
        self.tenant_order: deque[str] = deque()
        self.running: list[Sequence] = []
        self.num_steps = 0
        self.enqueued_step: dict[int, int] = {}  # seq_id -> the step count when it (re)entered the queue
        self.aged: list[Sequence] = []  # this step's sequences with first claim on a slot
        self.num_slot_preemptions = 0  # slots drained for a waiting tenant (_reclaim_slot)
        self.num_prefetched = 0  # slots the prefetch reserved for sequences a step before admission

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        queue = self.waiting.setdefault(seq.tenant, deque())
        if seq.tenant not in self.tenant_order:
            self.tenant_order.appendleft(seq.tenant) if front else self.tenant_order.append(seq.tenant)
        queue.appendleft(seq) if front else queue.append(seq)
        self.enqueued_step[seq.seq_id] = self.num_steps

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.num_steps += 1
        if self.lora_manager is not None:
            self.lora_manager.collect_loads()
            self.aged = self._aged_heads()
            self._reclaim_slot(out)
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        prefetched = self._prefetch(out) if self.lora_manager is not None and self.prefetch_window > 0 else []
        if out.num_preempted == 0:  # after the prefetch: slots go to the waiting in its order
            self._admit_waiting(out, budget)
        self.num_prefetched += sum(seq.status is SequenceStatus.WAITING for seq in prefetched)
        out.scheduled.sort(key=lambda entry: entry[1] > 1)  # single-token entries (decodes) first
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            if seq.last_token_is_pending_and_final(self.max_model_len):
                continue  # scheduled ahead of its last token's read-back: that token ends it
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(seq, n):
                victim = self.running[-1]
                self.preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, n)
                out.scheduled.append((seq, n))
                budget -= n
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while budget > 0 and len(self.running) < self.max_num_seqs and self.tenant_order:
            seq = self._next_admissible(budget, out)
            if seq is None:
                return
            n = min(seq.num_uncomputed_tokens, budget)
            self.block_manager.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

    def _next_admissible(self, budget: int, out: SchedulerOutput) -> Sequence | None:
        """The first admissible sequence: aged ones first, then round-robin tenant order (FIFO
        within a tenant)."""
        ready, blocked = self._reserve_aged(out)
        if ready is not None:
            return self._take(ready, budget)
        for tenant in list(self.tenant_order):
            # one adapter load in flight per tenant: a flood cannot take every slot
            pending = blocked
            for seq in list(self.waiting[tenant]):
                if pending and seq.lora is not None and seq.lora_slot is None:
                    continue
                state = self._adapter_state(seq, out)
                pending |= state == "loading"
                if state == "ok":
                    return self._take(seq, budget)
        return None

    def _take(self, seq: Sequence, budget: int) -> Sequence | None:
        """Remove `seq` from its queue for admission, or None when its KV blocks do not fit."""
        if not self.block_manager.can_allocate(seq, min(seq.num_uncomputed_tokens, budget)):
            return None  # KV is full: admit nobody rather than starve long prompts
        self.waiting[seq.tenant].remove(seq)
        self.enqueued_step.pop(seq.seq_id, None)
        self._served(seq.tenant)
        return seq

    def _aged_heads(self) -> list[Sequence]:
        """Tenants' queue heads with an adapter that have waited max_adapter_wait_steps steps or
        more, oldest first. One per tenant, so aging cannot hand one tenant's flood every slot."""
        return self._heads_waited(self.max_adapter_wait_steps)

    def _heads_waited(self, steps: int | None) -> list[Sequence]:
        """Tenants' queue heads with an adapter that have waited `steps` steps or more, oldest
        first (none when `steps` is None)."""
        if steps is None:
            return []
        since = self.num_steps - steps
        heads = (self.waiting[tenant][0] for tenant in self.tenant_order)
        return sorted((seq for seq in heads if seq.lora is not None and self._enqueued(seq) <= since),
                      key=self._enqueued)

    def _enqueued(self, seq: Sequence) -> int:
        return self.enqueued_step.get(seq.seq_id, self.num_steps)

    def _reserve_aged(self, out: SchedulerOutput) -> tuple[Sequence | None, bool]:
        """Reserve the aged sequences' adapters, oldest first, until one finds no slot. Returns
        the first whose slot is ready, and whether one found no slot: nobody behind it may then
        take a slot reference (not even to a resident adapter, whose slot would then never
        drain), so the next slot that frees is its own."""
        ready = None
        for seq in [s for s in self.aged if s.status is SequenceStatus.WAITING]:
            state = self._adapter_state(seq, out)
            if state == "loading" and seq.lora_slot is None:
                return ready, True
            if state == "ok" and ready is None:
                ready = seq
        return ready, False

    def _reclaim_slot(self, out: SchedulerOutput) -> None:
        """Slot-fair preemption (see the module docstring) for the first sequence without a slot,
        aged ones then slot_reclaim_steps-old queue heads, oldest first, whose tenant some other
        tenant out-holds beyond its fair share: preempts the running sequences of that tenant's
        adapter with the fewest, drops waiting reservations of its slot, and gives the claimant
        first claim (`self.aged`) on the slot that frees."""
        aged = [s for s in self.aged if s.status is SequenceStatus.WAITING and s.lora_slot is None]
        claimants = [*aged, *(s for s in self._heads_waited(self.slot_reclaim_steps)
                              if s.lora_slot is None and s not in aged)]
        if not claimants:
            return
        held: dict[str, dict[int, list[Sequence]]] = {}  # tenant -> slot -> its running sequences
        for seq in self.running:
            if seq.lora_slot is not None:
                held.setdefault(seq.tenant, {}).setdefault(seq.lora_slot, []).append(seq)
        for claimant in claimants:
            if not self.lora_manager.waits_for_slot(claimant.lora.lora_name):
                continue
            # a tenant's one slot is never taken: with more tenants than slots, slots turn over
            # as requests end, and preempting single holders would only trade recomputes
            fair = max(1.0, self.lora_manager.num_slots / len(set(held) | {claimant.tenant}))
            victim = max((t for t in held if t != claimant.tenant), key=lambda t: len(held[t]), default=None)
            if victim is None or len(held[victim]) <= fair:
                continue
            slot, seqs = min(held[victim].items(), key=lambda item: len(item[1]))
            for seq in seqs:
                self.preempt(seq)
                out.num_preempted += 1
            for seq in (s for queue in self.waiting.values() for s in queue if s.lora_slot == slot):
                self._release_slot(seq)
            self.aged = [claimant, *(s for s in self.aged if s is not claimant)]
            self.num_slot_preemptions += 1
            return

    def _prefetch(self, out: SchedulerOutput) -> list[Sequence]:
        """Reserve the adapters of the first prefetch_window waiting sequences, in admission order
        but tenants holding fewer slots first (a freed slot goes to a tenant that waits, not to
        the flood that held it), one staged adapter per tenant, at most max_staged_adapters in
        all. Adapters of running sequences need no staging: their slots are resident. Returns
        the sequences it gave a slot."""
        _, blocked = self._reserve_aged(out)
        in_use = {seq.lora.lora_name for seq in self.running if seq.lora is not None}
        window = self._lookahead()
        held = self._slots_held(window)
        staged, staged_tenants, reserved = 0, set(), []
        for seq in sorted(window, key=lambda s: len(held.get(s.tenant, ()))):
            if seq.lora is None or seq.status is not SequenceStatus.WAITING:
                continue
            name, had_slot = seq.lora.lora_name, seq.lora_slot is not None
            new = name not in in_use
            full = self.max_staged_adapters is not None and staged >= self.max_staged_adapters
            if not had_slot and (blocked or (new and (full or seq.tenant in staged_tenants))):
                continue
            if self._adapter_state(seq, out) == "skip":
                continue
            if not had_slot and seq.lora_slot is not None:
                reserved.append(seq)
            if new:
                staged += 1
                staged_tenants.add(seq.tenant)
                in_use.add(name)
        return reserved

    def _slots_held(self, window: list[Sequence]) -> dict[str, set[int]]:
        """Per tenant, the slots its running sequences and the window's sequences reference."""
        held: dict[str, set[int]] = {}
        for seq in (*self.running, *window):
            if seq.lora_slot is not None:
                held.setdefault(seq.tenant, set()).add(seq.lora_slot)
        return held

    def _lookahead(self) -> list[Sequence]:
        """The first prefetch_window waiting sequences in admission order: every tenant's k-th
        before any tenant's (k+1)-th, tenants in round-robin order, FIFO within one. O(window)
        however deep the queues."""
        window, order = self.prefetch_window, []
        cursors = deque(iter(self.waiting[tenant]) for tenant in islice(self.tenant_order, window))
        while cursors and len(order) < window:
            cursor = cursors.popleft()
            seq = next(cursor, None)
            if seq is not None:
                order.append(seq)
                cursors.append(cursor)
        return order

    def _adapter_state(self, seq: Sequence, out: SchedulerOutput) -> str:
        if seq.lora is None:
            return "ok"
        try:
            if seq.lora_slot is None:
                seq.lora_slot = self.lora_manager.reserve(seq.lora.lora_name, seq.lora.lora_path)
                if seq.lora_slot is None:
                    return "loading"  # on its way into the host tier, or no slot free
            return "ok" if self.lora_manager.is_ready(seq.lora_slot) else "loading"
        except AdapterLoadError as exc:
            seq.error = exc
            self.finish(seq, "abort")
            out.failed.append(seq)
            return "skip"

    def _served(self, tenant: str) -> None:
        self.tenant_order.remove(tenant)
        if self.waiting[tenant]:
            self.tenant_order.append(tenant)
        else:
            del self.waiting[tenant]

    def preempt(self, seq: Sequence) -> None:
        """Free seq's KV blocks and slot; it re-enters the front of the queue to be recomputed."""
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        self._release_slot(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.add(seq, front=True)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting.get(seq.tenant, ()):
            self.waiting[seq.tenant].remove(seq)
            if not self.waiting[seq.tenant]:
                del self.waiting[seq.tenant]
                self.tenant_order.remove(seq.tenant)
            self.enqueued_step.pop(seq.seq_id, None)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.block_manager.deallocate(seq)
        self._release_slot(seq)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.lora_manager.release(seq.lora_slot)
            seq.lora_slot = None
