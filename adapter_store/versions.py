"""A stored adapter version: its description (AdapterInfo), its name, its keys and file digests."""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from adapter_store.names import pinned_ref

Progress = Callable[[int], None] | None  # called with the number of bytes just moved


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """One visible version of an adapter; `tenant` is its owner."""

    tenant: str
    name: str
    version: str
    manifest: dict
    shared: bool = False

    @property
    def ref(self) -> str:
        return pinned_ref(self.tenant, self.name, self.version)

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.manifest["files"].values())


def adapter_key(tenant: str, name: str) -> str:
    return f"tenants/{tenant}/adapters/{name}"


def version_key(tenant: str, name: str, version: str) -> str:
    return f"{adapter_key(tenant, name)}/versions/{version}"


def new_version() -> str:
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond:06d}Z-{secrets.token_hex(3)}"


def file_digest(path: Path) -> dict:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}
