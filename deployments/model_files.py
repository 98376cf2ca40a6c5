"""Materialise the base checkpoint a replica serves: the embedded tiny one, or s3:// files.

Both land in `cache_dir` once per machine: a file lock keeps concurrent replicas from
writing the same directory, and a `.complete` marker written last tells a finished copy
from a half-written one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from filelock import FileLock

from deployments.args import AppArgs

_MARKER = ".complete"


class ModelFilesError(RuntimeError):
    """The base checkpoint cannot be found or fetched; the message says what to fix."""


def ensure_model(args: AppArgs) -> Path:
    """The local directory of the base checkpoint named by `args.model`."""
    if args.model is None:
        return _materialise(args.cache_path("models", "tiny-qwen3_moe"), _write_tiny)
    if args.model.startswith("s3://"):
        bucket, _, prefix = args.model[len("s3://"):].partition("/")
        target = args.cache_path("models", "s3", bucket, *filter(None, prefix.split("/")))
        return _materialise(target, lambda out: _download_s3(args, bucket, prefix, out))
    path = Path(args.model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelFilesError(f"model={args.model!r} is not a checkpoint directory (no "
                              "config.json); pass an HF checkpoint dir, s3://bucket/prefix, "
                              "or leave model unset for the embedded tiny model")
    return path


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
    from engine.testing import make_tiny_checkpoint
    make_tiny_checkpoint(out, family="qwen3_moe", seed=0)


def _download_s3(args: AppArgs, bucket: str, prefix: str, out: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=args.store_endpoint_url,
                          region_name=args.store_region)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix):]
            if not relative or relative.endswith("/") or ".." in relative.split("/"):
                continue
            dest = out / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest))
            count += 1
    if not (out / "config.json").is_file():
        raise ModelFilesError(f"s3://{bucket}/{prefix} holds no config.json ({count} files "
                              "found); point model= at the prefix of an HF checkpoint")
