"""Tenants from API keys: a YAML key file of hashed keys, or dev mode with X-Tenant-Id.

Key file (keys are never stored in the clear; `python -m deployments.auth KEY` prints a hash):

    tenants:
      acme:
        key_sha256: [9f86d081884c7d65...]     # one or more hashed keys
        max_concurrent_requests: 16            # optional, overrides the app default
      globex:
        key_sha256: [...]

Without a key file (development mode) the `X-Tenant-Id` header names the tenant.
With one, `Authorization: Bearer <key>` names it and a disagreeing `X-Tenant-Id` is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.errors import AuthenticationError, BadRequestError, PermissionDeniedError

TENANT_HEADER = "x-tenant-id"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class KeyFileError(ValueError):
    """The API key file cannot be read or is malformed; the message says what to fix."""


class TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key_sha256: list[str] = Field(min_length=1)
    max_concurrent_requests: int | None = Field(default=None, gt=0)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: dict[str, TenantEntry]


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_tenant_id(tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise BadRequestError(
            f"tenant id {tenant!r} is invalid: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit", code="invalid_tenant")
    return tenant


class TenantAuth:
    """Maps request headers to a tenant id; `keys=None` is development mode."""

    def __init__(self, keys: KeyFile | None = None):
        self.dev_mode = keys is None
        self._tenant_by_hash: dict[str, str] = {}
        self._limits: dict[str, int | None] = {}
        for tenant, entry in (keys.tenants.items() if keys else ()):
            self._limits[tenant] = entry.max_concurrent_requests
            for digest in entry.key_sha256:
                self._tenant_by_hash[digest] = tenant

    @classmethod
    def from_file(cls, path: str | Path | None) -> "TenantAuth":
        return cls(None if path is None else load_key_file(path))

    def tenants(self) -> list[str]:
        return sorted(set(self._tenant_by_hash.values()))

    def max_concurrent(self, tenant: str) -> int | None:
        return self._limits.get(tenant)

    def tenant_of(self, headers) -> str:
        """The tenant a request acts for; AuthenticationError / PermissionDeniedError if none."""
        claimed = headers.get(TENANT_HEADER)
        if self.dev_mode:
            if not claimed:
                raise AuthenticationError(
                    "development mode: send the tenant in the X-Tenant-Id header",
                    code="missing_tenant")
            return check_tenant_id(claimed)
        tenant = self._tenant_of_key(_bearer_token(headers))
        # Tenant ids are not secrets; compare_digest would raise on a non-ASCII header.
        if claimed and claimed != tenant:
            raise PermissionDeniedError(
                "the X-Tenant-Id header names another tenant than the API key; drop the header "
                "or send the tenant your key belongs to", code="tenant_mismatch")
        return tenant

    def _tenant_of_key(self, key: str) -> str:
        tenant = self._tenant_by_hash.get(hash_key(key))
        if tenant is None:
            raise AuthenticationError("incorrect API key provided", code="invalid_api_key")
        return tenant


def _bearer_token(headers) -> str:
    value = headers.get("authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "missing API key: send 'Authorization: Bearer <your key>'", code="missing_api_key")
    return token.strip()


def load_key_file(path: str | Path) -> KeyFile:
    """Read and check a key file (see the module docstring for its layout)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KeyFileError(f"cannot read API key file {path}: {exc}") from exc
    try:
        keys = KeyFile.model_validate(raw)
    except ValidationError as exc:
        raise KeyFileError(f"API key file {path} is malformed: {exc}") from exc
    for tenant, entry in keys.tenants.items():
        if not TENANT_RE.match(tenant):
            raise KeyFileError(f"{path}: tenant id {tenant!r} is invalid (letters, digits, _ . -)")
        bad = [d for d in entry.key_sha256 if not _SHA256_RE.match(d)]
        if bad:
            raise KeyFileError(f"{path}: tenant {tenant!r} lists a key that is not a lowercase "
                               "sha256 hex digest; store hashes (python -m deployments.auth KEY)")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.auth", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the sha256 of an API key, to list under `key_sha256` in the key file "
        "(the app's `api_keys`); the key itself is never stored.",
        epilog="key file (YAML):\n  tenants:\n    acme:\n      key_sha256: [<the hash printed>]\n"
        "      max_concurrent_requests: 16   # optional, overrides the app default")
    parser.add_argument("key", help="the tenant's API key (a key starting with '-' goes after --)")
    args = parser.parse_args(argv)
    print(hash_key(args.key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
