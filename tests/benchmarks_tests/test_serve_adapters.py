"""benchmarks/serve_adapters.py: fast random adapters the store and the engine accept (CPU)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from adapter_store import StoreLimits
from adapter_store.validate import validate_adapter
from benchmarks import serve_adapters
from benchmarks.serve_adapters import RandomAdapterWriter, adapter_bytes, adapter_layout
from engine.testing import make_peft_adapter, read_config


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint()


def test_keys_and_shapes_match_make_peft_adapter_per_expert(checkpoint, tmp_path):
    config = read_config(checkpoint)
    written = load_file(RandomAdapterWriter(config, rank=4).write(tmp_path / "a", seed=1)
                        / "adapter_model.safetensors")
    reference = load_file(make_peft_adapter(checkpoint, tmp_path / "ref", rank=4)
                          / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in written.items()} == \
        {k: tuple(v.shape) for k, v in reference.items()}
    assert all(v.dtype == torch.bfloat16 for v in written.values())
    assert sum(v.numel() * 2 for v in written.values()) == adapter_bytes(config, 4)


def test_values_follow_each_tensors_scale_and_seeds_differ(checkpoint, tmp_path):
    config = read_config(checkpoint)
    writer = RandomAdapterWriter(config, rank=8)
    one = load_file(writer.write(tmp_path / "one", seed=1) / "adapter_model.safetensors")
    two = load_file(writer.write(tmp_path / "two", seed=2) / "adapter_model.safetensors")
    again = load_file(writer.write(tmp_path / "again", seed=1) / "adapter_model.safetensors")
    for key, _, scale in adapter_layout(config, 8):
        assert torch.equal(one[key], again[key])
        assert not torch.equal(one[key], two[key])
    a = torch.cat([v.float().flatten() for k, v in one.items() if "lora_A" in k and "experts" in k])
    b = torch.cat([v.float().flatten() for k, v in one.items() if "lora_B" in k])
    in_f = one[next(k for k in one if "experts.0.gate_proj.lora_A" in k)].shape[1]
    assert a.std().item() == pytest.approx(in_f ** -0.5, rel=0.1)
    assert b.std().item() == pytest.approx(0.02, rel=0.1)


def test_written_adapter_passes_the_stores_validation(checkpoint, tmp_path):
    config = read_config(checkpoint)
    out = RandomAdapterWriter(config, rank=8).write(tmp_path / "a", seed=3)
    summary = validate_adapter(out, checkpoint, StoreLimits(max_rank=16, max_adapter_bytes=1 << 30))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert summary is not None


def test_cpu_reuse_path_redraws_only_the_head_per_seed(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(serve_adapters, "_CPU_REDRAW_LIMIT", 1000)
    monkeypatch.setattr(serve_adapters, "_REDRAWN_PER_ADAPTER", 500)
    config = read_config(checkpoint)
    writer = RandomAdapterWriter(config, rank=4, device="cpu")
    one, two = writer._values(1), writer._values(2)
    assert not torch.equal(one[:500], two[:500])
    assert torch.equal(one[500:], two[500:])
    key, (r, c), scale = adapter_layout(config, 4)[0]
    assert r * c <= 500 and one[:r * c].float().std().item() == pytest.approx(scale, rel=0.3)
