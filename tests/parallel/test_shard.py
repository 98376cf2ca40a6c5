"""How a replica's ranks split the model and ask Ray for their GPUs (no processes started here)."""
import pytest

from deployments.args import AppArgs
from engine.parallel.shard import Shard, span
from engine.testing.checkpoints import tiny_config
from engine.models.spec import spec_from_hf_config


def test_spans_cover_an_uneven_vocabulary_once():
    parts = [span(10, 4, i) for i in range(4)]
    assert parts == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert sum(n for _, n in parts) == 10


def test_local_spec_holds_this_ranks_heads_experts_and_intermediate():
    spec = spec_from_hf_config(tiny_config("qwen3_moe", 384, [1], 0, num_key_value_heads=4, num_experts=8))
    by_expert = Shard(1, tp=2, ep=2).local_spec(spec)
    assert (by_expert.num_heads, by_expert.num_kv_heads, by_expert.num_experts,
            by_expert.moe_intermediate_size) == (2, 2, 4, spec.moe_intermediate_size)
    by_inter = Shard(1, tp=2, ep=1).local_spec(spec)
    assert (by_inter.num_experts, by_inter.moe_intermediate_size) == (8, spec.moe_intermediate_size // 2)
    whole_attention = Shard(3, tp=1, ep=4).local_spec(spec)
    assert (whole_attention.num_heads, whole_attention.num_experts) == (spec.num_heads, 2)


def test_app_args_ask_ray_for_one_bundle_per_rank_on_one_node():
    options = AppArgs(device="cpu", tensor_parallel_size=2, expert_parallel_size=2).replica_options(cluster_gpus=0)
    # the replica's CPU split over its ranks: a 2-rank CPU replica reserves what a 1-rank one does
    assert options["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert options["placement_group_strategy"] == "STRICT_PACK" and options["ray_actor_options"]["num_cpus"] == 0.5
    gpu = AppArgs(device="cuda", expert_parallel_size=4).replica_options(cluster_gpus=8)
    assert [b["GPU"] for b in gpu["placement_group_bundles"]] == [1.0] * 4
    assert "placement_group_bundles" not in AppArgs(device="cuda").replica_options(cluster_gpus=8)


def test_app_args_refuse_sizes_that_disagree():
    with pytest.raises(ValueError, match="each must be 1 or"):
        AppArgs(tensor_parallel_size=2, expert_parallel_size=4)
