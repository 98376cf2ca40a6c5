"""ModelRunner: the only place where the scheduler's Python lists become device tensors.

T = tokens in the step, B = sequences, M = blocks per sequence, V = vocabulary.
"""
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path

import torch
from torch import Tensor

from engine.attention import AttentionGroup, ForwardBatch
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.prefill_graphs import PrefillGraphs
from engine.errors import EngineError
from engine.lora.slots import SlotPools
from engine.memory import plan_memory
from engine.models.loader import load_model
from engine.models.spec import ModelSpec
from engine.parallel.shard import SINGLE
from engine.sampler import sample, token_logprobs
from engine.sampling_inputs import SamplingInputs
from engine.sequence import Sequence
from engine.step_inputs import StepInputs, StepPlan, TokenFeed, build_step_inputs, uses_lora
from engine.warmup import run_warmup
from kernels.weights import OFFSET_UNIT

_ACTIVATION_RESERVE_BYTES = 4 << 30  # activations of the largest step and the graphs' pool (CUDA)
# prompt-logprob rows whose logits exist at once: [rows, V] and its float32 log-softmax (at a
# 152k vocabulary, 256 rows are ~0.16 GB), where a step's prompt chunk may have thousands
PROMPT_LOGPROB_ROWS = 256
STARTUP_PARTS = ("weights", "kv_and_slots", "prefill_graphs", "decode_graphs", "warmup")
log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepResult:
    token_ids: list[int | None]  # per scheduled sequence: sampled token, None mid-prefill
    logits: Tensor | None = None  # [B_sampled, V] (or [T, V] with all_logits) when asked for
    # seq_id -> (the sampled token's logprob, [(token id, logprob)] of its most likely tokens), for
    # the sequences whose SamplingParams.logprobs asked (engine.sampler.token_logprobs)
    logprobs: dict[int, tuple[float, list[tuple[int, float]]]] | None = None
    # seq_id -> [(prompt token id, its logprob, [(token id, logprob)] most likely first)] of the
    # prompt positions this step computed, in order (SamplingParams.prompt_logprobs)
    prompt_logprobs: dict[int, list[tuple[int, float, list[tuple[int, float]]]]] | None = None


@dataclass(slots=True)
class PromptRows:
    """A step's rows whose logits give prompt logprobs: `rows` (token indices of the step),
    `targets` (the prompt token each row's logits score), and per sequence (seq_id, how many
    rows, alternatives) in row order."""
    rows: list[int]
    targets: list[int]
    owners: list[tuple[int, int, int]]


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device. Its sampled ids [B_sampled] stay on the device (a later
    step feeds them in as inputs) and are copied to host memory behind the step, so
    result() waits for this step only, not for steps launched after it."""
    samples: list[bool]  # per scheduled sequence: samples a token in this step
    rows: dict[int, int]  # seq_id -> row of `tokens`
    tokens: Tensor | None  # [B_sampled] int64 on the device
    host_tokens: Tensor | None  # [B_sampled] int64, pinned on CUDA
    done: object = None  # torch.cuda.Event recorded after the copy (None on CPU)
    logits: Tensor | None = None
    # the rows asking for logprobs: [(seq_id, alternatives)], and their (values [R, 1 + k], ids
    # [R, k]) from token_logprobs, on the device, then on the host
    logprob_rows: list[tuple[int, int]] | None = None
    logprobs: tuple[Tensor, Tensor] | None = None
    host_logprobs: tuple[Tensor, Tensor] | None = None
    # prompt logprobs: the rows, and their (values [R, 1 + k], ids [R, k]) as token_logprobs gives them
    prompt_rows: PromptRows | None = None
    prompt_logprobs: tuple[Tensor, Tensor] | None = None
    host_prompt_logprobs: tuple[Tensor, Tensor] | None = None

    def result(self) -> StepResult:
        if self.done is not None:
            self.done.synchronize()
        it = iter(self.host_tokens.tolist() if self.host_tokens is not None else [])
        return StepResult([next(it) if s else None for s in self.samples], self.logits, self._logprobs(),
                           self._prompt_logprobs())

    def _prompt_logprobs(self) -> dict[int, list] | None:
        if self.host_prompt_logprobs is None:
            return None
        values, ids = (t.tolist() for t in self.host_prompt_logprobs)
        out, row, targets = {}, 0, self.prompt_rows.targets
        for seq_id, count, k in self.prompt_rows.owners:
            out[seq_id] = [(targets[r], *_logprob_entry(values[r], ids[r], k)) for r in range(row, row + count)]
            row += count
        return out

    def _logprobs(self) -> dict[int, tuple[float, list[tuple[int, float]]]] | None:
        if self.host_logprobs is None:
            return None
        values, ids = (t.tolist() for t in self.host_logprobs)
        return {seq_id: _logprob_entry(row_values, row_ids, k)
                for (seq_id, k), row_values, row_ids in zip(self.logprob_rows, values, ids)}


def _logprob_entry(values: list[float], ids: list[int], k: int) -> tuple[float, list[tuple[int, float]]]:
    """(the scored token's logprob, [(token id, logprob)] of its k alternatives) from one row of
    token_logprobs' (values, ids) read back."""
    return values[0], list(zip(ids[:k], values[1:k + 1]))


def _pinned_copy(tensor: Tensor) -> Tensor:
    """A host copy of a device tensor, queued behind the work on the current stream."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class ModelRunner:
    """The model of one replica, or of one rank of it (`group`: engine.parallel.group). Rank 0's
    runner (group=None, config.world_size > 1) starts the group; the others are built with it."""

    def __init__(self, config: EngineConfig, spec: ModelSpec, group=None):
        self.config, self.spec = config, spec
        self.startup_seconds: dict[str, float] = dict.fromkeys(STARTUP_PARTS, 0.0)  # seconds by part
        self.warmup_seconds = 0.0
        self.group = group
        if group is None and config.world_size > 1:
            from engine.parallel.group import RankGroup
            from engine.parallel.shard import Shard

            Shard(0, config.tensor_parallel_size, config.expert_parallel_size).check(spec)  # before any rank starts
            self.group = RankGroup.start(config)
        try:
            self._start(config, spec)
        except BaseException:
            if self.group is not None and group is None:
                self.group.close()
            raise

    def _start(self, config: EngineConfig, spec: ModelSpec) -> None:
        self.device, self.dtype = config.torch_device, config.torch_dtype
        self.shard = self.group.shard() if self.group is not None else SINGLE
        model_dir = None if config.model is None else Path(config.model)
        with self._timed("weights"):
            try:
                self.model = load_model(spec, model_dir, self.device, self.dtype, config.load_format, config.seed,
                                        self.shard)
            except Exception as exc:
                if self.group is None:
                    raise
                self.group.phase("weights", exc)  # every rank hears of it; raises
            if self.group is not None:
                self.group.phase("weights")
        with self._timed("kv_and_slots"):
            self._allocate_slots_and_kv_cache()
        self.prefill_graphs = self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:  # else both parts take 0 s
            with self._timed("prefill_graphs"):
                self.prefill_graphs = self._capture_prefill_graphs()
            with self._timed("decode_graphs"):
                self.graphs = self._capture_graphs()
            if self.group is not None:  # a rank whose capture failed runs eagerly: all must then
                prefill_ok, decode_ok = self.group.agree_min([self.prefill_graphs is not None,
                                                              self.graphs is not None])
                self.prefill_graphs = self.prefill_graphs if prefill_ok else None
                self.graphs = self.graphs if decode_ok else None
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.sampling = SamplingInputs(spec.vocab_size, self.device, self._tensor, spec.eos_token_ids)
        if config.warmup and self.device.type == "cuda":  # on CPU nothing compiles: tests call warmup()
            with self._timed("warmup"):
                try:
                    self.warmup()
                except Exception:  # like graph capture: a replica that cannot warm up still serves
                    log.exception("warm-up failed; the first prefill steps will compile their kernels")
        if self.group is not None:
            self.group.running = True
        log.info("start-up took %.2f s: %s", sum(self.startup_seconds.values()),
                 ", ".join(f"{k} {v:.2f} s" for k, v in self.startup_seconds.items()))

    def close(self) -> None:
        """Rank 0: stop the replica's other ranks (a no-op on one rank)."""
        if self.group is not None and self.group.rank == 0:
            self.group.close()

    @contextmanager
    def _timed(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":  # the part's queued work belongs to it
                torch.cuda.synchronize(self.device)
            self.startup_seconds[part] += time.perf_counter() - start

    @property
    def num_lora_slots(self) -> int:
        return self.memory_plan.num_slots

    def _allocate_slots_and_kv_cache(self) -> None:
        """Size both from the memory the weights left (one plan), then allocate them."""
        c = self.config
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.memory_plan = plan_memory(c, self.shard.local_spec(self.spec), weights, _ACTIVATION_RESERVE_BYTES)
        if self.group is not None:  # every rank holds as many blocks and slots as the tightest can
            plan = self.memory_plan
            blocks, slots, heap = self.group.agree_min([plan.num_kv_blocks, plan.num_slots, plan.heap_bytes])
            if c.lora_layout == "slots":
                heap = slots * plan.slot_bytes
            self.memory_plan = replace(plan, num_kv_blocks=blocks, num_slots=slots, heap_bytes=heap)
        log.info("memory plan: %s", self.memory_plan.summary())
        self.num_kv_blocks = self.memory_plan.num_kv_blocks
        num_slots = self.memory_plan.num_slots
        heap = self.memory_plan.heap_bytes if c.lora_layout == "bytes" else None
        self.kv_block_numel = self.memory_plan.kv_block_bytes // self.dtype.itemsize
        self.arena = None  # the heap and the KV cache in one buffer, heap first (EngineConfig.kv_heap_sharing)
        if c.kv_heap_sharing and heap and num_slots > 0 and self.group is None \
                and self.kv_block_numel % OFFSET_UNIT == 0:
            heap = heap // (OFFSET_UNIT * self.dtype.itemsize) * OFFSET_UNIT * self.dtype.itemsize
            self.arena = torch.zeros(heap // self.dtype.itemsize + (self.num_kv_blocks + 1) * self.kv_block_numel,
                                     dtype=self.dtype, device=self.device)
            log.info("the adapter heap (%.3f GiB) and the KV cache share one buffer: the heap may borrow KV "
                     "blocks no sequence uses", heap / (1 << 30))
        self.slot_pools = SlotPools(self.model, num_slots, c.max_lora_rank, heap, c.lora_layout, self.arena,
                                    c.lora_rank_unit) \
            if num_slots > 0 else None
        if self.slot_pools is not None and self.group is not None:
            from engine.parallel.pools import RankPools

            self.slot_pools = RankPools(self.slot_pools, self.group, self.shard, self.spec)
        if self.slot_pools is not None and c.lora_mode == "loop":
            for moe in self.model.moe_layers():
                moe.per_adapter_loop = True
        self.max_cpu_loras = c.max_cpu_loras if c.max_cpu_loras is not None else 4 * max(num_slots, 1)
        self._allocate_kv_cache()

    def _allocate_kv_cache(self) -> None:
        """num_kv_blocks for the BlockManager plus one scratch block (padded graph rows write there),
        block-major [N + 1, L, 2, S, G, Dh]: a block is one span of memory, which the adapter heap
        can borrow whole when it shares the buffer (the top of `arena`). Each layer's K and V are
        strided views [N + 1, S, G, Dh]; the attention kernels take the strides."""
        s, bs = self.spec, self.config.block_size
        shape = (self.num_kv_blocks + 1, s.num_layers, 2, bs, self.shard.heads(s.num_kv_heads)[1], s.head_dim)
        if self.arena is not None:
            self.kv_cache = self.arena[self.arena.numel() - (self.num_kv_blocks + 1) * self.kv_block_numel:].view(shape)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[:, i, 0], self.kv_cache[:, i, 1]

    def _capture_prefill_graphs(self) -> PrefillGraphs | None:
        c = self.config
        if self.device.type != "cuda" or c.enforce_eager or not c.prefill_graphs:
            return None
        graphs = PrefillGraphs(self.model, c.max_num_batched_tokens, c.max_num_seqs, c.max_model_len,
                               c.block_size, self.num_kv_blocks * c.block_size,
                               self.slot_pools is not None and c.lora_mode == "fused", self.device)
        try:
            graphs.capture_all()
        except Exception:  # as decode graphs: a model that cannot be captured runs eagerly
            log.exception("prefill graph capture failed; prefill and mixed steps run eagerly")
            return None
        return graphs

    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None
        graphs = DecodeGraphs(self.model, self.config.max_num_seqs, self.config.max_model_len,
                              self.config.block_size, self.num_kv_blocks * self.config.block_size,
                              self.slot_pools is not None and self.config.lora_mode == "fused", self.device,
                              pool=self.prefill_graphs.pool if self.prefill_graphs is not None else None)
        try:
            graphs.capture_all()
        except Exception:  # a model or kernel that cannot be captured still runs, eagerly
            log.exception("CUDA graph capture failed; decode steps run eagerly")
            return None
        return graphs

    def _tensor(self, values: list, dtype: torch.dtype) -> Tensor:
        t = torch.tensor(values, dtype=dtype, pin_memory=self.device.type == "cuda")
        return t.to(self.device, non_blocking=True)

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[Tensor, ForwardBatch, list[int]]:
        """The eager step's (input_ids [T], ForwardBatch, sampled token rows)."""
        inputs = build_step_inputs(scheduled, self.config.block_size)
        return (*self.eager_inputs(inputs), inputs.sample_rows)

    def eager_inputs(self, inputs: StepInputs) -> tuple[Tensor, ForwardBatch]:
        """Device tensors of the step; decodes (first) and prefill chunks form an attention group each."""
        split, groups = inputs.num_decodes, []
        for seqs in (range(split), range(split, len(inputs.query_lens))):
            if seqs:
                groups.append(self._group(inputs, seqs, groups[-1].end if groups else 0))
        batch = ForwardBatch(
            positions=self._tensor(inputs.positions, torch.long),
            slot_mapping=self._tensor(inputs.slot_mapping, torch.long), groups=groups,
            lora_slot_ids=None if inputs.lora_slots is None else self._tensor(inputs.lora_slots, torch.int32),
            triton_prefill=self.config.triton_prefill_attention)
        return self._tensor(inputs.input_ids, torch.long), batch

    def _group(self, inputs: StepInputs, seqs: range, token_start: int) -> AttentionGroup:
        lens = inputs.query_lens[seqs.start:seqs.stop]
        contexts = inputs.context_lens[seqs.start:seqs.stop]
        tables = inputs.block_tables[seqs.start:seqs.stop]
        width = max(len(t) for t in tables)
        tseq = [b for b, n in enumerate(lens) for _ in range(n)]
        trow = [i for n in lens for i in range(n)]
        group = AttentionGroup(
            start=token_start, end=token_start + len(tseq),
            block_tables=self._tensor([t + [0] * (width - len(t)) for t in tables], torch.long),
            token_seq=self._tensor(tseq, torch.long), token_row=self._tensor(trow, torch.long),
            max_query_len=max(lens), max_context_len=max(contexts))
        if self.config.triton_prefill_attention and group.max_query_len > 1:
            group.query_start = self._tensor(list(accumulate(lens, initial=0)), torch.int32)
            group.context_lens = self._tensor(contexts, torch.int32)
        return group

    def release(self, seq: Sequence) -> None:
        self.sampling.release(seq)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]], all_logits: bool = False,
                return_logits: bool = False) -> StepResult:
        """Run one step and wait for it; `all_logits` also returns logits of every token ([T, V],
        for tests)."""
        return self.launch(scheduled, None, all_logits, return_logits).result()

    @torch.inference_mode()
    def launch(self, scheduled: list[tuple[Sequence, int]], prev: LaunchedStep | None = None,
               all_logits: bool = False, return_logits: bool = False) -> LaunchedStep:
        """Queue one step on the device without waiting for it. A sequence with a pending token
        (seq.num_pending) decodes it here: its id comes from `prev`, the step that samples it.
        Returned logits of a graph step are its static buffer: valid until the next step runs."""
        samples = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in scheduled]
        sampled = [seq for (seq, _), s in zip(scheduled, samples) if s]
        feed = self._feed(scheduled, prev)
        prompt = prompt_logprob_rows(scheduled)
        graphs = None if all_logits or prompt is not None else self._graphs_for(scheduled)
        keep = [i for i, s in enumerate(samples) if s] \
            if graphs is not None and graphs is self.graphs and not all(samples) else None
        kind = None if graphs is None else ("decode" if graphs is self.graphs else "prefill")
        plan = StepPlan(build_step_inputs(scheduled, self.config.block_size), kind, feed is not None, all_logits, keep,
                        None if prompt is None else prompt.rows)
        if self.group is not None:
            self.group.send_step(plan)
        scored = []
        if prompt is not None:
            targets = self._tensor(prompt.targets, torch.long)
            k = max(alternatives for _, _, alternatives in prompt.owners)

            def score(start: int, logits: Tensor) -> None:  # one chunk of the prompt rows' logits
                scored.append(token_logprobs(logits, targets[start:start + logits.shape[0]], None, k))
        logits, kept = self._forward(plan, feed, score if prompt is not None else None)
        step = LaunchedStep(samples, {seq.seq_id: i for i, seq in enumerate(sampled)}, None, None,
                            logits=kept if all_logits else (logits if return_logits else None))
        if prompt is not None:
            step.prompt_rows = prompt
            step.prompt_logprobs = tuple(torch.cat(parts) for parts in zip(*scored))
        if sampled:
            step.tokens = sample(logits, self.sampling.tensors(sampled), self.generator)
            wanted = [(i, seq.seq_id, seq.params.logprobs) for i, seq in enumerate(sampled)
                      if seq.params.logprobs is not None]
            if wanted:  # after sampling, on the logits as the model gave them
                step.logprob_rows = [(seq_id, k) for _, seq_id, k in wanted]
                # the rows' index through _tensor: torch.tensor(list, device=cuda) would wait for the GPU
                index = None if len(wanted) == len(sampled) else self._tensor([i for i, _, _ in wanted], torch.long)
                step.logprobs = token_logprobs(logits, step.tokens, index, max(k for _, _, k in wanted))
        if sampled or prompt is not None:
            self._read_back(step)
        if prompt is not None:  # launched: a recompute after preemption does not score them again
            for seq, n in scheduled:  # (a launch that raised before here is retried whole)
                if seq.params.prompt_logprobs is not None:
                    seq.prompt_logprobs_launched = max(seq.prompt_logprobs_launched,
                                                       min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1))
        return step

    @torch.inference_mode()
    def follow(self, plan: StepPlan) -> None:
        """A rank other than 0: rank 0's step, whose collectives it takes part in."""
        self._forward(plan, None)

    def _forward(self, plan: StepPlan, feed: TokenFeed | None,
                 score=None) -> tuple[Tensor | None, Tensor | None]:
        """(logits of the sampled rows, logits of every token when plan.all_logits) of the step;
        the logits of plan.prompt_rows go to score(first row, logits) PROMPT_LOGPROB_ROWS rows at
        a time (every rank computes them: lm_head's all-gather is a collective)."""
        feed_ids = None
        if plan.fed:
            def feed_ids(ids: Tensor) -> None:
                if feed is not None:
                    feed.apply(ids, self._tensor)
                if self.group is not None:  # the ids exist on rank 0's device only
                    self.group.broadcast_(ids)
        inputs = plan.inputs
        graphs = {"decode": self.graphs, "prefill": self.prefill_graphs}.get(plan.graphs)
        if graphs is not None:
            logits = graphs.run(inputs, feed_ids)  # decode graphs: a row per sequence
            if plan.keep is not None:  # a one-token chunk that does not end its prompt
                logits = logits[self._tensor(plan.keep, torch.long)]
            return logits, None
        input_ids, batch = self.eager_inputs(inputs)
        if feed_ids is not None:
            feed_ids(input_ids)
        hidden = self.model(input_ids, batch)
        for start in range(0, len(plan.prompt_rows or ()), PROMPT_LOGPROB_ROWS):
            rows = self._tensor(plan.prompt_rows[start:start + PROMPT_LOGPROB_ROWS], torch.long)
            chunk = self.model.compute_logits(hidden[rows])
            if score is not None:
                score(start, chunk)
        rows = inputs.sample_rows
        # index with device tensors: a Python list is a blocking copy that waits for the GPU
        if plan.all_logits:
            kept = self.model.compute_logits(hidden)
            return kept[self._tensor(rows, torch.long)], kept
        if rows:
            return self.model.compute_logits(hidden[self._tensor(rows, torch.long)]), None
        return None, None

    def _read_back(self, step: LaunchedStep) -> None:
        if self.device.type != "cuda":
            step.host_tokens, step.host_logprobs = step.tokens, step.logprobs
            step.host_prompt_logprobs = step.prompt_logprobs
            return
        step.host_tokens = None if step.tokens is None else _pinned_copy(step.tokens)
        if step.logprobs is not None:
            step.host_logprobs = tuple(_pinned_copy(t) for t in step.logprobs)
        if step.prompt_logprobs is not None:
            step.host_prompt_logprobs = tuple(_pinned_copy(t) for t in step.prompt_logprobs)
        step.done = torch.cuda.Event()
        step.done.record()

    def _feed(self, scheduled: list[tuple[Sequence, int]], prev: LaunchedStep | None) -> TokenFeed | None:
        """Where this step's pending input ids sit (token index) and which rows of prev sample them."""
        dst, src, start = [], [], 0
        for seq, n in scheduled:
            start += n
            if seq.num_pending:
                row = None if prev is None else prev.rows.get(seq.seq_id)
                if row is None or seq.num_pending > 1:
                    raise EngineError(f"sequence {seq.request_id!r} decodes a pending token that the "
                                      "previous step does not sample")
                dst.append(start - 1)  # a pending token is the sequence's last
                src.append(row)
        return TokenFeed(dst, src, prev.tokens) if dst else None

    def is_graph_step(self, scheduled: list[tuple[Sequence, int]]) -> bool:
        """Whether launch() replays graphs (decode or prefill) for this step: ~ms of host time."""
        return self._graphs_for(scheduled) is not None and prompt_logprob_rows(scheduled) is None

    def _graphs_for(self, scheduled: list[tuple[Sequence, int]]) -> DecodeGraphs | PrefillGraphs | None:
        """The graphs that run this step: decode graphs for decode-only steps that fit them, else
        prefill graphs where they fit; None: the step runs eagerly."""
        lora = uses_lora(scheduled)
        if self.graphs is not None and all(n == 1 for _, n in scheduled) and self.graphs.fits(
                len(scheduled), max(s.num_computed_tokens + 1 for s, _ in scheduled), lora):
            return self.graphs
        if self.prefill_graphs is not None and self.prefill_graphs.fits(
                sum(n for _, n in scheduled), len(scheduled), lora):
            return self.prefill_graphs
        return None

    # ---- warm-up ----------------------------------------------------------------
    @torch.inference_mode()
    def warmup(self) -> float:
        """Dummy eager steps that compile the Triton specialisations of the steps to come
        (engine.warmup); returns the seconds it took (also added to warmup_seconds)."""
        seconds = run_warmup(self)
        self.warmup_seconds += seconds
        log.info("warm-up of prefill and mixed steps took %.2f s", seconds)
        return seconds


def prompt_logprob_rows(scheduled: list[tuple[Sequence, int]]) -> PromptRows | None:
    """The step's rows whose logits score prompt tokens (SamplingParams.prompt_logprobs): row p of
    a sequence's chunk scores its prompt token p + 1; positions a launched step scored already (a
    recompute) are left out. None when there are none (such a step runs eagerly)."""
    rows, targets, owners, start = [], [], [], 0
    for seq, n in scheduled:
        if seq.params.prompt_logprobs is not None:
            done = seq.num_computed_tokens
            first = max(done + 1, seq.prompt_logprobs_launched + 1)
            last = min(done + n, seq.num_prompt_tokens - 1)
            if first <= last:
                rows += range(start + first - 1 - done, start + last - done)
                targets += seq.prompt_token_ids[first:last + 1]
                owners.append((seq.seq_id, last - first + 1, seq.params.prompt_logprobs))
        start += n
    return PromptRows(rows, targets, owners) if rows else None
