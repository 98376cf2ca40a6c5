"""Key parsing shared by the store's validation and the engine's loader."""
import pytest

from adapter_store.formats import (
    LoRAKey,
    ModelShape,
    UnknownKeyError,
    expected_shape,
    parse_lora_key,
)

QWEN = ModelShape("qwen3_moe", num_layers=2, hidden_size=32, intermediate_size=24, num_experts=6,
                  num_heads=4, num_kv_heads=2, head_dim=8)
MIXTRAL = ModelShape("mixtral", **{f: getattr(QWEN, f) for f in QWEN.__dataclass_fields__ if f != "family"})
P = "base_model.model.model.layers."


@pytest.mark.parametrize("key,shape,want", [
    (P + "1.self_attn.k_proj.lora_A.weight", (4, 32), LoRAKey(1, "k_proj", None, "A")),
    (P + "0.mlp.experts.5.up_proj.lora_B.weight", (24, 4), LoRAKey(0, "up", 5, "B")),
    (P + "0.mlp.experts.base_layer.lora_A.weight", (24, 32), LoRAKey(0, "gate_up", None, "A", True)),
    (P + "0.mlp.experts.lora_A.weight", (24, 24), LoRAKey(0, "down", None, "A", True)),
    (P + "0.mlp.experts.lora_B.weight", (48, 24), LoRAKey(0, "gate_up", None, "B", True)),
])
def test_qwen_keys(key, shape, want):
    assert parse_lora_key(key, shape, QWEN) == want


def test_mixtral_names_map_to_canonical_modules():
    key = P + "1.block_sparse_moe.experts.2.w3.lora_A.weight"
    assert parse_lora_key(key, (4, 32), MIXTRAL) == LoRAKey(1, "up", 2, "A")
    with pytest.raises(UnknownKeyError):
        parse_lora_key(key, (4, 32), QWEN)  # Mixtral names on a Qwen3 model


@pytest.mark.parametrize("key", [
    P + "2.self_attn.q_proj.lora_A.weight",  # layer out of range
    P + "0.mlp.experts.6.gate_proj.lora_A.weight",  # expert out of range
    P + "0.self_attn.q_proj.lora_magnitude_vector",  # DoRA: not plain LoRA
    P + "0.mlp.gate.lora_A.weight",  # router
    "lm_head.lora_A.weight",
])
def test_unknown_keys_refused(key):
    with pytest.raises(UnknownKeyError):
        parse_lora_key(key, (4, 32), QWEN)


def test_expected_shapes():
    assert expected_shape(LoRAKey(0, "o_proj", None, "A"), 4, QWEN) == (4, 32)
    assert expected_shape(LoRAKey(0, "down", 1, "B"), 4, QWEN) == (32, 4)
    assert expected_shape(LoRAKey(0, "gate_up", None, "B", True), 4, QWEN) == (48, 24)
