"""Where adapters live when no one says: one answer for the service and the CLI.

`AppArgs.store_uri()` and `moeplex-adapters` both ask `default_store_uri`, so an adapter
uploaded with the CLI is the one `make serve` serves. Plain stdlib: importing it starts
nothing (no ray, no boto3 client).
"""
from __future__ import annotations

import os
from pathlib import Path

STORE_ENV = "MOEPLEX_STORE"


def default_cache_dir() -> str:
    """The service's `cache_dir` default: the tiny checkpoint, the disk cache, the store."""
    return str(Path.home() / ".cache" / "moeplex")


def store_from_env() -> str | None:
    """$MOEPLEX_STORE, or None when unset or empty."""
    return os.environ.get(STORE_ENV) or None


def default_store_uri(cache_dir: str | None = None) -> str:
    """$MOEPLEX_STORE, else `{cache_dir}/adapter-store` (cache_dir: default_cache_dir())."""
    env = store_from_env()
    if env:
        return env
    return str(Path(cache_dir or default_cache_dir()).expanduser() / "adapter-store")
