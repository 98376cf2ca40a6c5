"""How many ingress replicas stream tokens, and how they run (AppArgs.ingress_options)."""
from types import SimpleNamespace

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


def test_deployments_keep_the_jobs_runtime_env_beside_their_own_env_vars():
    from deployments.app import with_job_env

    args = AppArgs()
    options = [args.replica_options(0.0), args.ingress_options()]
    job = {"env_vars": {"AWS_PROFILE": "prod"}, "pip": ["x"]}
    with_job_env(options, starts_ray=False, job_env=job)
    for o in options:
        env = o["ray_actor_options"]["runtime_env"]
        assert env["env_vars"] == {"AWS_PROFILE": "prod", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
        assert env["pip"] == ["x"]


def test_before_serve_run_starts_ray_the_shared_switch_goes_into_the_environment(monkeypatch):
    from deployments.app import with_job_env

    monkeypatch.delenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", raising=False)
    options = [AppArgs().replica_options(0.0), AppArgs().ingress_options()]
    with_job_env(options, starts_ray=True, job_env={})
    assert all("runtime_env" not in o["ray_actor_options"] for o in options)
    import os
    assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_engines_on_a_gpu_get_four_ingress_replicas_each():
    assert AppArgs().num_ingress_replicas(on_gpu=True) == 4
    assert AppArgs(num_replicas=2).num_ingress_replicas(on_gpu=True) == 8
    assert AppArgs(autoscaling_config={"min_replicas": 3, "max_replicas": 6}).num_ingress_replicas(on_gpu=True) == 12
    assert AppArgs(ingress_replicas=1).num_ingress_replicas(on_gpu=True) == 1


def _built_ingress(monkeypatch, cluster_gpus: float, **args):
    """(replica count, the AppArgs the ingress replicas get) of build_app on a cluster with
    `cluster_gpus` GPUs, without touching this process's environment."""
    from deployments import app

    monkeypatch.setattr(app, "cluster_gpus", lambda: cluster_gpus)
    monkeypatch.setattr(app, "set_ray_env_defaults", lambda: None)
    ingress = app.build_app(AppArgs(**args))._bound_deployment
    return ingress._deployment_config.num_replicas, ingress.init_args[1]


def test_build_app_sizes_the_ingress_by_where_the_engines_run_and_tells_the_ingress(monkeypatch):
    # the ingress replicas split each tenant's concurrency limit by the count they are told
    assert _built_ingress(monkeypatch, 1.0)[0] == 4 and _built_ingress(monkeypatch, 1.0)[1].num_ingress_replicas() == 4
    assert _built_ingress(monkeypatch, 0.0)[0] == 2 and _built_ingress(monkeypatch, 0.0)[1].num_ingress_replicas() == 2
    assert _built_ingress(monkeypatch, 8.0, device="cpu")[0] == 2
    assert _built_ingress(monkeypatch, 8.0, ingress_replicas=3)[0] == 3


def test_every_ingress_replica_serves_the_key_set_build_app_read(monkeypatch, tmp_path, tiny_checkpoint):
    """The key file is read once, at deploy: a replica started later (a restart, another node)
    serves that set, not what the file holds by then (which may be edited, half-written or absent)."""
    from deployments.auth import hash_key
    from deployments.ingress import Ingress
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"tenants:\n  acme:\n    key_sha256: [{hash_key('key-acme')}]\n")
    args = {"model": str(tiny_checkpoint("qwen3_moe")), "store": str(tmp_path / "store"),
            "cache_dir": str(tmp_path / "cache"), "api_keys": str(keys)}
    monkeypatch.setattr("deployments.app.cluster_gpus", lambda: 0.0)
    monkeypatch.setattr("deployments.app.set_ray_env_defaults", lambda: None)
    from deployments import app
    init_args = app.build_app(AppArgs(**args))._bound_deployment.init_args
    keys.write_text("tenants: {half-written")
    cls = Ingress.func_or_class
    replica = cls.__new__(cls)
    engine_replicas = SimpleNamespace(options=lambda **_options: None)  # Serve's handle, unused here
    cls.__mro__[1].__init__(replica, engine_replicas, *init_args[1:])
    assert replica._auth.tenant_of({"authorization": "Bearer key-acme"}) == "acme"
