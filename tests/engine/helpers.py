"""What the engine tests share: a small engine, one step's logits, adapters made resident.

The checkpoints and adapters themselves are session fixtures (tests/conftest.py, and
`checkpoints` / `adapters` in tests/engine/conftest.py).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
MIXED_PROMPTS = [PROMPTS[0], [50, 51, 52, 53], PROMPTS[1], list(range(60, 73)), PROMPTS[2]]


def make_engine(ckpt, **kw) -> LLMEngine:
    """An engine on `ckpt` with small defaults (no adapters, 4-token blocks); kw overrides them."""
    args = dict(model=ckpt, max_loras=0, block_size=4, max_model_len=64, max_num_seqs=8)
    return LLMEngine(EngineConfig(**{**args, **kw}))


def run_to_end(engine: LLMEngine) -> dict[str, list]:
    """Step until nothing is left: each request id's outputs in order."""
    outputs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def step_logits(engine: LLMEngine, prompts, loras=None, tenants=None) -> list[torch.Tensor]:
    """Schedule all prompts into one step; return each sequence's logits at every position."""
    loras = loras or [None] * len(prompts)
    tenants = tenants or [None] * len(prompts)
    for i, (p, lora_request, tenant) in enumerate(zip(prompts, loras, tenants)):
        engine.add_request(f"s{i}", p, SamplingParams(max_tokens=1, temperature=0), lora=lora_request,
                           tenant=tenant)
    sched = engine.scheduler.schedule()
    assert sorted(seq.request_id for seq, _ in sched.scheduled) == sorted(f"s{i}" for i in range(len(prompts)))
    assert all(n == seq.num_prompt_tokens for seq, n in sched.scheduled), "whole prompts in one step"
    logits = engine.runner.execute(sched.scheduled, all_logits=True).logits
    parts = logits.split([n for _, n in sched.scheduled])
    by_id = {seq.request_id: part for (seq, _), part in zip(sched.scheduled, parts)}
    return [by_id[f"s{i}"] for i in range(len(prompts))]


def assert_close(mine: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs error within rel x the reference's largest magnitude."""
    err = (mine - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max abs error {err} vs scale {ref.abs().max().item()}"


def lora(adapters, family: str, name: str) -> LoRARequest:
    """The request of tenant-{name}'s adapter `name` ("a", "b" or "c" of the `adapters` fixture)."""
    return LoRARequest(f"tenant-{name}/ad@v1", str(adapters[family][name]))


def wait_for_adapters(engine: LLMEngine, requests) -> None:
    """Load adapters into slots ahead of the measured step (host loads run on threads)."""
    pending = [r for r in requests if r is not None]
    while pending:
        r = pending[0]
        slot = engine.lora_manager.reserve(r.lora_name, r.lora_path)
        if slot is None:
            time.sleep(0.01)
            continue
        while not engine.lora_manager.is_ready(slot):  # on CUDA the slot copy runs on a side stream
            time.sleep(0.01)
        engine.lora_manager.release(slot)
        pending.pop(0)


def static_engine(ckpt, **kw) -> LLMEngine:
    """An engine whose decode steps go through DecodeGraphs' padded static buffers, run eagerly
    (use_graphs=False), so the graph path's inputs are exercised on CPU."""
    from engine.cuda_graphs import DecodeGraphs
    engine = make_engine(ckpt, max_num_seqs=5, **kw)
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, 5, engine.config.max_model_len, engine.config.block_size,
                                 runner.num_kv_blocks * engine.config.block_size,
                                 runner.slot_pools is not None, runner.device, use_graphs=False)
    runner.graphs.capture_all()
    return engine


def tiny_qwen3_config(num_experts: int, top_k: int, num_layers: int = 1):
    """A Qwen3-MoE HF config of small widths and any expert count, for load_format="dummy"."""
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=num_experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=40960,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def interpreter_scripts(script: str, argvs: list[list[str]], timeout: int = 900) -> list[dict]:
    """Runs `python -c script *argv` for each argv at once, on the Triton interpreter (MOEPLEX_TRITON /
    TRITON_INTERPRET must be set before triton loads, hence a process each); returns the JSON object
    each printed last. At once: each is one core's work, and the test process only waits."""
    from tests.kernels.interp import run_processes
    env = {**os.environ, "MOEPLEX_TRITON": "1", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    outs = run_processes([([sys.executable, "-c", script, *argv], env) for argv in argvs], timeout)
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]
