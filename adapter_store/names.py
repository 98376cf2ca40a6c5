"""Safe names and adapter references.

Tenant, adapter and version names are one path segment each: 1-64 characters of
letters, digits, '.', '_' and '-', starting with a letter or digit, never '..'.
A reference a tenant passes to `resolve` is `name`, `name@version`, or, for an
adapter another tenant's operator shared, `owner/name` or `owner/name@version`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from adapter_store.errors import InvalidNameError

MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(value: str, what: str = "adapter name") -> str:
    """Return `value` if it is a safe single path segment, else raise InvalidNameError."""
    if not isinstance(value, str) or not value:
        raise InvalidNameError(f"{what} is empty; use 1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-'")
    shown = value[:80].encode("unicode_escape").decode()
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"{what} {shown!r} is {len(value)} characters long; the limit is {MAX_NAME_LENGTH}")
    if ".." in value or not _NAME_RE.fullmatch(value):
        raise InvalidNameError(
            f"{what} {shown!r} is not allowed: use letters, digits, '.', '_' and '-' only, "
            "starting with a letter or digit (no '/', '..', '@', spaces or control characters)"
        )
    return value


def is_name(value: str) -> bool:
    """Whether `value` passes `check_name`: keys a backend lists may hold other things (a local
    store's temporary files)."""
    try:
        check_name(value)
    except InvalidNameError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A parsed reference: owner is None for the caller's own namespace."""

    owner: str | None
    name: str
    version: str | None


def pinned_ref(owner: str, name: str, version: str) -> str:
    """`owner/name@version`: one version of one tenant's adapter, the identity that travels
    from the ingress to the replica (`multiplexed_model_id`) and names it in the engine."""
    return f"{owner}/{name}@{version}"


def parse_pinned_ref(ref: str) -> AdapterRef:
    """Parse a `pinned_ref`; owner and version must both be there."""
    parsed = parse_ref(ref)
    if parsed.owner is None or parsed.version is None:
        raise InvalidNameError(f"adapter reference {ref!r} is not pinned; expected 'owner/name@version'")
    return parsed


def ref_name(ref: str) -> str:
    """The adapter name in `[owner/]name[@version]`, unchecked (for cache keys of refs that
    may not parse)."""
    return ref.partition("@")[0].rpartition("/")[2]


def parse_ref(ref: str) -> AdapterRef:
    """Parse `[owner/]name[@version]`, checking every part."""
    if not isinstance(ref, str) or not ref:
        raise InvalidNameError("adapter reference is empty; pass 'name', 'name@version' or 'owner/name'")
    body, _, version = ref.partition("@")
    owner, slash, name = body.rpartition("/")
    if slash and "/" in owner:
        raise InvalidNameError(f"adapter reference {ref!r} has more than one '/'; use 'owner/name[@version]'")
    return AdapterRef(
        owner=check_name(owner, "owner tenant") if slash else None,
        name=check_name(name),
        version=check_name(version, "version") if "@" in ref else None,
    )
