"""AppArgs' memory settings reach EngineConfig; adapters_per_replica follows the engine's slots."""
import pytest

from deployments.args import AppArgs


def test_memory_settings_reach_the_engine_config(tmp_path):
    args = AppArgs(cache_dir=str(tmp_path), device="cuda", gpu_memory_utilization=0.8, lora_memory_fraction=0.4)
    config = args.engine_config(tmp_path / "model")
    assert (config.max_loras, config.gpu_memory_utilization, config.lora_memory_fraction) == (None, 0.8, 0.4)
    default = AppArgs(cache_dir=str(tmp_path), device="cpu").engine_config(tmp_path / "model")
    assert (default.max_loras, default.gpu_memory_utilization, default.lora_memory_fraction) == (4, 0.9, None)


def test_adapters_per_replica_follow_the_engines_slot_count_unless_set(tmp_path):
    assert AppArgs(cache_dir=str(tmp_path)).adapters_per_replica(num_lora_slots=33) == 66
    assert AppArgs(cache_dir=str(tmp_path), max_loras=3).adapters_per_replica(num_lora_slots=3) == 6
    assert AppArgs(cache_dir=str(tmp_path)).adapters_per_replica(num_lora_slots=0) == 2
    assert AppArgs(cache_dir=str(tmp_path), max_adapters_per_replica=10).adapters_per_replica(33) == 10


@pytest.mark.parametrize("kw", [dict(gpu_memory_utilization=0), dict(gpu_memory_utilization=1.5),
                                dict(lora_memory_fraction=1.0), dict(max_loras=0)])
def test_bad_memory_settings_are_refused(kw):
    with pytest.raises(ValueError):
        AppArgs(**kw)
