"""CUDA graphs of prefill and mixed steps (prompt chunks, with or without decodes).

An eager prefill step is bound by host time: ~1550 kernel launches and ~8000 torch ops at 35
layers, ~0.1 s of host for ~0.04 s of GPU (H100). Replayed from graphs it costs a
few graph launches. One chain of graphs per (token bucket, with/without LoRA), captured at
start-up into the decode graphs' memory pool.

A step pads its tokens to the bucket. Its sequences lie back to back (query_start), and the
padded tokens form one more sequence with no keys: their attention output is 0, their KV goes to
the scratch slot, no row of theirs is sampled. Attention is kernels.paged_prefill_attention for
every sequence, decodes included (one query each), with lengths read from device tensors. Logits
are computed for the rows that sample, padded with row 0. Needs the Triton kernels.
T = token bucket, B = sequences of a bucket + 1 (the padding), M = blocks per sequence.
"""
from collections.abc import Callable
from itertools import accumulate

import torch
from torch import Tensor

from engine.attention import AttentionGroup, ForwardBatch
from engine.cuda_graphs import capture_chain, load_buffer
from engine.step_inputs import NO_SLOT, StepInputs


def token_buckets(max_tokens: int) -> list[int]:
    sizes = [t for t in (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if t < max_tokens]
    return sizes + [max_tokens]


class PrefillGraphs:
    def __init__(self, model, max_tokens: int, max_seqs: int, max_model_len: int, block_size: int,
                 scratch_slot: int, with_lora: bool, device: torch.device, pool=None, use_graphs: bool = True):
        """use_graphs=False runs the same padded static-buffer steps eagerly (tests)."""
        self.model, self.max_seqs, self.scratch_slot = model, max_seqs, scratch_slot
        self.max_model_len, self.use_graphs, self.pool = max_model_len, use_graphs, pool
        self.tokens = token_buckets(max_tokens)
        t, b = self.tokens[-1], self._seqs(self.tokens[-1]) + 1
        zeros = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.input_ids, self.positions, self.slot_mapping = zeros(t), zeros(t), zeros(t)
        self.lora_slots = zeros(t, dtype=torch.int32) + NO_SLOT
        self.token_seq, self.token_row = zeros(t), zeros(t)  # unused by the Triton attention
        self.block_tables = zeros(b, -(-max_model_len // block_size))
        self.query_start = zeros(b + 1, dtype=torch.int32)
        self.context_lens = zeros(b, dtype=torch.int32)
        self.sample_rows = zeros(b)
        self.lora_variants = (False, True) if with_lora else (False,)
        self.graphs: dict[tuple[int, bool], tuple] = {}  # -> (chain or None, logits or head, keep)

    def _seqs(self, tokens: int) -> int:
        return min(self.max_seqs, tokens)

    def fits(self, num_tokens: int, num_seqs: int, use_lora: bool) -> bool:
        return num_tokens <= self.tokens[-1] and num_seqs <= self.max_seqs and use_lora in self.lora_variants

    def _batch(self, tokens: int, use_lora: bool) -> ForwardBatch:
        b = self._seqs(tokens) + 1
        group = AttentionGroup(0, tokens, self.block_tables[:b], self.token_seq[:tokens], self.token_row[:tokens],
                               tokens, self.max_model_len, self.query_start[:b + 1], self.context_lens[:b])
        return ForwardBatch(self.positions[:tokens], self.slot_mapping[:tokens], [group],
                            self.lora_slots[:tokens] if use_lora else None, triton_prefill=True)

    def capture_all(self) -> None:
        for use_lora in self.lora_variants:
            for tokens in reversed(self.tokens):  # largest first: the pool fits the rest
                self._capture(tokens, use_lora)

    @torch.inference_mode()
    def _capture(self, tokens: int, use_lora: bool) -> None:
        fwd = self._batch(tokens, use_lora)
        # captured on an all-padding step: one sequence of every token, with no keys
        self.slot_mapping[:tokens] = self.scratch_slot
        self.query_start.zero_()
        self.query_start[1:] = tokens
        self.context_lens.zero_()
        rows = self.sample_rows[:self._seqs(tokens)]
        head = lambda h: self.model.compute_logits(h[rows])  # noqa: E731
        if not self.use_graphs:
            self.graphs[(tokens, use_lora)] = (None, head, fwd)
            return
        chain, logits, keep, self.pool = capture_chain(self.model, self.input_ids[:tokens], fwd, self.pool, head)
        self.graphs[(tokens, use_lora)] = (chain, logits, keep)

    def run(self, inputs: StepInputs, feed: Callable[[Tensor], None] | None = None) -> Tensor:
        """Replay the bucket's graphs for this step; returns logits [len(sample_rows), V] (a view
        of the static buffer). `feed(input_ids)` may overwrite ids on the device first."""
        num_tokens, num_seqs = len(inputs.input_ids), len(inputs.query_lens)
        tokens = next(t for t in self.tokens if t >= num_tokens)
        b, pad, use_lora = self._seqs(tokens) + 1, tokens - num_tokens, inputs.lora_slots is not None
        load_buffer(self.input_ids, inputs.input_ids + [0] * pad)
        load_buffer(self.positions, inputs.positions + [0] * pad)
        load_buffer(self.slot_mapping, inputs.slot_mapping + [self.scratch_slot] * pad)
        if use_lora:
            load_buffer(self.lora_slots, inputs.lora_slots + [NO_SLOT] * pad)
        starts = list(accumulate(inputs.query_lens, initial=0))
        # the padding is sequence num_seqs; any later ones are empty. Rows past a sequence's
        # own blocks are never read, so only the step's rows and widths are loaded
        load_buffer(self.query_start, starts + [tokens] * (b - num_seqs))
        load_buffer(self.context_lens, inputs.context_lens + [0] * (b - num_seqs))
        width = max(len(t) for t in inputs.block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in inputs.block_tables], dtype=torch.long,
                             pin_memory=self.block_tables.is_cuda)
        self.block_tables[:num_seqs, :width].copy_(table, non_blocking=True)
        load_buffer(self.sample_rows, inputs.sample_rows + [0] * (self._seqs(tokens) - len(inputs.sample_rows)))
        if feed is not None:
            feed(self.input_ids)
        chain, logits, fwd = self.graphs[(tokens, use_lora)]
        if chain is None:  # eager over the same buffers: `logits` holds the head
            return logits(self.model(self.input_ids[:tokens], fwd))[:len(inputs.sample_rows)]
        for graph in chain:
            graph.replay()
        return logits[:len(inputs.sample_rows)]
