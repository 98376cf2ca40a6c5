"""Start-up warm-up: dummy eager steps, so a user's request never waits for a Triton compile.

The shapes cover every size at which a kernel launch choice changes (kernels.moe.launch
.token_breakpoints): any step of another size compiles nothing new (tests/engine/test_warmup.py).
"""
import time

import torch

from engine.config import EngineConfig
from engine.models.spec import ModelSpec
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kernels.moe.launch import lora_path, token_breakpoints
from kernels.weights import SHAREABLE, Factor


def run_warmup(runner) -> float:  # runner: the ModelRunner, whose prepare() and model it drives
    """Dummy steps through prepare() / forward / compute_logits, so the Triton specialisations
    of eager (prefill and mixed) steps compile at start-up instead of in a user's request.

    Covers a full prefill group (max_num_batched_tokens), a small odd-sized one, one on each
    side of every size where a kernel launch choice changes (kernels.moe.launch
    .token_breakpoints), lone decodes at doubling contexts, and a mixed step (decodes + a
    prefill chunk), each without LoRA and with slot 0 alternating with no adapter; on the adapter
    heap, the steps of the split LoRA path again with its shared-outer launches switched on.
    Every dummy sequence's blocks are the scratch block, so no owned KV block is written;
    nothing is sampled, so no generator moves."""
    start = time.perf_counter()
    # with LoRA, the dummy sequences alternate between slot 0 (zeros now) and the base model,
    # slot 0 first so a one-sequence step runs with an adapter
    slot_cycles = [[None]] + ([[0, None]] if runner.slot_pools is not None else [])
    shapes = warmup_shapes(runner.config, runner.spec)
    for shape in shapes:
        for slots in slot_cycles:
            _step(runner, shape, slots)
    # the heap's split path for shared-outer adapters (MoELoRAWeights.shared_halves, on once one
    # is packed) has launches of its own: compiled here too, with the switch on for these steps
    pools = [w for w in (getattr(runner.slot_pools, "moe", None) or {}).values()
             if isinstance(w.down_b, Factor) and w.down_b.ranked & SHAREABLE and not w.shared_halves]
    split = [shape for shape in shapes
             if lora_path(sum(n for _, n in shape), runner.spec.top_k, runner.spec.moe_intermediate_size) == "split"]
    if pools and split:
        for w in pools:
            w.shared_halves = True
        try:
            for shape in split:
                _step(runner, shape, [0, None])
        finally:
            for w in pools:
                w.shared_halves = False
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - start


def _step(runner, shape: list[tuple[int, int]], slots: list[int | None]) -> None:
    """One dummy eager step of `shape`, the sequences' slots cycling through `slots`."""
    scheduled = [dummy_entry(runner, done, n, slots[i % len(slots)]) for i, (done, n) in enumerate(shape)]
    input_ids, batch, rows = runner.prepare(scheduled)
    runner.model.compute_logits(runner.model(input_ids, batch)[runner._tensor(rows, torch.long)])


def warmup_shapes(c: EngineConfig, spec: ModelSpec) -> list[list[tuple[int, int]]]:
    """Steps as (computed tokens, new tokens) per dummy sequence, decodes first."""
    longest = max(c.max_model_len - 1, 2)  # a prompt is shorter than max_model_len
    budget = min(c.max_num_batched_tokens, c.max_num_seqs * longest)
    num_full = max(-(-budget // longest), 2 if budget >= 4 and c.max_num_seqs >= 2 else 1)
    full = [budget // num_full + (i < budget % num_full) for i in range(num_full)]  # even split
    small = [2, 3] if c.max_num_batched_tokens >= 5 and c.max_num_seqs >= 2 else [min(3, budget)]
    num_decodes = min(3, c.max_num_seqs - 1, c.max_num_batched_tokens - 2)
    chunk = min(longest, c.max_num_batched_tokens - num_decodes)
    context = min(c.block_size + 1, c.max_model_len - 1)  # decodes reading more than one block
    mixed = [(context, 1)] * max(num_decodes, 0) + [(0, chunk)]
    shapes = [[(0, n) for n in full], [(0, n) for n in small]]
    # prefills on both sides of every size where a kernel launch choice changes (base tile
    # rows, alignment path and its power-of-two tiles, expand path): a step of any other size
    # compiles nothing new (tests/engine/test_warmup.py checks it)
    for n in token_breakpoints(spec.num_experts, spec.top_k, budget):
        if n not in (sum(small), budget):  # those two run above
            parts = max(-(-n // longest), 1)
            shapes.append([(0, n // parts + (i < n % parts)) for i in range(parts)])
    # lone decodes at contexts doubling from 128 keys: on the GPU the decode kernel's partition
    # count (a power-of-two constexpr that grows with the context) takes each of its values
    ctx = 128
    while ctx < c.max_model_len:
        shapes.append([(min(ctx, c.max_model_len - 2), 1)])  # the last one at the longest context
        ctx *= 2
    return shapes + ([mixed] if num_decodes > 0 and chunk > 1 else [])


def dummy_entry(runner, num_computed: int, num_new: int, lora_slot: int | None) -> tuple[Sequence, int]:
    """A dummy sequence whose every block is the scratch block (no sequence owns it)."""
    total = num_computed + num_new
    token_ids = [i % runner.spec.vocab_size for i in range(total)]  # id 0 may embed to zeros
    seq = Sequence(-1, "warmup", token_ids, SamplingParams(max_tokens=1), lora_slot=lora_slot)
    seq.num_computed_tokens = num_computed
    seq.block_table = [runner.num_kv_blocks] * -(-total // runner.config.block_size)
    return seq, num_new
