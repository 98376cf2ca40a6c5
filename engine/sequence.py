"""Sequence: one request's tokens and bookkeeping, plain Python (no torch)."""
from dataclasses import dataclass, field
from enum import Enum, auto

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class LoRARequest:
    lora_name: str  # unique per adapter version, e.g. "tenantA/ad1@v1"
    lora_path: str  # local directory with adapter_config.json + adapter_model.safetensors

    def __post_init__(self):
        if not self.lora_name or not self.lora_path:
            raise InvalidRequestError("LoRARequest needs a non-empty lora_name and lora_path")

    @property
    def owner(self) -> str:
        """The adapter's owner (`owner/name@version`; the whole name when it has no owner part).
        A request's tenant may differ: an operator's shared adapter serves every tenant."""
        return self.lora_name.split("/", 1)[0] if "/" in self.lora_name else self.lora_name


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True, eq=False)  # identity: the scheduler's list look-ups must not compare every field
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: LoRARequest | None = None
    tenant: str = ""
    arrival: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or is being written by a launched step)
    num_pending: int = 0  # tokens sampled by launched steps whose ids the host has not read back yet
    block_table: list[int] = field(default_factory=list)
    lora_slot: int | None = None  # held slot (a reference in the LoRA manager)
    # prefix caching (engine.prefix_cache): leading blocks of block_table that are cached, the
    # content id of the last of them, and the prompt tokens found cached at its first admission
    num_cached_blocks: int = 0
    prefix_parent: int | None = None
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: prompt positions whose entries a launched step computes (a
    # recompute after preemption skips them), and the entries read back so far, position 1 on
    prompt_logprobs_launched: int = 0
    prompt_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    adapter_ready: float | None = None  # when the scheduler first found its adapter in a ready slot
    added_time: float | None = None  # when the engine took it (after arrival: the core's queue of messages)
    scheduled_time: float | None = None  # when a step first launched it
    adapter_wait_logged: bool = False  # its long wait for an adapter was logged (engine.slot_policy)
    # SamplingParams.structured: its GrammarMatcher, made in the engine's process (not pickled)
    grammar: object = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens the scheduler plans with: known ones plus pending ones."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids of positions [start, end); a pending position reads 0 (its runner feeds the
        sampled id from the device)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        # sliced apart, not prompt + output: every decode step asks, and a long sequence's copy
        # of both would cost the step's host time
        known = self.prompt_token_ids[start:] if start < n else []
        known += self.output_token_ids[max(start - n, 0):end - n]
        return known + [0] * (end - start - len(known))

    def last_token_is_pending_and_final(self, max_model_len: int) -> bool:
        """A launched step samples this sequence's last token: scheduling it again is wasted."""
        return self.num_pending > 0 and (len(self.output_token_ids) + self.num_pending >= self.params.max_tokens
                                         or self.num_tokens >= max_model_len)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def timings(self) -> dict[str, float]:
        """Seconds by phase from arrival (the Sequence built, where the request came in) to the first
        token, for those phases that happened: `handoff` until the engine took it, `queue` until a
        step first launched it, `adapter` until its adapter was first in a ready slot (counted from
        arrival: it overlaps the others), `prefill` from that launch to its first token (with any
        preemption before it). Also `arrived_at` and, once there, `first_token_at`: the two ends,
        in time.perf_counter seconds of this host, so that the process the request came through
        can place its own phases around them."""
        out = {"arrived_at": self.arrival}
        if self.first_token_time is not None:
            out["first_token_at"] = self.first_token_time
        if self.added_time is not None:
            out["handoff"] = self.added_time - self.arrival
            if self.scheduled_time is not None:
                out["queue"] = self.scheduled_time - self.added_time
        if self.adapter_ready is not None:
            out["adapter"] = self.adapter_ready - self.arrival
        if self.scheduled_time is not None and self.first_token_time is not None:
            out["prefill"] = self.first_token_time - self.scheduled_time
        return out
