"""`build_app`: the Serve application (`serve run deployments.app:build_app key=value ...`).

Two deployments: `Ingress` (FastAPI, auth, adapter management, HTTP streaming) and
`LLMServer` (one engine per replica, scaled by `num_replicas` or `autoscaling_config`).
"""
from __future__ import annotations

import os

import ray
from ray import serve

from deployments.args import AppArgs
from deployments.ingress import Ingress
from deployments.replica import LLMServer


def build_app(args: AppArgs | dict | None = None) -> serve.Application:
    """The moeplex application for `args` (an AppArgs, or the dict `serve run` passes)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    starts_ray = not ray.is_initialized()
    if starts_ray:
        set_ray_env_defaults()
    if args.api_keys is not None:
        from deployments.auth import load_key_file
        load_key_file(args.api_keys)  # fail at deploy time, not at the first request
    replica_options, ingress_options = args.replica_options(cluster_gpus()), args.ingress_options()
    job_env = {} if starts_ray else dict(ray.get_runtime_context().runtime_env or {})
    with_job_env([replica_options, ingress_options], starts_ray, job_env)
    server = serve.deployment(LLMServer, name="LLMServer").options(**replica_options)
    ingress = Ingress.options(**ingress_options)
    return ingress.bind(server.bind(args), args)


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


def set_ray_env_defaults() -> None:
    """Put RAY_ENV_DEFAULTS into this process's environment where unset, before Ray starts.

    `serve run module:build_app` calls the builder before it starts a local Ray instance, whose
    processes inherit this environment. A cluster started with `ray start` needs the variables
    in that command's environment (cluster.yaml sets them); an operator's own value wins.
    """
    for key, value in RAY_ENV_DEFAULTS.items():
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
