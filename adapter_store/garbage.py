"""Garbage of crashed uploads: version prefixes that never got their manifest.

An upload writes its files, then the manifest (the commit point). One that dies in
between leaves files under `tenants/{t}/adapters/{n}/versions/{v}/` that no reader sees
and nothing else deletes. A version prefix is garbage when it has no manifest and every
object under it is older than `older_than_s` by the backend's own clock (S3
LastModified, local mtime); uploads in flight keep writing, so their objects are young.

`older_than_s` must be longer than the slowest upload: an S3 multipart object's
LastModified is when its upload began, and an upload that outlives the age would lose
its files under a manifest it then writes.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from adapter_store.errors import InvalidNameError
from adapter_store.names import check_name

if TYPE_CHECKING:
    from adapter_store.store import AdapterStore

MANIFEST_FILE = "manifest.json"
_VERSION_DEPTH = 6  # tenants/{t}/adapters/{n}/versions/{v}


def version_prefix(key: str) -> str | None:
    """`tenants/t/adapters/n/versions/v[/...]` -> its version prefix; None for any other key."""
    parts = key.split("/")
    if len(parts) < _VERSION_DEPTH or parts[0] != "tenants" or parts[2] != "adapters" or parts[4] != "versions":
        return None
    try:  # temporary names (".tmp-...") and anything not made by the store are left alone
        for part, what in zip(parts[1:6:2], ("tenant name", "adapter name", "version")):
            check_name(part, what)
    except InvalidNameError:
        return None
    return "/".join(parts[:_VERSION_DEPTH])


def find_orphans(objects: list[tuple[str, float]], cutoff: float) -> list[str]:
    """Version prefixes among `(key, modified_unix)` objects with no manifest, all older than cutoff."""
    newest: dict[str, float] = {}
    committed: set[str] = set()
    for key, modified in objects:
        prefix = version_prefix(key)
        if prefix is None:
            continue
        newest[prefix] = max(newest.get(prefix, modified), modified)
        if key == f"{prefix}/{MANIFEST_FILE}":
            committed.add(prefix)
    return sorted(p for p, t in newest.items() if p not in committed and t < cutoff)


def collect_garbage(store: AdapterStore, older_than_s: float = 3600, now: float | None = None,
                    dry_run: bool = False) -> list[str]:
    """Delete (unless dry_run) and return the version prefixes of crashed uploads."""
    if not older_than_s >= 0:
        raise ValueError(f"older_than_s={older_than_s!r}; pass a non-negative age in seconds")
    cutoff = (time.time() if now is None else now) - older_than_s
    orphans = find_orphans(store._list_objects("tenants"), cutoff)
    removed = []
    for prefix in orphans:
        # Narrow the window against an upload committing right now: look once more.
        if store._read(f"{prefix}/{MANIFEST_FILE}") is not None:
            continue
        if not dry_run:
            store._delete_prefix(prefix)
        removed.append(prefix)
    return removed
