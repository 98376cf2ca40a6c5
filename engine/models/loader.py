"""Build an MoECausalLM and fill it from HF safetensors (either expert layout) or dummy weights."""
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from engine.errors import EngineError
from engine.models.moe_lm import MoECausalLM
from engine.models.spec import ModelSpec
from engine.parallel.shard import SINGLE, Shard

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_EXPERT_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up",
                "down_proj": "down", "w2": "down"}


def map_checkpoint_key(key: str) -> tuple[str, str | None, int | None] | None:
    """HF key -> (our parameter name, part of a stacked expert tensor or None, expert index)."""
    top = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head"}
    if key in top:
        return top[key], None, None
    m = _LAYER.match(key)
    if m is None:
        return None
    prefix, rest = f"layers.{m.group(1)}.", m.group(2).replace("block_sparse_moe.", "mlp.")
    if rest == "mlp.gate.weight":
        return prefix + "mlp.router", None, None
    if rest == "mlp.experts.gate_up_proj":
        return prefix + "mlp.w_gate_up", None, None
    if rest == "mlp.experts.down_proj":
        return prefix + "mlp.w_down", None, None
    e = _EXPERT.match(rest.removeprefix("mlp."))
    if e is not None:
        part = _EXPERT_PART[e.group(2)]
        return prefix + ("mlp.w_down" if part == "down" else "mlp.w_gate_up"), part, int(e.group(1))
    if "rotary_emb" in rest:
        return None
    return prefix + rest, None, None


def _copy_into(param: Tensor, src: Tensor, part: str | None, expert: int | None) -> None:
    if part is None:
        target = param
    elif part == "down":
        target = param[expert]
    else:
        half = param.shape[1] // 2
        target = param[expert, :half] if part == "gate" else param[expert, half:]
    if tuple(target.shape) != tuple(src.shape):
        raise EngineError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit "
                          f"parameter of shape {tuple(target.shape)}: config.json and weights disagree")
    target.copy_(src)


def _materialise(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace meta parameters by empty ones of the target dtype on the device (no fp32 detour)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            dim = module.inv_freq.numel() * 2
            theta = model.spec.rope_theta
            module.inv_freq.copy_(1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)))


def _load_safetensors(model: MoECausalLM, model_dir: Path) -> None:
    """Fill the model from the checkpoint; a rank of a multi-GPU replica reads only its part of
    each tensor (engine.parallel.slicing) and checks that its part is complete."""
    from engine.parallel.slicing import read_slice

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{model_dir} has no *.safetensors files (pickled weights are not loaded)")
    params = dict(model.named_parameters())
    device = str(model.embed_tokens.device)  # safetensors reads straight onto the device
    written: dict[str, int] = {}  # elements written per parameter: experts arrive one by one
    for path in files:
        with safe_open(str(path), framework="pt", device=device) as f:
            for key in f.keys():
                mapped = map_checkpoint_key(key)
                if mapped is None:
                    continue
                name, part, expert = mapped
                if name == "lm_head" and model.lm_head is None:
                    continue  # tied embeddings: some checkpoints still store the copy
                if name not in params:
                    raise EngineError(f"checkpoint key {key!r} has no place in a {model.spec.family} model")
                tensor, expert = read_slice(f, key, name, part, expert, model.shard, model.spec)
                if tensor is None:
                    continue  # another rank's expert
                param = params[name]
                _copy_into(param, tensor.to(param.dtype), part, expert)
                written[name] = written.get(name, 0) + tensor.numel()
    missing = sorted(name for name, param in params.items() if written.get(name, 0) < param.numel())
    if missing:
        raise EngineError(f"checkpoint {model_dir} lacks weights for {missing[:5]} (and {len(missing)} in all)")


def _fill_dummy(model: MoECausalLM, seed: int) -> None:
    gen = torch.Generator(device=model.embed_tokens.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)


@torch.no_grad()
def load_model(spec: ModelSpec, model_dir: Path | None, device: torch.device, dtype: torch.dtype,
               load_format: str = "auto", seed: int = 0, shard: Shard = SINGLE) -> MoECausalLM:
    """The model, or rank shard.rank's part of it (dummy weights: each rank draws its own)."""
    shard.check(spec)
    with torch.device("meta"):
        model = MoECausalLM(spec, shard)
    _materialise(model, device, dtype)
    if load_format == "dummy":
        _fill_dummy(model, seed + shard.rank)
    else:
        _load_safetensors(model, Path(model_dir))
    for attention in model.attention_layers():
        attention.fuse_qkv()
    return model.eval()
