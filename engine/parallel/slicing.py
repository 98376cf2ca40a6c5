"""Cut checkpoint tensors and adapters to one rank's part (engine.parallel.shard has the table).

`read_slice` reads only the rank's part of a safetensors tensor (a slice of the file, not the
whole tensor); `shard_adapter` cuts a loaded adapter's factors the way the model's weights are
cut, so the rank's LoRA pools (sized from its own weights) take it as they take a whole one.
"""
import re

import torch
from torch import Tensor

from engine.lora.adapter import LoRAAdapter, LoRAFactors
from engine.models.spec import ModelSpec
from engine.parallel.shard import Shard

_ATTN = re.compile(r"^layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)\.(weight|bias)$")
_DENSE_MLP = re.compile(r"^layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def _rows(lo: int, n: int) -> slice:
    return slice(lo, lo + n)


def read_slice(tensors, key: str, name: str, part: str | None, expert: int | None, shard: Shard,
               spec: ModelSpec) -> tuple[Tensor | None, int | None]:
    """(this rank's part of checkpoint tensor `key`, the expert's local index) where `name`,
    `part` and `expert` are where it goes (engine.models.loader.map_checkpoint_key); None when
    the rank holds none of it (another rank's expert). `tensors` is an open safe_open file."""
    if shard.size == 1:
        return tensors.get_tensor(key), expert
    sl = tensors.get_slice(key)
    dh = spec.head_dim
    if name == "lm_head":
        return sl[_rows(*shard.vocab(spec.vocab_size))], None
    m = _ATTN.match(name)
    if m is not None:
        return _attention_slice(sl, m.group(1), m.group(2), shard, spec, dh), None
    m = _DENSE_MLP.match(name)
    if m is not None:
        lo, n = shard.dense_inter(spec.intermediate_size)
        return (sl[:, lo:lo + n] if m.group(1) == "down_proj" else sl[lo:lo + n]), None
    if name.endswith("mlp.w_gate_up") or name.endswith("mlp.w_down"):
        return _expert_slice(sl, name.endswith("w_down"), part, expert, shard, spec)
    return sl[:], expert


def _attention_slice(sl, module: str, kind: str, shard: Shard, spec: ModelSpec, dh: int) -> Tensor:
    q_heads, kv_heads = shard.heads(spec.num_heads), shard.heads(spec.num_kv_heads)
    if module == "o_proj":
        if kind == "bias":  # added once: by rank 0, in the all-reduce of o's output
            bias = sl[:]
            return bias if shard.rank == 0 or shard.tp == 1 else torch.zeros_like(bias)
        return sl[:, q_heads[0] * dh:(q_heads[0] + q_heads[1]) * dh]
    if module in ("q_norm", "k_norm") and spec.qk_norm != "full":  # one [Dh] weight for every head
        return sl[:]
    first, count = q_heads if module in ("q_proj", "q_norm") else kv_heads
    return sl[first * dh:(first + count) * dh]


def _expert_slice(sl, down: bool, part: str | None, expert: int | None, shard: Shard,
                  spec: ModelSpec) -> tuple[Tensor | None, int | None]:
    e0, ne = shard.experts(spec.num_experts)
    i0, ni = shard.expert_inter(spec.moe_intermediate_size)
    inter = spec.moe_intermediate_size
    if part is None:  # a fused [E, 2I, D] or [E, D, I] tensor
        experts = slice(e0, e0 + ne)
        if down:
            return sl[experts, :, i0:i0 + ni], None
        if ni == inter:
            return sl[experts], None
        return torch.cat([sl[experts, i0:i0 + ni], sl[experts, inter + i0:inter + i0 + ni]], dim=1), None
    if not e0 <= expert < e0 + ne:
        return None, None
    local = expert - e0
    return (sl[:, i0:i0 + ni] if down else sl[i0:i0 + ni]), local


def shard_adapter(adapter: LoRAAdapter, shard: Shard, spec: ModelSpec) -> LoRAAdapter:
    """This rank's part of an unpacked adapter: q/k/v B rows of its heads, o A columns of its
    heads, experts of its span (ep) or each expert's intermediate (tp: gate/up B rows, down A
    columns). A whole adapter for one rank."""
    if shard.size == 1:
        return adapter
    dh = spec.head_dim
    dense = {}
    for (layer, module), f in adapter.dense.items():
        if module == "o_proj":
            h0, nh = shard.heads(spec.num_heads)
            dense[(layer, module)] = LoRAFactors(f.a[:, h0 * dh:(h0 + nh) * dh].contiguous(), f.b)
        else:
            h0, nh = shard.heads(spec.num_heads if module == "q_proj" else spec.num_kv_heads)
            dense[(layer, module)] = LoRAFactors(f.a, f.b[h0 * dh:(h0 + nh) * dh].contiguous())
    e0, ne = shard.experts(spec.num_experts)
    i0, ni = shard.expert_inter(spec.moe_intermediate_size)
    moe = {}
    for (layer, module), f in adapter.moe.items():
        a, b = f.a[e0:e0 + ne], f.b[e0:e0 + ne]
        if module == "down":
            a = a[:, :, i0:i0 + ni]
        else:
            b = b[:, i0:i0 + ni]
        moe[(layer, module)] = LoRAFactors(a.contiguous(), b.contiguous(), f.shared)
    return LoRAAdapter(adapter.name, dense, moe)
