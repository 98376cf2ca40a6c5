"""Default store limits: versions kept per adapter name, and the largest adapter the store
accepts for a base model.

The largest adapter: one of rank `max_rank` on every module the store accepts (attention q/k/v/o of every
layer and gate/up/down of every expert of every layer; the store accepts no LoRA on dense
MLPs, and none of the supported families has shared experts), saved in float32 because
fp32 exports are common, plus room for the safetensors header and adapter_config.json.
The per-expert layout is the largest one: the fused 3-D layout holds rank*E*(2D + 3I)
values a layer against 3*rank*E*(D + I).
"""
from __future__ import annotations

from adapter_store.formats import ATTENTION_MODULES, EXPERT_MODULES, ModelShape
from adapter_store.safetensors_io import MAX_HEADER_BYTES

# Versions the store keeps of one adapter name; an upload beyond it deletes the oldest
# (AdapterStore.put says why). 16 versions of a 4 GiB adapter are 64 GiB: a bounded quota.
DEFAULT_MAX_VERSIONS_PER_ADAPTER = 16
# The largest rank served by default (AppArgs.max_lora_rank) and so the largest the store and
# its CLI accept by default: an adapter accepted at upload is one the service can load.
DEFAULT_MAX_LORA_RANK = 16

# The largest weight served: fp16's largest value, the narrowest dtype the engine serves in. The
# engine folds lora_alpha / r (or / sqrt(r) with use_rslora) into B; a finite config and finite
# weights can still make that product overflow (lora_alpha = 1e30), and the adapter's requests
# would then fill their KV blocks with Inf and NaN. The store refuses such factors and scales, the
# engine's loader such scales (for adapters stored before the store checked).
MAX_SERVED_WEIGHT = 65504.0

BYTES_PER_PARAM = 4  # float32
HEADER_BYTES_PER_TENSOR = 256  # one safetensors header entry: key, dtype, shape, offsets
FIXED_MARGIN_BYTES = 1 << 20  # adapter_config.json (the store caps it at 1 MiB) and the rest


def max_lora_params(shape: ModelShape, rank: int) -> tuple[int, int]:
    """(parameters, tensors) of a rank-`rank` adapter on every module the store accepts."""
    params_per_layer = tensors_per_layer = 0
    for module in ATTENTION_MODULES:
        params_per_layer += rank * sum(shape.io_features(module))
        tensors_per_layer += 2
    for module in EXPERT_MODULES:
        params_per_layer += shape.num_experts * rank * sum(shape.io_features(module))
        tensors_per_layer += 2 * shape.num_experts
    return shape.num_layers * params_per_layer, shape.num_layers * tensors_per_layer


def default_max_adapter_bytes(base_config: dict, max_rank: int) -> int:
    """Bytes of the largest adapter of rank <= `max_rank` for the base model's config.json.

    4 bytes a parameter, plus 1% and 1 MiB, plus a safetensors header entry a tensor.
    Raises ValueError when the config is not of a supported family.
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    params, tensors = max_lora_params(ModelShape.from_config(base_config), max_rank)
    payload = BYTES_PER_PARAM * params
    return payload + payload // 100 + HEADER_BYTES_PER_TENSOR * tensors + FIXED_MARGIN_BYTES


def max_header_bytes(shape: ModelShape) -> int:
    """Bound of an adapter's safetensors header for the base model `shape`, checked before
    the header is parsed (parsing JSON costs ~10x its size in memory): an entry a tensor
    the store accepts plus FIXED_MARGIN_BYTES for `__metadata__`, at most MAX_HEADER_BYTES."""
    _, tensors = max_lora_params(shape, 1)
    return min(MAX_HEADER_BYTES, HEADER_BYTES_PER_TENSOR * tensors + FIXED_MARGIN_BYTES)
