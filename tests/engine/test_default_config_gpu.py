"""The DEFAULT EngineConfig on CUDA (memory-sized adapter slots, prefill and decode graphs, Triton
prefill attention) generates the tokens of the same engine run eagerly with gather + SDPA.

The checkpoint is the bf16-exact one with every token routed to all experts (conftest.bf16_models),
so a bf16 rounding cannot flip an expert choice between the two attention paths."""
import gc

import pytest
import torch

from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

pytestmark = pytest.mark.gpu

# 5 and 9 tokens, then past the smallest graph bucket (32): 33, 70 and 150 tokens
LENGTHS = (5, 33, 9, 70, 150, 40)


def _generate(engine: LLMEngine, loras: list) -> tuple[list[list[int]], int]:
    """Greedy tokens per prompt, and how many steps replayed prefill graphs."""
    vocab = engine.spec.vocab_size
    prompts = [[(7 * i + 3 * n) % vocab for i in range(n)] for n in LENGTHS]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    graph_steps = []
    if engine.runner.prefill_graphs is not None:
        run = engine.runner.prefill_graphs.run
        engine.runner.prefill_graphs.run = lambda inputs, feed=None: graph_steps.append(1) or run(inputs, feed)
    return [o["token_ids"] for o in engine.generate(prompts, params, loras)], len(graph_steps)


def test_gpu_default_config_generates_the_eager_tokens(bf16_models):
    ckpt, adapters = bf16_models["qwen3_moe"]
    a, b = (LoRARequest(f"tenant-{n}/ad@v1", str(adapters[n])) for n in "ab")
    loras = [None, a, b, a, None, b]
    default = LLMEngine(EngineConfig(model=ckpt, device="cuda", dtype="bfloat16"))
    assert default.runner.memory_plan.num_slots >= 1
    assert default.runner.prefill_graphs is not None and default.runner.graphs is not None
    assert default.config.triton_prefill_attention and default.config.max_loras is None
    tokens, graph_steps = _generate(default, loras)
    assert graph_steps > 0
    del default
    gc.collect()
    torch.cuda.empty_cache()
    eager = LLMEngine(EngineConfig(model=ckpt, device="cuda", dtype="bfloat16", enforce_eager=True,
                                   prefill_graphs=False, triton_prefill_attention=False))
    assert eager.runner.prefill_graphs is None and eager.runner.graphs is None
    expected, _ = _generate(eager, loras)
    assert tokens == expected and all(len(t) == 12 for t in tokens)
