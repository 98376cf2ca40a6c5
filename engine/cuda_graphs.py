"""CUDA graphs of decode-only steps, so a decode step's host work hides behind the GPU.

One chain of graphs per (batch bucket, context bucket, with/without LoRA), captured at start-up
into one shared memory pool. A step pads its batch to the bucket: padded tokens write their KV
to a scratch block no sequence owns and their logits are dropped.

Why a chain and not one graph: launching a graph costs host time in proportion to its kernels
(H100, 35 layers, ~1300 kernels: ~2 ms of cudaGraphLaunch during which the GPU sat idle). The
chain's first graph holds LAYERS_PER_GRAPH layers; the GPU runs it while the host launches the
next, so only the first launch is exposed.
B = batch bucket, C = context bucket, M = C / block size, V = vocabulary.
"""
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from engine.attention import AttentionGroup, ForwardBatch
from engine.step_inputs import NO_SLOT, StepInputs

log = logging.getLogger(__name__)
LAYERS_PER_GRAPH = 4


def capture_chain(model, input_ids: Tensor, fwd: ForwardBatch, pool, head: Callable[[Tensor], Tensor]):
    """Capture model(input_ids, fwd) as a chain of graphs of LAYERS_PER_GRAPH layers each, `head`
    (final hidden [T, D] -> logits) in the last; returns (graphs, logits, tensors to keep
    alive, pool). A warm-up run on a side stream first (Triton JIT, allocator)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        head(model(input_ids, fwd))
    torch.cuda.current_stream().wait_stream(side)
    num_layers = len(model.layers)
    bounds = list(range(0, max(num_layers, 1), LAYERS_PER_GRAPH)) + [num_layers]  # no layers: [0, 0]
    chain = []
    # the (h, residual) one graph hands to the next stay referenced until that capture used
    # them; later captures may reuse their memory, which is safe only because a chain always
    # replays whole, in order, on one stream (never a partial chain)
    for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            if k == 0:
                h, residual = model.embed(input_ids, fwd)
            h, residual = model.run_layers(h, residual, fwd, start, end)
            if end == num_layers:
                logits = head(h)
        pool = graph.pool()
        chain.append(graph)
    return chain, logits, (fwd, h, residual), pool


def load_buffer(buffer: Tensor, values: list) -> None:
    """Copy host values into the front of a static buffer (pinned, behind the queued work)."""
    host = torch.tensor(values, dtype=buffer.dtype, pin_memory=buffer.is_cuda)
    buffer[:host.shape[0]].copy_(host, non_blocking=True)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


def context_buckets(max_len: int, block_size: int) -> list[int]:
    sizes, c = [], 256
    while c < max_len:
        sizes.append(c)
        c *= 2
    return [-(-s // block_size) * block_size for s in sizes + [max_len]]


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_model_len: int, block_size: int, scratch_slot: int,
                 with_lora: bool, device: torch.device, use_graphs: bool = True, pool=None):
        """use_graphs=False runs the same padded static-buffer steps eagerly (CPU tests); pool: a
        graph memory pool to share (the prefill graphs')."""
        self.model, self.block_size, self.scratch_slot = model, block_size, scratch_slot
        self.use_graphs = use_graphs
        self.batches = batch_buckets(max_batch)
        self.contexts = context_buckets(max_model_len, block_size)
        max_blocks = self.contexts[-1] // block_size
        zeros = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.input_ids, self.positions, self.slot_mapping = zeros(max_batch), zeros(max_batch), zeros(max_batch)
        self.block_tables = zeros(max_batch, max_blocks)
        self.token_seq = torch.arange(max_batch, device=device)
        self.token_row = zeros(max_batch)
        self.lora_slots = zeros(max_batch, dtype=torch.int32) + NO_SLOT
        # -> ([graphs of the chain], logits, batch) or (None, None, batch) eagerly
        self.graphs: dict[tuple[int, int, bool], tuple] = {}
        self.pool = pool
        self.lora_variants = (False, True) if with_lora else (False,)

    def capture_all(self) -> None:
        for use_lora in self.lora_variants:
            for ctx in self.contexts:
                for batch in reversed(self.batches):  # largest first: the pool fits the rest
                    self._capture(batch, ctx, use_lora)

    def fits(self, num_seqs: int, max_context_len: int, use_lora: bool) -> bool:
        return (num_seqs <= self.batches[-1] and max_context_len <= self.contexts[-1]
                and use_lora in self.lora_variants)

    def _batch(self, batch: int, ctx: int, use_lora: bool) -> ForwardBatch:
        group = AttentionGroup(0, batch, self.block_tables[:batch, :ctx // self.block_size],
                               self.token_seq[:batch], self.token_row[:batch], 1, ctx)
        return ForwardBatch(self.positions[:batch], self.slot_mapping[:batch], [group],
                            self.lora_slots[:batch] if use_lora else None)

    @torch.inference_mode()
    def _capture(self, batch: int, ctx: int, use_lora: bool) -> None:
        fwd = self._batch(batch, ctx, use_lora)
        self.slot_mapping[:batch] = self.scratch_slot
        if not self.use_graphs:
            self.graphs[(batch, ctx, use_lora)] = (None, None, fwd)
            return
        chain, logits, keep, self.pool = capture_chain(self.model, self.input_ids[:batch], fwd, self.pool,
                                                       self.model.compute_logits)
        self.graphs[(batch, ctx, use_lora)] = (chain, logits, keep)

    def run(self, inputs: StepInputs, feed: Callable[[Tensor], None] | None = None) -> Tensor:
        """Replay the bucket's graphs for this step; returns logits [num_seqs, V] (a view of the
        static buffer). `feed(input_ids)` may overwrite ids on the device before the replay."""
        n = len(inputs.input_ids)
        batch = next(b for b in self.batches if b >= n)
        ctx = next(c for c in self.contexts if c >= inputs.max_context_len)
        use_lora = inputs.lora_slots is not None
        pad = batch - n
        width = self.block_tables.shape[1]
        load_buffer(self.input_ids, inputs.input_ids + [0] * pad)
        load_buffer(self.positions, inputs.positions + [0] * pad)
        load_buffer(self.slot_mapping, inputs.slot_mapping + [self.scratch_slot] * pad)
        load_buffer(self.block_tables, [t + [0] * (width - len(t)) for t in inputs.block_tables] + [[0] * width] * pad)
        if use_lora:
            load_buffer(self.lora_slots, inputs.lora_slots + [NO_SLOT] * pad)
        if feed is not None:
            feed(self.input_ids)
        chain, logits, fwd = self.graphs[(batch, ctx, use_lora)]
        if chain is None:
            return self.model.compute_logits(self.model(self.input_ids[:batch], fwd))[:n]
        for graph in chain:
            graph.replay()
        return logits[:n]

