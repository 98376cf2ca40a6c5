"""Materialise the base checkpoint a replica serves: the embedded tiny one, s3:// files (shards
in parallel, with progress; the ingress fetches config.json alone), or a dummy model
(config.json and tokenizer files only, for random weights at real shapes).

Each lands in `cache_dir` once per machine: a file lock keeps concurrent replicas from
writing the same directory, and a `.complete` marker written last tells a finished copy
from a half-written one. A dummy model's directory name carries a digest of its config, so
other hf_overrides get a directory of their own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from filelock import FileLock

from deployments.args import DUMMY_PREFIX, AppArgs

_MARKER = ".complete"
_PARALLEL_DOWNLOADS = 8
logger = logging.getLogger("ray.serve")


class ModelFilesError(RuntimeError):
    """The base checkpoint cannot be found or fetched; the message says what to fix."""


def ensure_model(args: AppArgs, config_only: bool = False) -> Path:
    """The local directory of the base checkpoint named by `args.model`.

    `config_only`: the caller reads config.json alone (the ingress validates uploads against
    it), so an s3:// checkpoint not yet on this machine costs one small download there, not
    the weights; its directory has the same last name as the full copy's (the name is part of
    the base model's fingerprint)."""
    if args.uses_dummy_weights():
        return _ensure_dummy(args)
    if args.model is None:
        return _ensure_tiny(args)
    if args.model.startswith("s3://"):
        bucket, _, prefix = args.model[len("s3://"):].partition("/")
        parts = (bucket, *filter(None, prefix.split("/")))
        full = args.cache_path("models", "s3", *parts)
        if config_only and not (full / _MARKER).exists():
            target = args.cache_path("models", "s3-config", *parts)
            return _materialise(target, lambda out: _download_s3(args, bucket, prefix, out,
                                                                  only=("config.json",)))
        return _materialise(full, lambda out: _download_s3(args, bucket, prefix, out))
    return _local_checkpoint(args.model)


def _local_checkpoint(model: str) -> Path:
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelFilesError(f"model={model!r} is not a checkpoint directory (no "
                              "config.json); pass an HF checkpoint dir, s3://bucket/prefix, "
                              "dummy:<preset>, or leave model unset for the embedded tiny model")
    return path


def _ensure_tiny(args: AppArgs) -> Path:
    from engine.tiny_model import CHAT_TEMPLATE

    # keyed by the chat template too: a checkpoint cached before it changed (tools) is not reused
    digest = hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()[:8]
    return _materialise(args.cache_path("models", f"tiny-qwen3_moe-{digest}"), _write_tiny)


def _ensure_dummy(args: AppArgs) -> Path:
    """config.json (with hf_overrides) and tokenizer files of the dummy model `args` names."""
    from engine.errors import EngineError
    from engine.tiny_model import write_dummy_model

    name, config, tokenizer_dir = _dummy_source(args)
    overrides = args.hf_overrides or {}
    key = json.dumps([config, overrides, str(tokenizer_dir)], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = args.cache_path("models", "dummy", f"{name}-{digest}")
    try:
        return _materialise(target, lambda out: write_dummy_model(out, config, overrides, tokenizer_dir))
    except (EngineError, ValueError, TypeError) as exc:  # a bad override reads as a bad config
        raise ModelFilesError(f"dummy model {args.model or name!r} with hf_overrides={overrides}: "
                              f"{exc}") from exc


def _dummy_source(args: AppArgs) -> tuple[str, dict, Path | None]:
    """(directory name, config.json dict, tokenizer directory or None) of a dummy model."""
    from engine.models.presets import ARCHITECTURES, get_preset

    if args.model is not None and args.model.startswith(DUMMY_PREFIX):
        name = args.model[len(DUMMY_PREFIX):]
        return name, get_preset(name).config_dict(), None
    if args.model is None:
        source = _ensure_tiny(args)
    else:
        source = Path(args.model).expanduser()
        source = source.parent if source.name == "config.json" else _local_checkpoint(args.model)
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"model={args.model!r}: cannot read {source / 'config.json'} ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelFilesError(f"{source / 'config.json'} does not hold a JSON object")
    if "architectures" not in config and config.get("model_type") in ARCHITECTURES:
        config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    return source.resolve().name, config, source


def _materialise(target: Path, write) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _MARKER).exists():
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        (staging / _MARKER).write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _write_tiny(out: Path) -> None:
    from engine.tiny_model import make_tiny_checkpoint
    make_tiny_checkpoint(out, family="qwen3_moe", seed=0)


def _download_s3(args: AppArgs, bucket: str, prefix: str, out: Path,
                 only: tuple[str, ...] | None = None) -> None:
    """The objects under `prefix` (or just the files named in `only`) into `out`, several at
    a time (a checkpoint is a few large shards: one stream each does not fill the link), with
    a progress line per finished file."""
    import boto3
    from botocore.config import Config

    # each download_file runs s3transfer's own 10 threads: room for all of them in the pool
    client = boto3.client("s3", endpoint_url=args.store_endpoint_url, region_name=args.store_region,
                          config=Config(max_pool_connections=10 * _PARALLEL_DOWNLOADS))
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix):]
            if not relative or relative.endswith("/") or ".." in relative.split("/"):
                continue
            if only is None or relative in only:
                objects.append((obj["Key"], relative, obj.get("Size", 0)))
    if "config.json" not in {relative for _, relative, _ in objects}:
        raise ModelFilesError(f"s3://{bucket}/{prefix} holds no config.json ({len(objects)} files "
                              "found); point model= at the prefix of an HF checkpoint")
    total, done, started = sum(size for *_, size in objects), 0, time.monotonic()

    def fetch(key: str, relative: str) -> None:
        dest = out / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(dest))

    pool = ThreadPoolExecutor(max_workers=min(_PARALLEL_DOWNLOADS, len(objects)))
    try:
        futures = {pool.submit(fetch, key, relative): (relative, size) for key, relative, size in objects}
        for future in as_completed(futures):
            future.result()  # one failure ends the download: the queued files are cancelled
            relative, size = futures[future]
            done += size
            seconds = max(time.monotonic() - started, 1e-6)
            logger.info("model s3://%s/%s: %s done, %.2f of %.2f GB (%.0f MB/s)", bucket, prefix,
                        relative, done / 1e9, total / 1e9, done / seconds / 1e6)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
