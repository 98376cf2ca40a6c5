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
    if not ray.is_initialized():
        set_ray_env_defaults()
    if args.api_keys is not None:
        from deployments.auth import load_key_file
        load_key_file(args.api_keys)  # fail at deploy time, not at the first request
    server = serve.deployment(LLMServer, name="LLMServer").options(
        **args.replica_options(cluster_gpus()))
    ingress = Ingress.options(**args.ingress_options())
    return ingress.bind(server.bind(args), args)


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
