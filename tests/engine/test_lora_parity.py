"""Mixed-tenant LoRA batches against transformers + PEFT (or merged weights), per family."""
import pytest
import torch

from engine.testing import FAMILIES
from engine.testing.reference import load_reference_model, reference_logits
from tests.engine.helpers import (MIXED_PROMPTS, PROMPTS, assert_close, lora, make_engine, step_logits,
                                  wait_for_adapters)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_step_matches_reference_per_sequence(family, checkpoints, adapters):
    """One step: two base sequences and three tenants (per-expert r4, fused rsLoRA r8, fused r16
    with rank/alpha patterns); every sequence's logits equal its own reference model's."""
    ckpt = checkpoints[family]
    names = [None, "a", None, "b", "c"]
    engine = make_engine(ckpt, max_loras=4, max_lora_rank=16)
    requests = [None if n is None else lora(adapters, family, n) for n in names]
    wait_for_adapters(engine, requests)
    logits = step_logits(engine, MIXED_PROMPTS, requests)
    for mine, prompt, name in zip(logits, MIXED_PROMPTS, names):
        ref = load_reference_model(ckpt, None if name is None else adapters[family][name])
        expected = reference_logits(ref, prompt)
        assert_close(mine, expected)
        if name is not None:  # the adapter really changes the output
            assert (expected - reference_logits(load_reference_model(ckpt), prompt)).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_base_sequences_bitwise_equal_with_and_without_adapters_loaded(family, checkpoints, adapters):
    """Adapters resident in every slot do not change a base batch by a single bit."""
    ckpt = checkpoints[family]
    loaded = make_engine(ckpt, max_loras=3, max_lora_rank=16)
    wait_for_adapters(loaded, [lora(adapters, family, n) for n in "abc"])
    assert len(loaded.lora_manager.resident()) == 3
    with_slots = step_logits(loaded, MIXED_PROMPTS)
    plain = step_logits(make_engine(ckpt, max_loras=0), MIXED_PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(with_slots, plain))


@pytest.mark.parametrize("family", FAMILIES)
def test_base_sequences_unperturbed_by_neighbours_adapters(family, checkpoints, adapters):
    """Base sequences next to adapter sequences are bitwise equal to a batch without adapters
    (rule 3), although the neighbours' adapters change which experts their tokens use."""
    ckpt = checkpoints[family]
    with_lora = make_engine(ckpt, max_loras=4, max_lora_rank=16)
    requests = [None, lora(adapters, family, "a"), None, lora(adapters, family, "b"), None]
    wait_for_adapters(with_lora, requests)
    tenants = ["", "tenant-a", "", "tenant-b", ""]  # same tenants -> same batch order in both runs
    mixed = step_logits(with_lora, MIXED_PROMPTS, requests)
    plain = step_logits(make_engine(ckpt, max_loras=0), MIXED_PROMPTS, tenants=tenants)
    for i, r in enumerate(requests):
        if r is None:
            assert torch.equal(mixed[i], plain[i])
        else:
            assert not torch.allclose(mixed[i], plain[i], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_evicted_and_reloaded_adapter_gives_same_logits(family, checkpoints, adapters):
    engine = make_engine(checkpoints[family], max_loras=1, max_lora_rank=16)
    a, b = lora(adapters, family, "a"), lora(adapters, family, "c")
    runs = []
    for req in (a, b, a):
        wait_for_adapters(engine, [req])
        runs.append(step_logits(engine, [PROMPTS[0]], [req])[0])
        engine.abort("s0")
    assert engine.lora_manager.stats.evictions == 2
    assert torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_adapter_matches_reference_generate(family, checkpoints, adapters):
    ckpt = checkpoints[family]
    engine = make_engine(ckpt, max_loras=2, max_lora_rank=16)
    from engine import SamplingParams
    reqs = [lora(adapters, family, "b"), None, lora(adapters, family, "a")]
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), reqs)
    for prompt, out, name in zip(PROMPTS, outs, ["b", None, "a"]):
        ref = load_reference_model(ckpt, None if name is None else adapters[family][name])
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                                do_sample=False)[0, len(prompt):].tolist()
        assert out["token_ids"] == expected


def test_per_adapter_loop_baseline_matches_virtual_experts(checkpoints, adapters):
    """lora_mode="loop" (the benchmark's baseline) computes the same logits as the fused path."""
    ckpt = checkpoints["qwen3_moe"]
    requests = [None, lora(adapters, "qwen3_moe", "a"), None, lora(adapters, "qwen3_moe", "b"), None]
    results = []
    for mode in ("fused", "loop"):
        engine = make_engine(ckpt, max_loras=4, max_lora_rank=16, lora_mode=mode)
        wait_for_adapters(engine, requests)
        results.append(step_logits(engine, MIXED_PROMPTS, requests))
    for fused, loop in zip(*results):
        assert_close(loop, fused, rel=1e-5)
