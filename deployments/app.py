"""`build_app`: the Serve application (`serve run deployments.app:build_app key=value ...`).

Two deployments: `Ingress` (FastAPI, auth, adapter management, HTTP streaming) and
`LLMServer` (one engine per replica, scaled by `num_replicas` or `autoscaling_config`).
"""
from __future__ import annotations

from ray import serve

from deployments.args import AppArgs
from deployments.ingress import Ingress
from deployments.replica import LLMServer


def build_app(args: AppArgs | dict | None = None) -> serve.Application:
    """The moeplex application for `args` (an AppArgs, or the dict `serve run` passes)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    if args.api_keys is not None:
        from deployments.auth import load_key_file
        load_key_file(args.api_keys)  # fail at deploy time, not at the first request
    server = serve.deployment(LLMServer, name="LLMServer").options(**args.replica_options())
    # The ingress only awaits I/O: let it hold many requests (Serve's default is 5).
    ingress = Ingress.options(num_replicas=args.ingress_replicas,
                              max_ongoing_requests=args.ingress_max_ongoing_requests)
    return ingress.bind(server.bind(args), args)
