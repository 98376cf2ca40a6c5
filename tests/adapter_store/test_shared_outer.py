"""The shared-outer expert layout (Megatron-Bridge's export): accepted whole, refused broken.

Gate's and up's lora_A and down's lora_B are one [1, ...] tensor per layer; every expert holds
only its other halves. Each break below is refused at upload with a typed error, and the
engine's loader refuses the same files with AdapterLoadError (what a replica would meet if a
store were written around the validation).
"""
import pytest
import torch

from adapter_store import StoreLimits
from adapter_store.validate import validate_adapter
from adapter_store.errors import ValidationError
from engine.errors import AdapterLoadError
from tests.adapter_store.helpers import copy_adapter, edit_tensors

PREFIX = "base_model.model.model.layers.0.mlp.experts."


@pytest.fixture
def shared(tiny_adapter):
    return tiny_adapter("qwen3_moe", "shared_outer", rank=4)


def _load(src, tiny_checkpoint):
    from engine.lora.adapter import load_adapter
    from engine.models.spec import load_spec

    spec = load_spec(tiny_checkpoint("qwen3_moe"))
    return load_adapter("t", src, spec, torch.float32, max_rank=16)


def _refused(src, tiny_checkpoint, code: str) -> str:
    with pytest.raises(ValidationError) as caught:
        validate_adapter(src, tiny_checkpoint("qwen3_moe"), StoreLimits())
    assert caught.value.code == code, str(caught.value)
    with pytest.raises(AdapterLoadError):
        _load(src, tiny_checkpoint)
    return str(caught.value)


def test_shared_outer_adapter_is_accepted_with_its_layout(shared, tiny_checkpoint):
    summary = validate_adapter(shared, tiny_checkpoint("qwen3_moe"), StoreLimits())
    assert summary.layout == "shared_outer" and summary.rank == 4
    assert {"gate", "up", "down", "q_proj"} <= set(summary.targets)


def test_loader_gives_every_expert_the_layers_shared_halves(shared, tiny_checkpoint):
    from safetensors.torch import load_file

    tensors = load_file(str(shared / "adapter_model.safetensors"))
    adapter = _load(shared, tiny_checkpoint)
    gate, down = adapter.moe[(0, "gate")], adapter.moe[(0, "down")]
    for expert in range(gate.a.shape[0]):
        assert torch.equal(gate.a[expert], tensors[PREFIX + "gate_proj.lora_A.weight"][0])
        assert torch.equal(down.a[expert], tensors[PREFIX + f"{expert}.down_proj.lora_A.weight"])
    scale = 16 / 4  # alpha / r
    assert torch.allclose(down.b[1], scale * tensors[PREFIX + "down_proj.lora_B.weight"][0])
    assert torch.allclose(gate.b[2], scale * tensors[PREFIX + "2.gate_proj.lora_B.weight"])


def test_expert_with_its_own_copy_of_the_shared_half_is_refused(shared, tiny_checkpoint, tmp_path):
    def add_own_a(tensors):
        tensors[PREFIX + "1.gate_proj.lora_A.weight"] = tensors[PREFIX + "gate_proj.lora_A.weight"][0].clone()

    src = edit_tensors(copy_adapter(shared, tmp_path / "a"), add_own_a)
    assert "only its lora_B" in _refused(src, tiny_checkpoint, "unpaired_key")


def test_shared_half_without_any_expert_half_is_refused(shared, tiny_checkpoint, tmp_path):
    def drop_down_a(tensors):
        for key in [k for k in tensors if k.startswith(PREFIX) and k.endswith("down_proj.lora_A.weight")]:
            del tensors[key]

    src = edit_tensors(copy_adapter(shared, tmp_path / "a"), drop_down_a)
    assert "without any expert" in _refused(src, tiny_checkpoint, "unpaired_key")


def test_shared_half_stored_without_its_leading_one_is_refused(shared, tiny_checkpoint, tmp_path):
    def squeeze(tensors):
        tensors[PREFIX + "up_proj.lora_A.weight"] = tensors[PREFIX + "up_proj.lora_A.weight"][0].clone()

    src = edit_tensors(copy_adapter(shared, tmp_path / "a"), squeeze)
    assert "[1, 4, " in _refused(src, tiny_checkpoint, "wrong_shape")


def test_shared_lora_b_of_gate_is_not_a_known_key(shared, tiny_checkpoint, tmp_path):
    """Only gate/up A and down B are shared; a shared gate B is no layout anyone exports."""
    def share_gate_b(tensors):
        tensors[PREFIX + "gate_proj.lora_B.weight"] = tensors[PREFIX + "0.gate_proj.lora_B.weight"][None].clone()

    src = edit_tensors(copy_adapter(shared, tmp_path / "a"), share_gate_b)
    _refused(src, tiny_checkpoint, "unknown_key")
