"""The fixtures make what they claim: loadable checkpoints and adapters in every format."""
import json

import pytest
import torch
from safetensors import safe_open

from engine.testing import (
    FAMILIES,
    adapter_format,
    load_reference_model,
    read_config,
    reference_logits,
)

IDS = [5, 17, 33, 2, 90, 41, 7]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _keys(adapter_dir):
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_reloads_with_transformers(tiny_checkpoint, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tiny_checkpoint(family)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert model.config.model_type == family
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1, "weights should be sharded"
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    text = "Hello world! Mixture of experts."
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    logits = reference_logits(model, IDS)
    assert torch.isfinite(logits).all() and logits.std() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_per_expert_keys_cover_every_expert(tiny_checkpoint, tiny_adapter, family):
    adapter = tiny_adapter(family, "per_expert", rank=4)
    keys = _keys(adapter)
    cfg = read_config(tiny_checkpoint(family))
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    for layer in range(cfg["num_hidden_layers"]):
        for e in range(experts):
            for n in names:
                for ab in "AB":
                    assert f"base_model.model.model.layers.{layer}.{block}.experts.{e}.{n}.lora_{ab}.weight" in keys
    assert adapter_format(adapter) == "per_expert"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["fused", "attn_only"])
def test_peft_formats_load_in_peft_and_change_logits(tiny_checkpoint, tiny_adapter, family, fmt):
    from peft import PeftModel

    ckpt = tiny_checkpoint(family)
    adapter = tiny_adapter(family, fmt, rank=4, use_rslora=fmt == "fused")
    keys = _keys(adapter)
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert any(".experts." in k for k in keys) == (fmt == "fused")
    model = load_reference_model(ckpt, adapter)
    assert isinstance(model, PeftModel)
    base = reference_logits(load_reference_model(ckpt), IDS)
    assert _rel(reference_logits(model, IDS), base) > 0.05


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["fused", "attn_only"])
def test_merged_reference_matches_peft_forward(tiny_checkpoint, tiny_adapter, family, fmt):
    """Our merge code (the per-expert oracle) agrees with PEFT wherever PEFT can judge."""
    ckpt = tiny_checkpoint(family)
    adapter = tiny_adapter(family, fmt, rank=4, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_logits = reference_logits(load_reference_model(ckpt, adapter), IDS)
    merged_logits = reference_logits(load_reference_model(ckpt, adapter, merge=True), IDS)
    assert _rel(merged_logits, peft_logits) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_per_expert_merge_matches_handwritten_expert(tiny_checkpoint, tiny_adapter, family):
    """One expert's MLP, computed by hand from the checkpoint's own per-expert tensors."""
    from safetensors.torch import load_file

    ckpt = tiny_checkpoint(family)
    adapter = tiny_adapter(family, "per_expert", rank=4, use_rslora=True, rank_pattern={"w2|down_proj": 2})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    weights = {}
    for shard in ckpt.glob("model-*.safetensors"):
        weights.update(load_file(str(shard)))
    block, (g, u, d) = (("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral"
                        else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    layer, expert = 1, 3
    prefix = f"model.layers.{layer}.{block}.experts.{expert}."

    def w(name):
        base = weights[prefix + name + ".weight"]
        a, b = lora["base_model.model." + prefix + name + ".lora_A.weight"], lora["base_model.model." + prefix + name + ".lora_B.weight"]
        r = a.shape[0]
        return base + cfg["lora_alpha"] / r ** 0.5 * (b @ a)

    x = torch.randn(3, cfg_hidden(ckpt))
    want = (torch.nn.functional.silu(x @ w(g).T) * (x @ w(u).T)) @ w(d).T
    model = load_reference_model(ckpt, adapter)
    experts = model.model.layers[layer].mlp.experts
    gate, up = (x @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
    got = (torch.nn.functional.silu(gate) * up) @ experts.down_proj[expert].T
    assert _rel(got, want) < 1e-5
    assert lora["base_model.model." + prefix + d + ".lora_A.weight"].shape[0] == 2


def cfg_hidden(ckpt):
    return read_config(ckpt)["hidden_size"]


def test_tiny_model_cli(tmp_path):
    from engine.tiny_model import main

    assert main([str(tmp_path / "m"), "--family", "olmoe", "--adapter", str(tmp_path / "a"), "--format", "fused"]) == 0
    assert (tmp_path / "m" / "config.json").exists()
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
