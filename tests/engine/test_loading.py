"""Checkpoint loading: fused expert layout, dummy weights, bad checkpoints; adapter refusals."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import AdapterLoadError, EngineConfig, EngineError, LLMEngine, LoRARequest, SamplingParams
from engine.lora.adapter import load_adapter
from tests.engine.helpers import PROMPTS, make_engine, step_logits


def fuse_experts(src, dst, num_experts: int, block: str = "mlp", names=("gate_proj", "up_proj", "down_proj")):
    """Rewrite a per-expert checkpoint in transformers 5's fused layout ([E, 2I, D] / [E, D, I])."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for layer in {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")}:
        p = f"model.layers.{layer}.{block}.experts"
        pick = lambda n: [tensors.pop(f"{p}.{e}.{n}.weight") for e in range(num_experts)]  # noqa: E731
        gate, up, down = (pick(n) for n in names)
        out = f"model.layers.{layer}.mlp.experts"
        tensors[f"{out}.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(gate, up)])
        tensors[f"{out}.down_proj"] = torch.stack(down)
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = tensors.pop(f"model.layers.{layer}.{block}.gate.weight")
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_expert_layout_loads_to_the_same_model(family, checkpoints, tmp_path):
    src = checkpoints[family]
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    fused = fuse_experts(src, tmp_path / "fused", 6, "block_sparse_moe" if family == "mixtral" else "mlp", names)
    a, b = step_logits(make_engine(src), PROMPTS), step_logits(make_engine(fused), PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe"])
def test_dummy_weights_need_no_files(family, checkpoints):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(checkpoints[family])
    engine = LLMEngine(EngineConfig(hf_config=config, load_format="dummy", max_loras=0, max_model_len=64))
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out["token_ids"]) == 4 and engine.tokenizer is None
    assert engine.runner.model.embed_tokens.std().item() == pytest.approx(0.02, rel=0.2)


def test_bad_checkpoints_raise_engine_errors(checkpoints, tmp_path):
    with pytest.raises(EngineError, match="config.json"):
        LLMEngine(EngineConfig(model=tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["qwen3_moe"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": 40}))
    with pytest.raises(EngineError, match="do not fit|disagree"):
        LLMEngine(EngineConfig(model=broken, max_loras=0))
    for f in broken.glob("*.safetensors"):
        f.unlink()
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match="safetensors"):
        LLMEngine(EngineConfig(model=broken, max_loras=0))


def test_adapter_refusals(checkpoints, adapters, tmp_path):
    engine = make_engine(checkpoints["qwen3_moe"], max_loras=1, max_lora_rank=8)
    spec, good = engine.spec, adapters["qwen3_moe"]["c"]
    with pytest.raises(AdapterLoadError, match="max_lora_rank"):
        load_adapter("c", good, spec, torch.float32, max_rank=8)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickled"):
        load_adapter("p", pickled, spec, torch.float32, max_rank=16)
    alien = tmp_path / "alien"
    alien.mkdir()
    shutil.copy(good / "adapter_config.json", alien)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}, str(alien / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="lm_head"):
        load_adapter("x", alien, spec, torch.float32, max_rank=16)
    # stored before the store bounded it: a scale fp16 cannot hold is refused at load, not served as Inf
    overflowing = shutil.copytree(good, tmp_path / "overflowing")
    config = json.loads((overflowing / "adapter_config.json").read_text())
    (overflowing / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e30}))
    with pytest.raises(AdapterLoadError, match="65504"):
        load_adapter("o", overflowing, spec, torch.float32, max_rank=16)


def test_slots_bound_distinct_adapters_per_step(checkpoints, adapters):
    engine = make_engine(checkpoints["olmoe"], max_loras=2, max_lora_rank=16)
    names = ["a", "b", "c", "a", "b", "c"]
    loras = [LoRARequest(f"t{n}/{n}", str(adapters["olmoe"][n])) for n in names]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i, lora in enumerate(loras):
        engine.add_request(f"r{i}", PROMPTS[i % 3], params, lora)
    seen, done = 0, 0
    while engine.has_unfinished_requests():
        done += sum(o.finished for o in engine.step())
        assert engine.last_step["num_adapters"] <= 2
        seen = max(seen, engine.last_step["num_adapters"])
    stats = engine.stats()
    assert done == 6 and seen == 2 and stats["lora_slot_loads"] >= 3 and stats["lora_evictions"] >= 1


def test_misshapen_adapter_fails_only_its_request(checkpoints, adapters, tmp_path):
    """A tensor that does not fit the base model is refused at load, not found by the slot copy
    mid-step (which would fail every request in the batch)."""
    bad = tmp_path / "bad"
    shutil.copytree(adapters["qwen3_moe"]["a"], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    engine = make_engine(checkpoints["qwen3_moe"], max_loras=2, max_lora_rank=16)
    with pytest.raises(AdapterLoadError, match="q_proj.*lora_A"):
        load_adapter("bad", bad, engine.spec, torch.float32, max_rank=16)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    base, failed = engine.generate(PROMPTS[:2], params, [None, LoRARequest("t/bad", str(bad))])
    alone = make_engine(checkpoints["qwen3_moe"]).generate(PROMPTS[:1], params)[0]
    assert base["token_ids"] == alone["token_ids"] and base["finish_reason"] == "length"
    assert failed["finish_reason"] == "abort" and isinstance(failed["error"], AdapterLoadError)


def test_checkpoint_missing_one_expert_is_refused(checkpoints, tmp_path):
    """Experts arrive one tensor each: a checkpoint that lacks one is an error, not zeros."""
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "one-expert-short"
    shutil.copytree(checkpoints["qwen3_moe"], broken)
    for shard in broken.glob("*.safetensors"):
        tensors = load_file(str(shard))
        kept = {k: v for k, v in tensors.items() if ".mlp.experts.3.up_proj." not in k}
        if len(kept) < len(tensors):
            save_file(kept, str(shard), metadata={"format": "pt"})
    with pytest.raises(EngineError, match="lacks weights"):
        LLMEngine(EngineConfig(model=broken, max_loras=0))


def test_an_adapter_load_gives_the_gil_up_every_few_tensors(checkpoints, adapters, monkeypatch):
    """A load runs in a thread of the step loop's process: it must yield the GIL between its
    many small steps (engine.lora.adapter._yielding), not only when the interpreter forces it."""
    import engine.lora.adapter as loader
    from safetensors import safe_open
    path = adapters["qwen3_moe"]["a"]  # per-expert: a tensor per expert, factor and module
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        num_tensors = len(list(f.keys()))
    yields = []
    real_sleep = loader.time.sleep
    monkeypatch.setattr(loader.time, "sleep", lambda s: (yields.append(s), real_sleep(s)))
    spec = make_engine(checkpoints["qwen3_moe"]).spec
    load_adapter("a", path, spec, torch.float32, 16)
    # reading the tensors and grouping them into pairs each yield every YIELD_EVERY tensors
    assert yields.count(0) >= 2 * num_tensors // loader.YIELD_EVERY > 0
