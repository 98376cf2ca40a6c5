"""The oracle for engine parity tests: transformers (+ PEFT) forwards of a checkpoint.

PEFT's own forward is used where PEFT loads the format (attention and fused
`target_parameters` adapters); the per-expert format of transformers 4.x checkpoints and the
shared-outer format cannot be loaded by PEFT on transformers 5, so they are merged into the
weights here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapter_store.formats import LoRAKey, ModelShape, parse_lora_key, pattern_value, peft_module_name


def load_reference_model(checkpoint_dir, adapter_dir=None, dtype=torch.float32, merge=None):
    """The transformers model of `checkpoint_dir` with the adapter in `adapter_dir` applied.

    `merge=None` picks PEFT's forward when PEFT can load the adapter and merged weights
    otherwise; `merge=True` forces merged weights (to cross-check this module on PEFT).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype).eval()
    if adapter_dir is None:
        return model
    if merge is None:
        merge = adapter_format(adapter_dir) in ("per_expert", "shared_outer")
    if merge:
        merge_adapter_(model, adapter_dir)
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def adapter_format(adapter_dir) -> str:
    """"per_expert", "shared_outer", "fused" or "attn_only", read off the adapter's tensor keys."""
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())  # the header alone: no tensor is read
    if any(k.endswith(("experts.gate_proj.lora_A.weight", "experts.w1.lora_A.weight")) for k in keys):
        return "shared_outer"
    if any(".experts." in k and ".lora_" in k and k.split(".experts.")[1][0].isdigit() for k in keys):
        return "per_expert"
    if any(".experts." in k for k in keys):
        return "fused"
    return "attn_only"


def lora_scale(adapter_config: dict, module_name: str) -> tuple[int, float]:
    """(rank, scaling) PEFT applies to one module: alpha/r, or alpha/sqrt(r) for rsLoRA."""
    r = pattern_value(module_name, adapter_config.get("rank_pattern") or {}, adapter_config["r"])
    alpha = pattern_value(module_name, adapter_config.get("alpha_pattern") or {},
                          adapter_config["lora_alpha"])
    denom = math.sqrt(r) if adapter_config.get("use_rslora") else r
    return r, alpha / denom


@torch.no_grad()
def merge_adapter_(model, adapter_dir) -> None:
    """Add every LoRA delta of `adapter_dir` into `model`'s weights, in place."""
    adapter_dir = Path(adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    shape = ModelShape.from_config(model.config.to_dict())
    pairs: dict[tuple, dict[str, torch.Tensor]] = {}
    names: dict[tuple, str] = {}
    shared: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key, tuple(tensor.shape), shape)
        if parsed.shared:  # [1, r, in] or [1, out, r]: every expert's half of the layer
            shared.setdefault((parsed.layer, parsed.module), {})[parsed.which] = tensor[0]
            continue
        pairs.setdefault(parsed.target + (parsed.fused,), {})[parsed.which] = tensor
        names[parsed.target + (parsed.fused,)] = peft_module_name(key)
    for target, ab in pairs.items():
        ab = {**shared.get(target[:2], {}), **ab}
        rank, scale = lora_scale(adapter_config, names[target])
        key = LoRAKey(target[0], target[1], target[2], "A", fused=target[3])
        _add_delta(model, key, ab["A"].float(), ab["B"].float(), rank, scale, shape)


def _add_delta(model, key: LoRAKey, a, b, rank, scale, shape: ModelShape) -> None:
    layer = model.model.layers[key.layer]
    if key.module.endswith("_proj") and key.expert is None and not key.fused:
        weight = getattr(layer.self_attn, key.module).weight
        weight += (scale * (b @ a)).to(weight.dtype)
        return
    experts = layer.mlp.experts
    inter = shape.intermediate_size
    if key.fused:
        num_experts = shape.num_experts
        a_e = a.reshape(num_experts, rank, -1)  # [E, r, in]: expert-major rows
        b_e = b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1)  # [E, out, r]: rank-major
        delta = scale * (b_e @ a_e)  # [E, out, in]
        param = experts.gate_up_proj if key.module == "gate_up" else experts.down_proj
        param += delta.to(param.dtype)
        return
    delta = scale * (b @ a)  # [out, in]
    if key.module == "down":
        experts.down_proj[key.expert] += delta.to(experts.down_proj.dtype)
    else:
        rows = slice(0, inter) if key.module == "gate" else slice(inter, 2 * inter)
        experts.gate_up_proj[key.expert, rows] += delta.to(experts.gate_up_proj.dtype)


@torch.no_grad()
def reference_logits(model, input_ids: list[int]) -> torch.Tensor:
    """Logits [len(input_ids), vocab] of one sequence in float32."""
    ids = torch.tensor([input_ids], dtype=torch.long)
    return model(input_ids=ids).logits[0].float()
