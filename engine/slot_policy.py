"""SlotPolicy: which waiting sequences get an adapter slot, and when one is drained for them.

Adapter pressure, the rules:
- one adapter load in flight per tenant, so a flood of one tenant's adapters cannot take
  every slot;
- prefetch: each step, before admission, the first `prefetch_window` waiting sequences in
  admission order reserve their adapters (LoRAManager.reserve starts the host load, and
  takes a free slot once the adapter is in the host tier), so an adapter loads while its
  request queues behind a full batch. Tenants holding fewer slots go first (a slot that
  frees goes to a tenant that waits, not back to the flood that held it); per tenant, one
  waiting sequence at a time may hold or load an adapter no running sequence uses; no more
  distinct adapters than the host tier holds, by count (`max_staged_adapters`) and by bytes,
  are staged, so prefetched loads do not evict each other from it. A slot that a running sequence
  references is never evicted (the manager evicts unreferenced slots only);
- aging: a tenant's queue head with an adapter that has waited `max_adapter_wait_steps`
  steps is visited first (one per tenant, in the order they became their tenant's head), and
  while such a sequence waits for a slot (its adapter in the host tier, no slot or heap room to
  be had) nobody else takes a reference to an unreferenced adapter or to the referenced slots
  whose draining makes its room (chosen by a trial placement, slots no waiting request holds
  first, then the soonest done: LoRAManager.drain_for), and a seat is left to it, so the room
  that frees is its own; other referenced slots keep taking requests; while its adapter still
  loads into the host tier it
  holds others back only if its tenant is under its fair share and no slot is free (the slots
  then drain during the load);
- slot-fair preemption: when a queue head has waited `slot_reclaim_steps` steps (or aged)
  for a slot, every slot is held, and one tenant holds more than its fair share (slots /
  tenants that want one, and never less than one slot), that tenant's adapter with the fewest running sequences is
  preempted (recompute) so its slot drains for the waiting one: long requests over many
  adapters cannot keep another tenant out until they finish. The wait is short (a few
  steps), since a tenant under its share loses nothing to a flood only if it gets a slot
  about as fast as a free one would load; the freed slot goes to it because the prefetch
  serves tenants holding fewer slots first.

- keeping a small tenant's adapter: an adapter a tenant under its fair share ran within the
  last `keep_steps` steps is not evicted for a tenant at or over its share, though no sequence
  references it between that tenant's requests. Without it, a tenant sending one short request
  after another lost its adapter to the flood each time, and each request waited for a slot to
  drain and a load (17-21 steps against 8 alone on the H200: bench_slot_hog.py).

The prefetch is triggered here, not in LoRAManager: only the scheduler's queues know the
admission order, the tenants and the aging, and a prefetch is an ordinary `reserve` taken on the
waiting sequence's behalf, so the slot is reference counted (never evicted before its
request runs, released if the request is aborted) and the manager stays a cache with no
second path into its slots. The loads still run on the manager's loader and copy threads:
the step only asks, it never waits on them.
"""
from __future__ import annotations

import logging
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

from engine.errors import AdapterLoadError
from engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from engine.scheduler import Scheduler, SchedulerOutput


log = logging.getLogger(__name__)
WAIT_LOG_PERIOD_S = 1.0  # at most one "waited N steps for adapter" line a second
KEEP_STEPS = 64  # steps a small tenant's adapter stays kept after it last ran (~1.5 s at 48 layers)


class SlotPolicy:
    """The adapter-slot side of a Scheduler (`sched`): reads its queues, preempts through it."""

    def __init__(self, sched: Scheduler, lora_manager, prefetch_window: int, max_adapter_wait_steps: int | None,
                 max_staged_adapters: int | None, slot_reclaim_steps: int | None, keep_steps: int = KEEP_STEPS):
        self.sched, self.lora_manager = sched, lora_manager
        self.keep_steps = keep_steps
        self.last_ran: dict[str, tuple[str, int]] = {}  # adapter -> (tenant, step) of its last run
        # (step, each tenant at its share -> the adapters kept from it): _at_share
        self._keep: tuple[int, dict[str, frozenset[str]]] = (-1, {})
        self._drains: tuple[int, dict[int, set[int]]] = (-1, {})  # (step, blocking seq_id -> slots it waits on)
        self._draining: dict[int, set[int]] = {}  # the same across steps, while those sequences are aged
        self._headed: dict[int, int] = {}  # seq_id -> the step it became its tenant's queue head
        self.prefetch_window = prefetch_window
        self.max_adapter_wait_steps, self.max_staged_adapters = max_adapter_wait_steps, max_staged_adapters
        self.slot_reclaim_steps = slot_reclaim_steps
        self.aged: list[Sequence] = []  # this step's sequences with first claim on a slot
        # from reserve_aged: the aged sequence that blocks new references (the first one without a
        # slot, waiting for device room), and whether an aged one wants a seat soon (it blocks, or
        # its slot's copy is in flight): the scheduler then leaves one seat to it
        self.blocker: Sequence | None = None
        self.seat_wanted = False
        self.ready_spare = 0  # the seat the ready aged sequence leaves to one before it that wants one
        self.num_slot_preemptions = 0  # slots drained for a waiting tenant (_reclaim)
        self.num_prefetched = 0  # slots the prefetch reserved for sequences a step before admission
        self._wait_logged_at, self._waits_unlogged = float("-inf"), 0

    def begin_step(self, out: SchedulerOutput) -> None:
        """Before the step's scheduling: take finished loads, find the aged heads, and drain a
        slot for one of them if a tenant out-holds it (slot-fair preemption)."""
        self.lora_manager.collect_loads()
        self.lora_manager.begin_step()
        step = self.sched.num_steps
        for seq in self.sched.running:
            if seq.lora is not None:
                self.last_ran[seq.lora.lora_name] = (seq.tenant, step)
        self.aged = self._aged_heads()
        if self._draining:
            aged = {seq.seq_id for seq in self.aged}
            self._draining = {k: v for k, v in self._draining.items() if k in aged}
        self._reclaim(out)
        for seq in self.aged:  # after _reclaim: the line reads the kept adapters as this step's admission will
            if not seq.adapter_wait_logged and seq.adapter_ready is None:
                seq.adapter_wait_logged = True
                self._log_wait(seq, step)

    def _log_wait(self, seq: Sequence, step: int) -> None:
        """A line for a request aged waiting for its adapter, at most one a second (under adapter
        pressure most requests age: the others are counted into the next line)."""
        now = self.sched.clock()
        if now - self._wait_logged_at < WAIT_LOG_PERIOD_S:
            self._waits_unlogged += 1
            return
        more = f" ({self._waits_unlogged} more aged since the last such line)" if self._waits_unlogged else ""
        self._wait_logged_at, self._waits_unlogged = now, 0
        log.warning("request %s has waited %d steps for adapter %s%s: %s", seq.request_id,
                    step - self._enqueued(seq), seq.lora.lora_name, more, self.describe_wait(seq))

    def describe_wait(self, seq: Sequence) -> str:
        """What `seq`'s adapter waits for, in one line: the manager's view of it and of each slot
        (with the running sequences on it), and the adapters kept from its tenant."""
        running: dict[int, int] = {}
        for s in self.sched.running:
            if s.lora_slot is not None:
                running[s.lora_slot] = running.get(s.lora_slot, 0) + 1
        return (f"{self.lora_manager.describe(seq.lora.lora_name, seq.lora_slot, running)}; kept from its "
                f"tenant: {sorted(self._kept_from(seq.tenant))}")

    def passes_block(self, seq: Sequence) -> bool:
        """Whether `seq` may take a reference to its adapter while an aged sequence without a slot
        blocks new references (reserve_aged): when the adapter is resident and, for every blocking
        sequence, either kept from its tenant (which could not have its slot anyway) or in a slot
        it does not wait on: referenced already and, for the first of them (`blocker`, whose room
        is made first), not among the slots chosen to drain for it (`_drain_for`). A busy
        adapter's slot then goes on taking requests while the slots that make the room drain,
        instead of every slot, and the batch with them, draining for one request."""
        name = seq.lora.lora_name
        slot = self.lora_manager.slot_of(name)
        if slot is None:
            return False
        if self.lora_manager.is_referenced(slot):
            return self.blocker is None or slot not in self._drain_for(self.blocker)
        return all(name in self._kept_from(a.tenant) for a in self.aged
                   if a.status is SequenceStatus.WAITING and a.lora_slot is None and self._blocks(a))

    def _drain_for(self, seq: Sequence) -> set[int]:
        """The slots blocking `seq` waits on (LoRAManager.drain_for), chosen once a step and kept
        from step to step while it blocks, so that the slots it chose go on draining; not those
        that aged sequences ahead of it hold (they run next). Waiting sequences holding a
        reference to one of them (the prefetch's) let it go: they would keep it from draining
        until they ran."""
        step = self.sched.num_steps
        if self._drains[0] != step:
            self._drains = (step, {})
        drains = self._drains[1]
        if seq.seq_id not in drains:
            # slot -> (waiting sequences holding it, decode steps its longest running one may still
            # take): a slot that waiting requests hold is drained last (drained, its adapter is
            # evicted from under them), then the soonest done
            remaining: dict[int, int] = {}
            for s in self.sched.running:
                if s.lora_slot is not None:
                    left = s.params.max_tokens - len(s.output_token_ids)
                    remaining[s.lora_slot] = max(remaining.get(s.lora_slot, 0), left)
            waiting: dict[int, int] = {}
            for s in self.sched.holders.values():
                if s.lora_slot is not None:
                    waiting[s.lora_slot] = waiting.get(s.lora_slot, 0) + 1
            rank = {slot: (waiting.get(slot, 0), remaining.get(slot, 0)) for slot in {*remaining, *waiting}}
            before = self.aged[:self.aged.index(seq)] if seq in self.aged else []
            ahead = {a.lora_slot for a in before if a.lora_slot is not None and a.status is SequenceStatus.WAITING}
            drain = self.lora_manager.drain_for(seq.lora.lora_name, rank, self._kept_from(seq.tenant),
                                                self._draining.get(seq.seq_id, ()), ahead)
            drains[seq.seq_id] = self._draining[seq.seq_id] = drain
            for holder in [h for h in self.sched.holders.values() if h.lora_slot in drain]:
                self.sched.release_slot(holder)
        return drains[seq.seq_id]

    def _blocks(self, seq: Sequence) -> bool:
        """Whether aged `seq`, without a slot, holds back new slot references. It does while it
        waits for a slot (its adapter in the host tier). While its adapter still loads into the
        host tier it does only if its tenant is under its fair share and no slot is free: then the
        slots drain during the load and one is there when it lands. Otherwise blocking would only
        keep every other tenant off its own resident adapter for the whole load (a flood's aged
        requests did, ~1 s a request for the victim of bench_floods' slot_hog on the H200)."""
        if self.lora_manager.in_host_tier(seq.lora.lora_name):
            return True
        return seq.tenant not in self._at_share() and not self.lora_manager.has_free_slot()

    def _kept_from(self, tenant: str) -> frozenset[str]:
        """Adapters `tenant` may not evict: those that tenants under their fair share of the slots
        ran within keep_steps steps, when `tenant` holds its share or more (module docstring)."""
        return self._at_share().get(tenant, frozenset())

    def _at_share(self) -> dict[str, frozenset[str]]:
        """This step's tenants at or over their fair share of the slots, each with the adapters
        kept from it. Fair share as _reclaim's, over the tenants that hold or wait for a slot or
        ran lately."""
        step = self.sched.num_steps
        if self._keep[0] != step:
            since = step - self.keep_steps
            for name in [n for n, (_, last) in self.last_ran.items() if last < since]:
                del self.last_ran[name]
            held = self._slots_held([s for q in self.sched.waiting.values() for s in q])
            wanting = set(held) | {t for t, _ in self.last_ran.values()} | {
                t for t, q in self.sched.waiting.items() if any(s.lora is not None for s in q)}
            fair = max(1.0, self.lora_manager.num_slots / max(1, len(wanting)))
            small = {t for t in wanting if len(held.get(t, ())) < fair}
            kept = {name: t for name, (t, _) in self.last_ran.items() if t in small}
            self._keep = (step, {t: frozenset(n for n, owner in kept.items() if owner != t)
                                 for t in wanting if len(held.get(t, ())) >= fair})
        return self._keep[1]

    def end_step(self, prefetched: list[Sequence]) -> None:
        """After admission: count the prefetched sequences still waiting, whose slots the
        prefetch reserved a step (or more) before they run."""
        self.num_prefetched += sum(seq.status is SequenceStatus.WAITING for seq in prefetched)

    def _aged_heads(self) -> list[Sequence]:
        """Tenants' queue heads with an adapter that have waited max_adapter_wait_steps steps or
        more, the longest at its tenant's head first. One per tenant, so aging cannot hand one
        tenant's flood every slot."""
        return self._heads_waited(self.max_adapter_wait_steps)

    def _heads_waited(self, steps: int | None) -> list[Sequence]:
        """Tenants' queue heads with an adapter that have waited `steps` steps or more (since they
        were queued), in the order they became their tenant's head (none when `steps` is None).
        That order, not the queueing order, is what keeps a tenant's many old requests from each
        going first in turn: its next head is as old as the last, but heads the queue only now."""
        if steps is None:
            return []
        since, step = self.sched.num_steps - steps, self.sched.num_steps
        heads = [self.sched.waiting[tenant][0] for tenant in self.sched.tenant_order]
        headed, enqueued = self._headed, self.sched.enqueued_step
        for seq in heads:
            if headed.get(seq.seq_id, -1) < enqueued.get(seq.seq_id, step):  # new, or queued again since
                headed[seq.seq_id] = step
        if len(headed) > 2 * len(enqueued) + 64:  # sequences no longer waiting
            self._headed = headed = {k: v for k, v in headed.items() if k in enqueued}
        return sorted((seq for seq in heads if seq.lora is not None and self._enqueued(seq) <= since),
                      key=lambda seq: (headed[seq.seq_id], self._enqueued(seq)))

    def _enqueued(self, seq: Sequence) -> int:
        return self.sched.enqueued_step.get(seq.seq_id, self.sched.num_steps)

    def reserve_aged(self, out: SchedulerOutput) -> tuple[Sequence | None, bool]:
        """Reserve the aged sequences' adapters, in their order, until one finds no slot. Returns
        the first whose slot is ready, and whether one found no slot and blocks (`_blocks`): it is
        then `blocker`, and nobody behind it takes a reference that would keep its room from
        freeing (passes_block: not to an idle adapter, nor to a slot chosen to drain for it), so
        the room that frees is its own. Also sets `seat_wanted` and `ready_spare` (a seat left)."""
        ready, self.blocker, self.seat_wanted, self.ready_spare = None, None, False, 0
        for seq in [s for s in self.aged if s.status is SequenceStatus.WAITING]:
            state = self.adapter_state(seq, out)
            if state == "loading" and seq.lora_slot is None:
                blocks = self._blocks(seq)
                self.blocker = seq if blocks else None
                self.seat_wanted |= blocks
                if blocks:
                    self._drain_for(seq)  # now, not when a rider asks: its holders let go of those slots
                return ready, blocks
            if state == "ok" and ready is None:
                ready, self.ready_spare = seq, int(self.seat_wanted)  # a seat for those before it
            self.seat_wanted |= state == "loading"  # its slot's copy in flight: it runs soon
        return ready, False

    def _reclaim(self, out: SchedulerOutput) -> None:
        """Slot-fair preemption (see the module docstring) for the first sequence without a slot,
        aged ones then slot_reclaim_steps-old queue heads, in that order, whose tenant some other
        tenant out-holds beyond its fair share: preempts the running sequences of that tenant's
        adapter with the fewest, drops waiting reservations of its slot, and gives the claimant
        first claim (`self.aged`) on the slot that frees."""
        aged = [s for s in self.aged if s.status is SequenceStatus.WAITING and s.lora_slot is None]
        claimants = [*aged, *(s for s in self._heads_waited(self.slot_reclaim_steps)
                              if s.lora_slot is None and s not in aged)]
        if not claimants:
            return
        held: dict[str, dict[int, list[Sequence]]] = {}  # tenant -> slot -> its running sequences
        for seq in self.sched.running:
            if seq.lora_slot is not None:
                held.setdefault(seq.tenant, {}).setdefault(seq.lora_slot, []).append(seq)
        ranked = sorted(held, key=lambda t: -len(held[t]))  # the most slots first
        for claimant in claimants:
            # a tenant's one slot is never taken: with more tenants than slots, slots turn over
            # as requests end, and preempting single holders would only trade recomputes
            fair = max(1.0, self.lora_manager.num_slots / (len(held) + (claimant.tenant not in held)))
            victim = next((t for t in ranked[:2] if t != claimant.tenant), None)
            if victim is None or len(held[victim]) <= fair:
                continue
            if not self.lora_manager.waits_for_slot(claimant.lora.lora_name):  # after the cheap checks
                continue
            slot, seqs = min(held[victim].items(), key=lambda item: len(item[1]))
            for seq in seqs:
                self.sched.preempt(seq)
                out.num_preempted += 1
            for seq in (s for queue in self.sched.waiting.values() for s in queue if s.lora_slot == slot):
                self.sched.release_slot(seq)
            self.aged = [claimant, *(s for s in self.aged if s is not claimant)]
            self.num_slot_preemptions += 1
            self._keep = (-1, {})  # the slots held changed: who is at its share, too
            return

    def release_waiting(self) -> bool:
        """Drop the slot references waiting sequences hold (the prefetch's), when the adapter heap
        holds KV blocks it borrowed: a running sequence short of blocks comes before a waiting
        one's adapter, which the heap may then evict or move to give blocks back (the prefetch
        reserves again next step). Returns whether any were dropped (then try again first)."""
        if self.lora_manager is None or not self.sched.block_manager.lent:
            return False
        holders = list(self.sched.holders.values())  # every waiting sequence with a slot reference
        for seq in holders:
            self.sched.release_slot(seq)
        return bool(holders)

    def prefetch(self, out: SchedulerOutput) -> list[Sequence]:
        """Reserve the adapters of the first prefetch_window waiting sequences, in admission order
        but tenants holding fewer slots first (a freed slot goes to a tenant that waits, not to
        the flood that held it) and, among those, sequences whose adapter is resident first; one
        staged adapter per tenant, at most max_staged_adapters in all and no more than the host
        tier's bytes hold (`host_cost_of`: staged loads past them drop each other from the tier
        before their turn and load again: 257 host loads for 40 adapters over a tier of two
        large images); resident ones stage nothing. Adapters of running sequences need no
        staging: their slots are resident. Returns the sequences it gave a slot (none without
        adapters or with a window of 0)."""
        if self.lora_manager is None or self.prefetch_window == 0:
            return []
        _, blocked = self.reserve_aged(out)
        in_use = {seq.lora.lora_name for seq in self.sched.running if seq.lora is not None}
        window = self._lookahead()
        held = self._slots_held(window)
        staged, staged_tenants, reserved = 0, set(), []
        staged_bytes, host_bytes = 0, self.lora_manager.host_bytes
        resident = self.lora_manager.holds
        # among tenants holding as few slots, sequences whose adapter is resident go first: their
        # reference keeps it from being evicted for a load that a later one would undo (64
        # adapters over 38 resident, all waiting: LRU order evicted each just before its turn)
        order = sorted(window, key=lambda s: (len(held.get(s.tenant, ())),
                                              s.lora is None or not resident(s.lora.lora_name)))
        for seq in order:
            if seq.lora is None or seq.status is not SequenceStatus.WAITING:
                continue
            name, had_slot = seq.lora.lora_name, seq.lora_slot is not None
            new = name not in in_use and not resident(name)  # a resident adapter stages nothing
            cost = self.lora_manager.host_cost_of(name) if new and host_bytes is not None else 0
            full = ((self.max_staged_adapters is not None and staged >= self.max_staged_adapters)
                    or (staged > 0 and host_bytes is not None and staged_bytes + cost > host_bytes))
            if not had_slot and ((blocked and not self.passes_block(seq)) or
                                 (new and (full or seq.tenant in staged_tenants))):
                continue
            if self.adapter_state(seq, out) == "skip":
                continue
            if not had_slot and seq.lora_slot is not None:
                reserved.append(seq)
            if new:
                staged += 1
                staged_bytes += cost
                staged_tenants.add(seq.tenant)
                in_use.add(name)
        return reserved

    def _slots_held(self, window: list[Sequence]) -> dict[str, set[int]]:
        """Per tenant, the slots its running sequences and the window's sequences reference."""
        held: dict[str, set[int]] = {}
        for seq in (*self.sched.running, *window):
            if seq.lora_slot is not None:
                held.setdefault(seq.tenant, set()).add(seq.lora_slot)
        return held

    def _lookahead(self) -> list[Sequence]:
        """The first prefetch_window waiting sequences in admission order: every tenant's k-th
        before any tenant's (k+1)-th, tenants in round-robin order, FIFO within one. O(window)
        however deep the queues."""
        window, order = self.prefetch_window, []
        cursors = deque(iter(self.sched.waiting[tenant]) for tenant in islice(self.sched.tenant_order, window))
        while cursors and len(order) < window:
            cursor = cursors.popleft()
            seq = next(cursor, None)
            if seq is not None:
                order.append(seq)
                cursors.append(cursor)
        return order

    def adapter_state(self, seq: Sequence, out: SchedulerOutput) -> str:
        if seq.lora is None:
            return "ok"
        try:
            if seq.lora_slot is None:
                # its KV blocks are kept from the heap before the reservation, which may borrow
                self.sched.keep_blocks_for(seq)
                seq.lora_slot = self.lora_manager.reserve(seq.lora.lora_name, seq.lora.lora_path,
                                                          self._kept_from(seq.tenant))
                if seq.lora_slot is None:
                    self.sched.release_slot(seq)  # holds nothing: its blocks may be lent again
                    return "loading"  # on its way into the host tier, or no slot free
            if not self.lora_manager.is_ready(seq.lora_slot):
                return "loading"
            if seq.adapter_ready is None:
                seq.adapter_ready = self.sched.clock()
            # as it is admitted, not only while it runs: a one-step request must count too
            self.last_ran[seq.lora.lora_name] = (seq.tenant, self.sched.num_steps)
            return "ok"
        except AdapterLoadError as exc:
            seq.error = exc
            self.sched.finish(seq, "abort")
            out.failed.append(seq)
            return "skip"
