"""How many ingress replicas stream tokens, and how they run (AppArgs.ingress_options)."""
from deployments.args import AppArgs


def test_default_ingress_replicas_are_two_per_engine_replica():
    assert AppArgs().ingress_options()["num_replicas"] == 2
    assert AppArgs(num_replicas=3).ingress_options()["num_replicas"] == 6


def test_autoscaled_engines_size_the_ingress_for_their_maximum():
    args = AppArgs(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert args.ingress_options()["num_replicas"] == 8


def test_an_explicit_ingress_replica_count_wins():
    assert AppArgs(num_replicas=3, ingress_replicas=1).ingress_options()["num_replicas"] == 1


def test_throughput_optimized_ingress_sets_serves_switch_only_when_asked():
    env = AppArgs().ingress_options()["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    assert "ray_actor_options" not in AppArgs(ingress_throughput_optimized=False).ingress_options()
