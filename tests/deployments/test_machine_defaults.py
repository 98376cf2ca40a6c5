"""Defaults that follow the machine and the model: replica GPUs, the adapter size limit."""
import pytest
from safetensors import safe_open

from adapter_store.errors import LimitExceededError
from adapter_store.formats import ModelShape
from adapter_store.limits import default_max_adapter_bytes, max_lora_params
from adapter_store.validate import validate_adapter
from deployments.args import AppArgs
from engine.models.presets import get_preset
from engine.testing import make_peft_adapter, read_config

MIB = 1 << 20


# ---- GPUs a replica asks Ray for ------------------------------------------------------
def replica_gpus(cluster_gpus: float, **args) -> float:
    return AppArgs(**args).replica_options(cluster_gpus)["ray_actor_options"]["num_gpus"]


def test_device_auto_asks_for_a_gpu_when_the_cluster_has_one():
    assert replica_gpus(8.0) == 1.0
    assert replica_gpus(1.0, device="auto") == 1.0


def test_device_auto_asks_for_no_gpu_on_a_cpu_cluster():
    assert replica_gpus(0.0) == 0.0


def test_device_cuda_always_asks_for_a_gpu_and_cpu_never():
    assert replica_gpus(0.0, device="cuda") == replica_gpus(4.0, device="cuda") == 1.0
    assert replica_gpus(0.0, device="cpu") == replica_gpus(4.0, device="cpu") == 0.0


def test_replica_num_gpus_overrides_the_device_rule():
    assert replica_gpus(4.0, device="cpu", replica_num_gpus=0.5) == 0.5
    assert replica_gpus(4.0, device="auto", replica_num_gpus=0) == 0.0


def test_cluster_gpus_reads_ray_when_connected_else_local_cuda(monkeypatch):
    import ray
    import torch

    from deployments import app

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert app.cluster_gpus() == 8.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    assert app.cluster_gpus() == 0.0
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert app.cluster_gpus() == 2.0


# ---- the default adapter size limit ---------------------------------------------------
def test_size_rule_matches_a_hand_count_for_the_tiny_qwen3_moe(tiny_checkpoint):
    config = read_config(tiny_checkpoint("qwen3_moe"))
    d, layers, experts, inter = 32, 2, 6, 24  # the tiny checkpoint's sizes
    q_out, kv_out, r = 4 * 8, 2 * 8, 16
    num_experts = config.get("num_experts") or config["num_local_experts"]
    assert (config["hidden_size"], num_experts, config["moe_intermediate_size"]) == (d, experts, inter)
    attention = r * ((d + q_out) + 2 * (d + kv_out) + (q_out + d))
    expert_modules = experts * r * 3 * (d + inter)
    params = layers * (attention + expert_modules)
    tensors = layers * 2 * (4 + 3 * experts)
    payload = 4 * params
    assert default_max_adapter_bytes(config, r) == payload + payload // 100 + 256 * tensors + MIB


def test_size_rule_for_qwen3_30b_a3b_at_rank_16_is_about_3_4_gb():
    limit = default_max_adapter_bytes(get_preset("qwen3-30b-a3b").config_dict(), 16)
    assert 3.37e9 < limit < 3.45e9
    params, _ = max_lora_params(ModelShape.from_config(get_preset("qwen3-30b-a3b").config_dict()), 16)
    assert 2 * params == pytest.approx(1.69e9, rel=0.01)  # the same adapter in bf16


def test_rank_max_adapter_on_every_module_fits_the_derived_limit(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("qwen3_moe")
    args = AppArgs(cache_dir=str(tmp_path), max_lora_rank=8)
    adapter = make_peft_adapter(base, tmp_path / "adapter", rank=8, fmt="per_expert")
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        numel = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
        num_tensors = len(list(f.keys()))
    assert (numel, num_tensors) == max_lora_params(ModelShape.from_config(read_config(base)), 8)
    limits = args.store_limits(base)
    assert limits.max_adapter_bytes == default_max_adapter_bytes(read_config(base), 8)
    summary = validate_adapter(adapter, base, limits)
    assert summary.rank == 8 and summary.layout == "per_expert"


def test_an_adapter_over_the_derived_limit_is_refused(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("qwen3_moe")
    params, _ = max_lora_params(ModelShape.from_config(read_config(base)), 4)
    adapter = make_peft_adapter(base, tmp_path / "adapter", rank=4, fmt="per_expert")
    # a limit of 4 bytes a parameter for rank 4 minus all margins: the fp32 adapter is over it
    tight = AppArgs(cache_dir=str(tmp_path), max_lora_rank=4, max_adapter_bytes=4 * params)
    with pytest.raises(LimitExceededError):
        validate_adapter(adapter, base, tight.store_limits(base))


def test_explicit_max_adapter_bytes_wins_over_the_rule(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("qwen3_moe")
    assert AppArgs(max_adapter_bytes=12345).adapter_bytes_limit(base) == 12345
    assert AppArgs(max_lora_rank=32).adapter_bytes_limit(base) == default_max_adapter_bytes(
        read_config(base), 32)
