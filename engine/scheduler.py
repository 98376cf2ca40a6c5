"""Scheduler: continuous batching with chunked prefill, preemption by recompute, LoRA slots
and round-robin fairness between tenants. Plain Python: no torch here.

Each step spends a token budget: running sequences first (decodes, then the rest of
chunked prefills), then waiting sequences in admission order: round-robin over tenants,
FIFO within a tenant, behind the sequences that waited too long for an adapter slot
(aging: engine.slot_policy). A waiting sequence is admitted only when its adapter holds a ready slot
and its KV blocks fit.

With prefix caching (engine.prefix_cache) a waiting sequence whose next uncached block another
sequence of the step fills is left for the next step, where it finds that block cached: a burst
of requests with one system prompt, or the n choices of one prompt on one replica, computes it
once. The first such sequence of a tenant keeps its seat and the blocks it would take from the
sequences behind it.

Adapter pressure (one load in flight per tenant, prefetch, aging, slot-fair preemption) is
the slot policy's (engine.slot_policy): the scheduler asks it, before admission, to reserve
and reclaim slots, and which waiting sequences hold a ready one.

With async scheduling the engine schedules step n+1 while step n runs: a sequence that step n
samples counts that token as pending (Sequence.num_pending) and decodes it next, its id fed
on the device; one whose pending token is its last is left out.
"""
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus
from engine.slot_policy import SlotPolicy


LATER = object()  # _take: the sequence waits for a block this step fills (prefix caching)


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
                 slot_reclaim_steps: int | None = None, clock: Callable[[], float] = time.perf_counter):
        """prefetch_window: waiting sequences whose adapters are reserved ahead (None: 2 x
        max_num_seqs, 0: none); max_adapter_wait_steps: steps before a queue head with an
        adapter gets first claim on a slot (None: no aging); max_staged_adapters: distinct
        adapters the prefetch keeps staged for waiting sequences (the host tier's count; None:
        no bound); slot_reclaim_steps: steps a queue head waits for a slot, while another tenant
        holds more than its fair share of them, before one of that tenant's slots is drained for
        it (None: only for aged heads); clock: the time Sequence.arrival counts in, for
        Sequence.adapter_ready."""
        self.max_num_seqs, self.max_num_batched_tokens, self.clock = max_num_seqs, max_num_batched_tokens, clock
        self.max_model_len = max_model_len or float("inf")
        self.block_manager, self.lora_manager = block_manager, lora_manager
        window = 2 * max_num_seqs if prefetch_window is None else prefetch_window
        self.slots = SlotPolicy(self, lora_manager, window, max_adapter_wait_steps, max_staged_adapters,
                                slot_reclaim_steps)
        self.waiting: dict[str, deque[Sequence]] = {}
        self.tenant_order: deque[str] = deque()
        self.running: list[Sequence] = []
        self.num_steps = 0
        self.enqueued_step: dict[int, int] = {}  # seq_id -> the step count when it (re)entered the queue
        self._filled: set[tuple] = set()  # prefix-cache keys of the blocks this step's sequences fill first
        # the sequences left for the next step that way (LATER); the first of each tenant keeps a
        # seat and the KV blocks it would take now for the rest of the step's admissions
        self._later: set[int] = set()
        self._kept_for: set[str] = set()
        self._later_blocks = 0
        # waiting sequences holding an adapter slot reference (the prefetch's, an aged one's), in
        # the order they took it, and those of them, as many as seats are free, whose KV blocks
        # the heap may not borrow (`keep_blocks_for`)
        self.holders: dict[int, Sequence] = {}
        self._kept_blocks_of: set[int] = set()

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
        if seq.added_time is None:
            seq.added_time = self.clock()

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.num_steps += 1
        self._filled.clear()
        self._later.clear()
        self._kept_for.clear()
        self._later_blocks = 0
        self._kept_blocks_of = set(islice(self.holders, max(0, self.max_num_seqs - len(self.running))))
        self.block_manager.growth_blocks = (sum(self._growth(seq) for seq in self.running)
                                            + sum(self._growth(self.holders[i]) for i in self._kept_blocks_of))
        if self.lora_manager is not None:
            self.slots.begin_step(out)
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        prefetched = self.slots.prefetch(out)
        if out.num_preempted == 0:  # after the prefetch: slots go to the waiting in its order
            self._admit_waiting(out, budget)
        self.slots.end_step(prefetched)
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
                if self.slots.release_waiting():  # their adapters may hold KV blocks the heap borrowed
                    continue
                victim = self.running[-1]
                self.preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, n)
                self._fills(seq, n)
                out.scheduled.append((seq, n))
                budget -= n
        return budget

    def _fills(self, seq: Sequence, n: int) -> None:
        if self.block_manager.cache is not None and (key := self.block_manager.cache.filled_key(seq, n)):
            self._filled.add(key)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while budget > 0 and len(self.running) + len(self._kept_for) < self.max_num_seqs and self.tenant_order:
            admitted = self._next_admissible(budget, out)
            if admitted is None:
                return
            seq, prefix = admitted
            n = min(seq.num_uncomputed_tokens - len(prefix) * self.block_manager.block_size, budget)
            first = seq.scheduled_time is None
            self.block_manager.allocate(seq, n, prefix)
            if first:
                seq.num_cached_tokens = seq.num_computed_tokens
            self._fills(seq, n)
            self.block_manager.growth_blocks += self._growth(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

    def _growth(self, seq: Sequence) -> int:
        """KV blocks seq may still take: up to its prompt plus max_tokens (within max_model_len)."""
        longest = min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)
        return max(0, -(-longest // self.block_manager.block_size) - len(seq.block_table))

    def _next_admissible(self, budget: int, out: SchedulerOutput) -> tuple[Sequence, list[int]] | None:
        """The first admissible sequence and its cached prefix's blocks: aged ones first, then
        round-robin tenant order (FIFO within a tenant)."""
        ready, blocked = self.slots.reserve_aged(out)
        if ready is not None and (taken := self._take(ready, budget, self.slots.ready_spare)) is not LATER:
            return taken
        for tenant in list(self.tenant_order):
            # one adapter load in flight per tenant: a flood cannot take every slot
            pending = False
            for seq in list(self.waiting[tenant]):
                if seq.lora is not None and seq.lora_slot is None and (
                        pending or (blocked and not self.slots.passes_block(seq))):
                    continue
                state = self.slots.adapter_state(seq, out)
                pending |= state == "loading"
                # a seat is left for an aged sequence about to run: requests riding resident
                # adapters past its block (SlotPolicy.passes_block) would otherwise take them all
                if state == "ok" and (taken := self._take(seq, budget, int(self.slots.seat_wanted))) is not LATER:
                    return taken
        return None

    def _take(self, seq: Sequence, budget: int, spare_seats: int = 0) -> tuple[Sequence, list[int]] | None | object:
        """Remove `seq` from its queue for admission, with the blocks of its cached prefix
        (engine.prefix_cache); None when its KV blocks do not fit, or no seat is left but
        `spare_seats`; LATER when a sequence of this step fills its next block (it finds it cached
        next step)."""
        if seq.seq_id in self._later:
            return LATER
        blocks = self.block_manager
        prefix = blocks.cached_prefix(seq)
        n = min(seq.num_uncomputed_tokens - len(prefix) * blocks.block_size, budget)
        if self._filled and blocks.cache.next_key(seq, prefix) in self._filled:
            self._later.add(seq.seq_id)
            # the first of its tenant keeps a free seat and (about) its blocks: those behind it
            # take what is left, and a tenant's many riders do not hold every seat
            if seq.tenant not in self._kept_for and len(self.running) + len(self._kept_for) < self.max_num_seqs:
                self._kept_for.add(seq.tenant)
                self._later_blocks += blocks.free_needed(seq, n, prefix)
            return LATER
        if len(self.running) + len(self._kept_for) + spare_seats >= self.max_num_seqs:
            return None  # the seats left are kept for sequences left for the next step, or an aged one
        if not blocks.can_allocate(seq, n, prefix, spare=self._later_blocks):
            return None  # KV is full: admit nobody rather than starve long prompts
        self._drop_holder(seq)  # its growth counts again as it runs (_admit_waiting)
        self.waiting[seq.tenant].remove(seq)
        self.enqueued_step.pop(seq.seq_id, None)
        self._served(seq.tenant)
        return seq, prefix

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
        self.release_slot(seq)
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
        self.release_slot(seq)

    # ---- request state from the steps ---------------------------------------------
    def launched(self, out: SchedulerOutput, samples: list[bool]) -> None:
        """`out`'s step is on the device: its tokens' KV counts as written, and each sequence it
        samples has a token pending (the next step may decode it before it is read back)."""
        now = None
        for (seq, n), sampled in zip(out.scheduled, samples):
            seq.num_computed_tokens += n
            seq.num_pending += sampled
            self.block_manager.cache_computed(seq)
            if seq.scheduled_time is None:
                seq.scheduled_time = now = now or self.clock()

    def update_from_output(self, out: SchedulerOutput, token_ids: list[int | None],
                           now: float) -> list[tuple[Sequence, int]]:
        """Append the step's sampled tokens to their sequences; returns (sequence, token) of each
        appended. A sequence that finished while the step ran (stop, abort) takes none."""
        appended = []
        for (seq, _), token in zip(out.scheduled, token_ids):
            if token is None or seq.is_finished:
                continue
            seq.num_pending -= 1
            seq.first_token_time = seq.first_token_time or now
            seq.output_token_ids.append(token)
            appended.append((seq, token))
        return appended

    def keep_blocks_for(self, seq: Sequence) -> None:
        """seq (waiting) is about to take a slot reference: while a seat is free for it, the heap
        borrows none of the KV blocks it will take. Its adapter is then held for it, so blocks
        lent anyway could come back only as other waiting sequences' adapters are let go
        (release_waiting), evicted and loaded again: in case d's first wave, reservations that
        borrowed the KV of the sequences reserved before them kept those from starting for ~0.4 s
        after their adapters landed (sim_workload.py --case-d). Holders past the free seats
        cannot all run next, so their blocks stay lendable (the trace's prefetch window is twice
        the batch)."""
        if seq.seq_id in self.holders:
            return
        self.holders[seq.seq_id] = seq
        if len(self._kept_blocks_of) < self.max_num_seqs - len(self.running):
            self._kept_blocks_of.add(seq.seq_id)
            self.block_manager.growth_blocks += self._growth(seq)

    def _drop_holder(self, seq: Sequence) -> None:
        if self.holders.pop(seq.seq_id, None) is not None and seq.seq_id in self._kept_blocks_of:
            self._kept_blocks_of.discard(seq.seq_id)
            self.block_manager.growth_blocks -= self._growth(seq)

    def release_slot(self, seq: Sequence) -> None:
        self._drop_holder(seq)
        if seq.lora_slot is not None:
            self.lora_manager.release(seq.lora_slot)
            seq.lora_slot = None
