"""ModelRunner.warmup(): dummy prefill / mixed steps that compile kernels and leave no state (CPU)."""
import pytest
import torch

import kernels
from engine import LoRARequest, SamplingParams
from engine.warmup import dummy_entry, warmup_shapes
from tests.engine.helpers import PROMPTS, make_engine, tiny_qwen3_config, wait_for_adapters

FAMILY = "qwen3_moe"
SMALL = dict(max_num_batched_tokens=24, block_size=4, max_model_len=64, max_num_seqs=8)


def record_forwards(engine) -> list[dict]:
    """What each model forward saw: token count, attention groups, KV slots written, LoRA slot ids."""
    calls = []

    def hook(_module, args):
        input_ids, batch = args
        slot_ids = batch.lora_slot_ids
        calls.append({"num_tokens": input_ids.shape[0], "num_groups": len(batch.groups),
                      "kv_slots": batch.slot_mapping.tolist(),
                      "lora": None if slot_ids is None else sorted(set(slot_ids.tolist()))})
    engine.runner.model.register_forward_pre_hook(hook)
    return calls


def test_warmup_runs_full_small_and_mixed_steps_into_the_scratch_block(checkpoints):
    engine = make_engine(checkpoints[FAMILY], warmup=True, **SMALL)
    assert engine.stats()["warmup_seconds"] == 0.0  # on CPU nothing compiles: start-up skips it
    calls = record_forwards(engine)
    seconds = engine.runner.warmup()
    assert seconds > 0 and engine.stats()["warmup_seconds"] == seconds
    sizes = [(c["num_tokens"], c["num_groups"]) for c in calls]
    # full budget; odd prefill (2 + 3); the kernels' other size breakpoints; 3 decodes + chunk
    from kernels.moe.launch import token_breakpoints
    others = [n for n in token_breakpoints(engine.spec.num_experts, engine.spec.top_k, 24) if n not in (5, 24)]
    assert 1 in others and sizes == [(24, 1), (5, 1)] + [(n, 1) for n in others] + [(3 + 21, 2)]
    scratch = engine.runner.num_kv_blocks * engine.config.block_size
    for call in calls:
        assert all(scratch <= s < scratch + engine.config.block_size for s in call["kv_slots"])
        assert call["lora"] is None  # max_loras=0: no LoRA variant


def test_warmup_with_adapters_passes_mixed_slot_ids_to_the_lora_kernels(checkpoints, monkeypatch):
    engine = make_engine(checkpoints[FAMILY], max_loras=2, **SMALL)
    seen = {"fused_moe": [], "linear_lora": []}

    def recording(name, position):
        original = getattr(kernels, name)

        def wrapper(*args, **kw):
            slot_ids = args[position] if len(args) > position else None
            seen[name].append(None if slot_ids is None else sorted(set(slot_ids.tolist())))
            return original(*args, **kw)
        return wrapper
    monkeypatch.setattr(kernels, "fused_moe", recording("fused_moe", 6))
    monkeypatch.setattr(kernels, "linear_lora", recording("linear_lora", 4))
    calls = record_forwards(engine)
    engine.runner.warmup()
    # each shape without and with LoRA; with, the dummy sequences alternate slot 0 and no adapter
    shapes = warmup_shapes(engine.runner.config, engine.runner.spec)
    mixes = [[0] if len(shape) == 1 else [-1, 0] for shape in shapes]
    assert len(mixes) >= 5 and [c["lora"] for c in calls] == [m for mix in mixes for m in (None, mix)]
    num_moe, num_layers = len(engine.runner.model.moe_layers()), engine.spec.num_layers
    assert num_moe > 0 and seen["fused_moe"] == [m for mix in mixes for m in [None] * num_moe + [mix] * num_moe]
    # q/k/v of every layer as one group, and o of every layer
    assert seen["linear_lora"] == [m for mix in mixes for m in [None] * 2 * num_layers + [mix] * 2 * num_layers]


def generate_all(engine, adapters) -> list[list[int]]:
    loras = [None, LoRARequest("t/a", str(adapters[FAMILY]["a"])), LoRARequest("u/b", str(adapters[FAMILY]["b"]))]
    wait_for_adapters(engine, loras)  # resident before the first step: every step's batch is fixed
    runs = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, ignore_eos=True)]  # engine generator
    return [o["token_ids"] for params in runs for o in engine.generate(PROMPTS, params, loras)]


@pytest.mark.parametrize("lora_mode", ["fused", "loop"])
def test_warmup_leaves_kv_blocks_slots_and_outputs_unchanged(checkpoints, adapters, lora_mode):
    cold = make_engine(checkpoints[FAMILY], max_loras=2, lora_mode=lora_mode, **SMALL)
    warm = make_engine(checkpoints[FAMILY], max_loras=2, lora_mode=lora_mode, **SMALL)
    warm.runner.warmup()
    blocks = warm.runner.num_kv_blocks
    assert torch.count_nonzero(warm.runner.kv_cache[:blocks]) == 0  # only the scratch block written
    assert torch.count_nonzero(warm.runner.kv_cache[blocks:]) > 0
    assert list(warm.block_manager.free_block_ids) == list(cold.block_manager.free_block_ids)
    assert warm.stats()["free_kv_blocks"] == cold.stats()["free_kv_blocks"] == blocks
    assert torch.equal(warm.runner.generator.get_state(), cold.runner.generator.get_state())
    assert generate_all(warm, adapters) == generate_all(cold, adapters)


@pytest.mark.gpu
def test_start_up_warms_up_on_cuda_unless_switched_off(checkpoints):
    for flag in (True, False):
        engine = make_engine(checkpoints[FAMILY], max_loras=2, device="cuda", dtype="bfloat16", warmup=flag)
        assert (engine.stats()["warmup_seconds"] > 0) == flag


def test_warmup_reaches_the_mid_sized_base_moe_tiles(checkpoints):
    """With room in the step budget, warm-up prefills land in the 32- and 64-row base tiles."""
    from kernels.moe.launch import _base_block_m
    engine = make_engine(checkpoints[FAMILY], **{**SMALL, "max_num_batched_tokens": 1024, "max_num_seqs": 32})
    spec, longest = engine.spec, engine.config.max_model_len - 1
    shapes = warmup_shapes(engine.runner.config, engine.runner.spec)
    tiles = {_base_block_m(sum(n for _, n in shape) * spec.top_k, spec.num_experts) for shape in shapes}
    assert {16, 32, 64, 128} <= tiles, tiles
    assert all(n <= longest for shape in shapes for _, n in shape)
    calls = record_forwards(engine)
    engine.runner.warmup()
    assert [c["num_tokens"] for c in calls] == [sum(n for _, n in shape) for shape in shapes]


@pytest.mark.parametrize("experts, top_k", [(60, 8), (128, 8), (8, 2)])
def test_no_step_shape_compiles_a_kernel_the_warmup_did_not(monkeypatch, experts, top_k):
    """The Triton specialisations of every step of up to 6 tokens, eager decode steps of 1-16
    sequences, and 120 random prefill / mixed steps (0-16 decodes at contexts
    of 1-601 tokens, 1-4 prefill chunks of up to 2048 tokens in all, some after cached prefixes,
    up to 16 distinct adapters; the Triton prefill attention on; the last 60 with the split path's
    shared-outer launches switched on) are all among those the warm-up compiles, so
    no request waits for the compiler (on an H100, without this, one benchmark case's adapter churn
    compiled 23 kernels while serving). Runs the Triton launchers on CPU with every launch recorded, not run.
    Not covered here: the decode kernel's partition count (always 1 off the GPU, a constexpr
    picked from batch and context on it), so eager decode groups still compile per count."""
    import random

    from engine import EngineConfig, LLMEngine
    from engine.testing.jit_keys import JitKeyRecorder
    monkeypatch.setenv("MOEPLEX_TRITON", "1")
    recorder = JitKeyRecorder()
    with recorder.recording():
        engine = LLMEngine(EngineConfig(
            hf_config=tiny_qwen3_config(experts, top_k), load_format="dummy",
            max_loras=16, max_lora_rank=16, max_num_seqs=64, max_model_len=640, block_size=16,
            max_num_batched_tokens=2048, warmup=False, triton_prefill_attention=True))
        runner = engine.runner
        runner.warmup()
        warm = recorder.take()
        rng = random.Random(0)
        slot = lambda: rng.choice([None] + list(range(16)))  # noqa: E731
        steps = []
        for total in range(1, 7):  # every small step: prefills, decodes and both, with and without adapters
            for decodes in range(total + 1):
                for slots in ([None], [3], [None, 5]):
                    step = [(rng.randint(0, 600), 1, slots[j % len(slots)]) for j in range(decodes)]
                    steps.append(step + ([(0, total - decodes, slots[-1])] if total > decodes else []))
        for decodes in range(1, 17):  # eager decode steps (enforce_eager, or no graph fits)
            steps.append([(rng.randint(0, 600), 1, slot()) for _ in range(decodes)])
        for step in steps:
            scheduled = [dummy_entry(runner, *entry) for entry in step]
            input_ids, batch, rows = runner.prepare(sorted(scheduled, key=lambda e: e[1] > 1))
            runner.model.compute_logits(runner.model(input_ids, batch)[runner._tensor(rows, torch.long)])
        for step in range(120):
            if step == 60:  # a shared-outer adapter packed: the split path's once-a-token launches
                for pool in runner.slot_pools.moe.values():
                    pool.shared_halves = True
            decodes, budget = rng.randint(0, 16), 2048
            scheduled = [dummy_entry(runner, rng.randint(0, 600), 1, slot()) for _ in range(decodes)]
            for _ in range(rng.randint(1, 4)):  # prefill chunks, some after a cached prefix
                done = rng.choice([0, 0, rng.randint(1, 300)])
                n = min(budget - decodes - sum(k for _, k in scheduled[decodes:]), 639 - done,
                        rng.choice([rng.randint(1, 64), rng.randint(1, 639), 2048]))
                if n > 0:
                    scheduled.append(dummy_entry(runner, done, n, slot()))
            input_ids, batch, rows = runner.prepare(scheduled)
            runner.model.compute_logits(runner.model(input_ids, batch)[runner._tensor(rows, torch.long)])
        new = recorder.take() - warm
    assert warm and not new, sorted({key[0] for key in new})
