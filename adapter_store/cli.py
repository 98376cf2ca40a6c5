"""`moeplex-adapters`: upload, list, show, delete and share tenant adapters.

    moeplex-adapters upload DIR --tenant T --name N [--base-model CKPT] [--json]
    moeplex-adapters list --tenant T
    moeplex-adapters show REF --tenant T          # REF: name[@version] or owner/name[@version]
    moeplex-adapters delete NAME --tenant T [--version V]
    moeplex-adapters share NAME --tenant T [--unshare]
    moeplex-adapters gc [--older-than SECONDS] [--dry-run]   # operator: files of crashed uploads

The store is `--store`, else $MOEPLEX_STORE, else the service's default store
(~/.cache/moeplex/adapter-store, what `make serve` reads; a service given another
`cache_dir` reads {cache_dir}/adapter-store, which needs --store): a directory, file:///dir or
s3://bucket/prefix. Only `upload` creates a local store directory; the other commands
refuse one that does not exist (a mistyped path, or s3:// left out). An S3-compatible
endpoint is `--endpoint-url` or $AWS_ENDPOINT_URL. The base model to validate uploads
against is `--base-model` or $MOEPLEX_BASE_MODEL. Exit codes: 0 ok, 2 usage, 3 adapter
refused, 4 not found, 5 store unavailable (or missing) or corrupt, 1 other.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from adapter_store.errors import (
    AdapterNotFoundError, AdapterStoreError, ChecksumMismatchError, StoreUnavailableError, ValidationError,
)
from adapter_store.backends import open_store
from adapter_store.defaults import STORE_ENV, default_store_uri, store_from_env
from adapter_store.versions import AdapterInfo
from adapter_store.validate import ADAPTER_FILES, StoreLimits

_DEFAULT_SOURCE = "the service's default store"
EXIT_CODES = ((ValidationError, 3), (AdapterNotFoundError, 4), (StoreUnavailableError, 5),
              (ChecksumMismatchError, 5), (AdapterStoreError, 1))


def build_parser() -> argparse.ArgumentParser:
    store_args = argparse.ArgumentParser(add_help=False)
    store_args.add_argument("--store", help="store URI: directory, file:///dir or s3://bucket/prefix "
                            f"(default: env {STORE_ENV}, else the store of a service with the default cache_dir; "
                            f"here: {default_store_uri()})")
    store_args.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3-compatible endpoint (env AWS_ENDPOINT_URL)")
    store_args.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    store_args.add_argument("--json", action="store_true", help="print JSON on stdout for scripts")
    common = argparse.ArgumentParser(add_help=False, parents=[store_args])
    common.add_argument("--tenant", required=True, help="tenant that owns (or uses) the adapters")
    parser = argparse.ArgumentParser(prog="moeplex-adapters", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", parents=[common], help="validate and store a new version")
    up.add_argument("dir", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    up.add_argument("--name", required=True)
    up.add_argument("--base-model", default=os.environ.get("MOEPLEX_BASE_MODEL"),
                    help="base checkpoint directory to validate against (env MOEPLEX_BASE_MODEL)")
    defaults = StoreLimits()
    up.add_argument("--max-rank", type=int, default=defaults.max_rank)
    up.add_argument("--max-bytes", type=int, default=defaults.max_adapter_bytes)
    up.add_argument("--max-adapters", type=int, default=defaults.max_adapters_per_tenant)
    sub.add_parser("list", parents=[common], help="the tenant's adapters and the shared ones")
    show = sub.add_parser("show", parents=[common], help="manifest and versions of one adapter")
    show.add_argument("ref", help="name[@version] or owner/name[@version]")
    delete = sub.add_parser("delete", parents=[common], help="delete a version or a whole adapter")
    delete.add_argument("name")
    delete.add_argument("--version", help="only this version (default: every version)")
    share = sub.add_parser("share", parents=[common], help="operator: share an adapter with every tenant")
    share.add_argument("name")
    share.add_argument("--unshare", action="store_true", help="withdraw the share")
    gc = sub.add_parser("gc", parents=[store_args],
                        help="operator: delete the files of uploads that died before their manifest")
    gc.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS",
                    help="only versions whose every file is older (default 3600; must exceed the slowest upload)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "upload" and not args.base_model:
        parser.error("no base model given: pass --base-model CKPT_DIR or set MOEPLEX_BASE_MODEL")
    uri = args.store or default_store_uri()
    try:
        if args.command != "upload":
            _require_local_store(uri, _store_source(args))
        store = open_store(uri, endpoint_url=args.endpoint_url, region=args.region)
        result, text = COMMANDS[args.command](store, args)
    except AdapterStoreError as exc:
        code = next(c for kind, c in EXIT_CODES if isinstance(exc, kind))
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"code": exc.code, "message": str(exc)}}))
        return code
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def _store_source(args) -> str:
    if args.store:
        return "--store"
    return f"${STORE_ENV}" if store_from_env() else _DEFAULT_SOURCE


def _require_local_store(uri: str, source: str) -> None:
    """Refuse a local store directory that does not exist, instead of creating it empty."""
    if "://" in uri and not uri.startswith("file://"):
        return  # s3:// (or a bad scheme, which open_store names)
    path = Path(uri.removeprefix("file://")).expanduser()
    if path.is_dir():
        return
    if source == _DEFAULT_SOURCE:
        raise StoreUnavailableError(
            f"{source} {str(path)!r} does not exist yet: `upload` an adapter or start the service "
            f"to create it, or name another store with --store / ${STORE_ENV}", code="store_not_found")
    hint = f"; for S3 write s3://{uri}" if not path.is_absolute() else ""
    raise StoreUnavailableError(
        f"store directory {str(path)!r} ({source}) does not exist{hint}; check the path, "
        "or `upload` an adapter there to create it", code="store_not_found")


def _upload(store, args):
    from tqdm import tqdm

    limits = StoreLimits(args.max_rank, args.max_bytes, args.max_adapters)
    total = sum((Path(args.dir) / f).stat().st_size for f in ADAPTER_FILES if (Path(args.dir) / f).is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {args.name}", file=sys.stderr,
              disable=args.json or None) as bar:
        info = store.put(args.tenant, args.name, args.dir, args.base_model, limits=limits, progress=bar.update)
    return _info_dict(info), f"stored {info.ref} ({info.size_bytes} bytes, rank {info.manifest['rank']})"


def _list(store, args):
    infos = store.list_adapters(args.tenant)
    rows = [_row(i, own=i.tenant == args.tenant) for i in infos]
    return [_info_dict(i) for i in infos], _table(rows) if rows else "no adapters"


def _show(store, args):
    info = store.resolve(args.tenant, args.ref)
    ref = info.name if info.tenant == args.tenant else f"{info.tenant}/{info.name}"
    versions = store.list_versions(args.tenant, ref)
    text = json.dumps(info.manifest, indent=2) + "\nversions:\n" + "\n".join(f"  {v.version}" for v in versions)
    return {**_info_dict(info), "versions": [v.version for v in versions]}, text


def _delete(store, args):
    store.delete(args.tenant, args.name, args.version)
    what = f"{args.name}@{args.version}" if args.version else f"{args.name} (every version)"
    return {"deleted": {"tenant": args.tenant, "name": args.name, "version": args.version}}, f"deleted {what}"


def _share(store, args):
    store.share(args.tenant, args.name, shared=not args.unshare)
    state = "unshared" if args.unshare else f"shared: other tenants use it as {args.tenant}/{args.name}"
    return {"tenant": args.tenant, "name": args.name, "shared": not args.unshare}, f"{args.name} {state}"


def _gc(store, args):
    if args.older_than < 0:
        raise AdapterStoreError(f"--older-than {args.older_than:g} is negative; pass an age in seconds",
                                code="bad_argument")
    removed = store.collect_garbage(older_than_s=args.older_than, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    text = "\n".join(f"{verb} {p}" for p in removed) or "no garbage"
    return {"dry_run": args.dry_run, "removed": removed}, text


COMMANDS = {"upload": _upload, "list": _list, "show": _show, "delete": _delete, "share": _share, "gc": _gc}


def _info_dict(info: AdapterInfo) -> dict:
    return {"tenant": info.tenant, "name": info.name, "version": info.version, "ref": info.ref,
            "shared": info.shared, "size_bytes": info.size_bytes, "manifest": info.manifest}


def _row(info: AdapterInfo, own: bool) -> list[str]:
    name = info.name if own else f"{info.tenant}/{info.name}"
    return [name, info.version, str(info.manifest["rank"]), info.manifest["layout"],
            str(info.size_bytes), "yes" if info.shared else "no"]


def _table(rows: list[list[str]]) -> str:
    rows = [["NAME", "VERSION", "RANK", "LAYOUT", "BYTES", "SHARED"], *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


if __name__ == "__main__":
    sys.exit(main())
