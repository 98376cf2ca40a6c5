"""Real PEFT LoRA adapters for the tiny checkpoints, in every format DESIGN.md lists.

- "attn_only": PEFT `get_peft_model(...).save_pretrained` on q/k/v/o.
- "fused": PEFT with `target_parameters` on the 3-D experts (transformers 5.x), plus
  q/k/v/o when `attention` is set.
- "per_expert": the key layout of transformers 4.x checkpoints
  (`mlp.experts.{e}.gate_proj|up_proj|down_proj`, Mixtral `block_sparse_moe.experts.{e}.w1|w3|w2`),
  written directly with safetensors (PEFT on transformers 5 cannot produce it).
- "shared_outer": as Megatron-Bridge exports shared-outer expert LoRA: one lora_A [1, r, D]
  per layer for gate and for up (the same values: Megatron trains one A for fc1), one down
  lora_B [1, D, r] per layer, and per expert gate/up lora_B and down lora_A (2-D).

A and B are random and non-zero (PEFT starts B at zero; we overwrite it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapter_store.formats import ATTENTION_MODULES, ModelShape, pattern_value
from engine.testing.checkpoints import read_config

FORMATS = ("per_expert", "shared_outer", "fused", "attn_only")
_PER_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "olmoe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
_FUSED_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_peft_adapter(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    rank: int = 8,
    fmt: str = "per_expert",
    alpha: float = 16,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    attention: bool = True,
    seed: int = 0,
    std: float = 0.2,
    bf16_exact: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter for the checkpoint in `checkpoint_dir`; return `out_dir`.

    `std` is the spread of B's entries (A's is 1/sqrt(fan_in)); `bf16_exact` rounds A and B
    to bf16 values (stored as float32) for bf16 parity tests.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown adapter format {fmt!r}; expected one of {FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    opts = dict(bf16_exact=bf16_exact, rank=rank, alpha=alpha, use_rslora=use_rslora,
                rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    if fmt in ("per_expert", "shared_outer"):
        _write_per_expert(checkpoint_dir, out, gen, std, attention, shared_outer=fmt == "shared_outer",
                          **opts)
    else:
        _write_with_peft(checkpoint_dir, out, gen, std, fmt, attention, **opts)
    return out


def _write_with_peft(checkpoint_dir, out, gen, std, fmt, attention, rank, alpha, use_rslora,
                     rank_pattern, alpha_pattern, bf16_exact):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
    target_modules = list(ATTENTION_MODULES) if (attention or fmt == "attn_only") else []
    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=use_rslora, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, target_modules=target_modules or None,
        target_parameters=_FUSED_PARAMS if fmt == "fused" else None, lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                fan_in = param.shape[1]
                scale = std if "lora_B" in name else fan_in ** -0.5
                param.copy_(_random(param.shape, gen, scale, bf16_exact))
    peft_model.save_pretrained(str(out))


def _write_per_expert(checkpoint_dir, out, gen, std, attention, rank, alpha, use_rslora,
                      rank_pattern, alpha_pattern, bf16_exact, shared_outer=False):
    config = read_config(checkpoint_dir)
    shape = ModelShape.from_config(config)
    block, names = _PER_EXPERT_NAMES[shape.family]
    tensors = {}
    for layer in range(shape.num_layers):
        prefix = f"base_model.model.model.layers.{layer}."
        if attention:
            for module in ATTENTION_MODULES:
                _add_pair(tensors, prefix + f"self_attn.{module}", shape.io_features(module),
                          rank, rank_pattern, gen, std, bf16_exact)
        for expert in range(shape.num_experts):
            for canon, name in names.items():
                _add_pair(tensors, prefix + f"{block}.experts.{expert}.{name}",
                          shape.io_features(canon), rank, rank_pattern, gen, std, bf16_exact)
        if shared_outer:
            _share_outer(tensors, prefix + f"{block}.experts.", names, shape.num_experts)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    targets = (list(ATTENTION_MODULES) if attention else []) + list(names.values())
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "use_rslora": use_rslora, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": targets, "target_parameters": None, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "base_model_name_or_path": str(checkpoint_dir), "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def _share_outer(tensors, experts_prefix, names, num_experts):
    """Replace expert 0's gate A and down B by the layer's shared tensors ([1, ...]; up's A is
    gate's) and drop every expert's own copy of those halves."""
    gate_a = tensors[f"{experts_prefix}0.{names['gate']}.lora_A.weight"]
    down_b = tensors[f"{experts_prefix}0.{names['down']}.lora_B.weight"]
    for expert in range(num_experts):
        for canon, side in (("gate", "A"), ("up", "A"), ("down", "B")):
            del tensors[f"{experts_prefix}{expert}.{names[canon]}.lora_{side}.weight"]
    tensors[f"{experts_prefix}{names['gate']}.lora_A.weight"] = gate_a[None].clone()
    tensors[f"{experts_prefix}{names['up']}.lora_A.weight"] = gate_a[None].clone()
    tensors[f"{experts_prefix}{names['down']}.lora_B.weight"] = down_b[None].clone()


def _add_pair(tensors, module_path, io, rank, rank_pattern, gen, std, bf16_exact):
    in_f, out_f = io
    r = pattern_value(module_path.removeprefix("base_model.model."), rank_pattern, rank)
    tensors[module_path + ".lora_A.weight"] = _random((r, in_f), gen, in_f ** -0.5, bf16_exact)
    tensors[module_path + ".lora_B.weight"] = _random((out_f, r), gen, std, bf16_exact)


def _random(shape, gen, scale, bf16_exact):
    values = torch.randn(shape, generator=gen) * scale
    return values.to(torch.bfloat16).float() if bf16_exact else values
