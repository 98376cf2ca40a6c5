"""deployments.ranks on the local Ray cluster, without Serve: an actor standing in for the replica
(bundle 0 of a two-bundle placement group) starts rank 1 as an actor in bundle 1 and its engine
as rank 0. A rank whose checkpoint part is missing, or whose actor dies before it joins, fails
the engine's start with that rank's error."""
import shutil

import pytest

from engine import EngineConfig
from engine.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("rk")),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A model with 8 experts, and a copy missing experts 4-7 (rank 1's part under ep=2)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("rank-actors")
    ckpt = make_tiny_checkpoint(root / "ok", "mixtral", seed=6, num_key_value_heads=4, num_local_experts=8)
    broken = root / "broken"
    shutil.copytree(ckpt, broken)
    for shard in broken.glob("*.safetensors"):
        tensors = load_file(str(shard))
        kept = {k: v for k, v in tensors.items() if not any(f".experts.{e}." in k for e in range(4, 8))}
        save_file(kept, str(shard), metadata={"format": "pt"})
    return ckpt, broken


def _start_in_a_replica_bundle(config: EngineConfig, kill_rank_first: bool = False) -> str:
    """Run RankActors + the engine inside an actor in bundle 0; the engine's answer as text."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote
    class Replica:
        def start(self, config, kill_rank_first):
            from deployments.ranks import RankActors
            from engine import LLMEngine

            ranks = RankActors(config)
            if kill_rank_first:
                ray.kill(ranks.actors[0])
            try:
                engine = LLMEngine(config)
            except Exception as exc:  # noqa: BLE001 - the answer under test
                return f"failed: {exc}"
            finally:
                ranks.closing = True
            tokens = engine.generate([[5, 6, 7]], None)[0]["token_ids"]
            engine.shutdown()
            ranks.close()
            return f"ok: {len(tokens)} tokens"

    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    ray.get(group.ready())
    try:
        replica = Replica.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0)).remote()
        return ray.get(replica.start.remote(config, kill_rank_first), timeout=240)
    finally:
        remove_placement_group(group)


def _config(model) -> EngineConfig:
    return EngineConfig(model=str(model), max_loras=0, block_size=4, max_model_len=64, tensor_parallel_size=2,
                        expert_parallel_size=2, distributed_timeout_s=120)


def test_ranks_as_actors_serve_a_request(ray_cluster, checkpoints):
    assert _start_in_a_replica_bundle(_config(checkpoints[0])).startswith("ok: ")


def test_rank_actor_missing_its_experts_fails_the_start_with_its_error(ray_cluster, checkpoints):
    answer = _start_in_a_replica_bundle(_config(checkpoints[1]))
    assert answer.startswith("failed: rank 1 failed at start-up (weights)") and "lacks weights" in answer


def test_rank_actor_that_dies_before_joining_fails_the_start(ray_cluster, checkpoints):
    answer = _start_in_a_replica_bundle(_config(checkpoints[0]), kill_rank_first=True)
    assert answer.startswith("failed: rank 1 failed at start-up"), answer
