"""How many ingress replicas stream tokens, and how they run (AppArgs.ingress_options)."""
from deployments.args import AppArgs


def test_default_ingress_replicas_are_two_per_engine_replica():
    assert AppArgs().ingress_options()["num_replicas"] == 2
    assert AppArgs(num_replicas=3).ingress_options()["num_replicas"] == 6


def test_autoscaled_engines_size_the_ingress_for_their_minimum():
    args = AppArgs(autoscaling_config={"min_replicas": 2, "max_replicas": 4})
    assert args.ingress_options()["num_replicas"] == 4


def test_an_explicit_ingress_replica_count_wins():
    assert AppArgs(num_replicas=3, ingress_replicas=1).ingress_options()["num_replicas"] == 1


def test_ingress_on_serves_loop_sets_serves_switch_only_when_asked():
    env = AppArgs().ingress_options()["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    assert "runtime_env" not in AppArgs(ingress_on_serve_loop=False).ingress_options()["ray_actor_options"]


def test_two_ingress_replicas_and_an_engine_replica_fit_two_cores():
    args = AppArgs()
    ingress = args.ingress_options()
    engine = args.replica_options(cluster_gpus=0)["ray_actor_options"]
    assert ingress["num_replicas"] * ingress["ray_actor_options"]["num_cpus"] + engine["num_cpus"] <= 2
