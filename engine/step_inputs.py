"""A step's inputs as Python lists, built once from the scheduler's (sequence, new tokens) pairs;
the decode graphs, the prefill graphs and the eager path all read them. A StepPlan is what every rank
of a replica over several GPUs runs a step from; a TokenFeed, the input ids a step takes from the
previous step's samples on the device.

T = tokens in the step, B = sequences.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.sequence import Sequence

NO_SLOT = -1  # the LoRA slot id of a token without an adapter, as the kernels read it


@dataclass(slots=True)
class StepInputs:
    """One step: per token, then per sequence, in the scheduler's order (decodes first)."""
    input_ids: list[int]  # [T]; a pending token's id is a placeholder, fed on the device
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T] KV cache slot of each token
    lora_slots: list[int] | None  # [T] adapter slot or NO_SLOT; None: no token has an adapter
    query_lens: list[int]  # [B] new tokens
    context_lens: list[int]  # [B] tokens in the KV cache once the step ran
    block_tables: list[list[int]]  # [B][blocks]
    sample_rows: list[int]  # token index of each sampling sequence's last token

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)

    @property
    def num_decodes(self) -> int:
        """Leading sequences with one new token each (they form their own attention group)."""
        return next((i for i, n in enumerate(self.query_lens) if n > 1), len(self.query_lens))


def lora_slot_id(seq: Sequence) -> int:
    return NO_SLOT if seq.lora_slot is None else seq.lora_slot


def build_step_inputs(scheduled: list[tuple[Sequence, int]], block_size: int) -> StepInputs:
    """Flatten the step's sequences: token ids, positions, KV slots and LoRA slots per token."""
    ids, pos, slots, lora, sample_rows = [], [], [], [], []
    query_lens, context_lens, tables = [], [], []
    for seq, n in scheduled:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        table = seq.block_table
        ids += seq.token_ids(start, end)
        pos += range(start, end)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        lora += [lora_slot_id(seq)] * n
        if end == seq.num_tokens:
            sample_rows.append(len(ids) - 1)
        query_lens.append(n)
        context_lens.append(end)
        tables.append(table)
    has_lora = any(s != NO_SLOT for s in lora)
    return StepInputs(ids, pos, slots, lora if has_lora else None, query_lens, context_lens, tables, sample_rows)


def uses_lora(scheduled: list[tuple[Sequence, int]]) -> bool:
    return any(seq.lora_slot is not None for seq, _ in scheduled)


@dataclass(slots=True)
class StepPlan:
    """What every rank of a replica needs to run a step's forward the same way (rank 0 sends it
    to the others): its inputs, which graphs replay it ("decode", "prefill" or None: eager),
    whether input ids come from the previous step's samples (rank 0 broadcasts them), and which
    rows' logits are kept."""
    inputs: StepInputs
    graphs: str | None
    fed: bool
    all_logits: bool
    keep: list[int] | None  # decode graphs: rows of the sequences that sample, when not all do
    # eager steps: token rows whose logits give prompt logprobs (SamplingParams.prompt_logprobs)
    prompt_rows: list[int] | None = None


@dataclass(slots=True)
class TokenFeed:
    """Inputs whose ids a previous launched step samples: ids[dst] = tokens[src] on the device."""
    dst: list[int]
    src: list[int]
    tokens: Tensor

    def apply(self, ids: Tensor, to_device) -> None:
        if self.dst == self.src == list(range(len(self.dst))):  # steady decode: same order
            ids[:len(self.dst)].copy_(self.tokens[:len(self.dst)])
        else:
            ids[to_device(self.dst, torch.long)] = self.tokens[to_device(self.src, torch.long)]
