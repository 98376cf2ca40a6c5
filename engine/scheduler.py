"""Scheduler: continuous batching with chunked prefill, preemption by recompute, LoRA slots
and round-robin fairness between tenants. Plain Python: no torch here.

Each step spends a token budget: running sequences first (decodes, then the rest of
chunked prefills), then waiting sequences in round-robin order over tenants. A waiting
sequence is admitted only when its adapter holds a ready slot and its KV blocks fit.

With async scheduling the engine schedules step n+1 while step n runs: a sequence that step n
samples counts that token as pending (Sequence.num_pending) and decodes it next, its id fed
on the device; one whose pending token is its last is left out.
"""
from collections import deque
from dataclasses import dataclass, field

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
                 lora_manager=None, max_model_len: int | None = None):
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len or float("inf")
        self.block_manager, self.lora_manager = block_manager, lora_manager
        self.waiting: dict[str, deque[Sequence]] = {}
        self.tenant_order: deque[str] = deque()
        self.running: list[Sequence] = []

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

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.lora_manager is not None:
            self.lora_manager.collect_loads()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if out.num_preempted == 0:
            self._admit_waiting(out, budget)
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
        """The first admissible sequence in round-robin tenant order (FIFO within a tenant)."""
        for tenant in list(self.tenant_order):
            queue = self.waiting[tenant]
            pending = False  # one adapter load in flight per tenant: a flood cannot take every slot
            for seq in list(queue):
                if pending and seq.lora is not None and seq.lora_slot is None:
                    continue
                state = self._adapter_state(seq, out)
                pending |= state == "loading"
                if state != "ok":
                    continue
                if not self.block_manager.can_allocate(seq, min(seq.num_uncomputed_tokens, budget)):
                    return None  # KV is full: admit nobody rather than starve long prompts
                queue.remove(seq)
                self._served(tenant)
                return seq
        return None

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
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.block_manager.deallocate(seq)
        self._release_slot(seq)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.lora_manager.release(seq.lora_slot)
            seq.lora_slot = None
