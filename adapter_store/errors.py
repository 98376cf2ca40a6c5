"""Typed errors of the adapter store; every message says what to fix.

Each error carries a short machine-readable `code` (stable, for HTTP bodies and the
CLI's --json output) next to its human message.

    AdapterStoreError
    +-- ValidationError          the upload is refused; nothing was stored
    |   +-- InvalidNameError     tenant, adapter or version name unsafe
    |   +-- LimitExceededError   rank, size or adapter count over the tenant's limit
    +-- AdapterNotFoundError     no such adapter/version visible to this tenant (never "forbidden")
    +-- StoreUnavailableError    backend unreachable, missing bucket, bad credentials
    +-- ChecksumMismatchError    a stored file does not match its manifest
"""
from __future__ import annotations


class AdapterStoreError(Exception):
    """Base of every error the adapter store raises."""

    code = "store_error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ValidationError(AdapterStoreError):
    """The adapter was refused before anything was stored."""

    code = "invalid_adapter"


class InvalidNameError(ValidationError):
    code = "invalid_name"


class LimitExceededError(ValidationError):
    code = "limit_exceeded"


class AdapterNotFoundError(AdapterStoreError):
    code = "not_found"


class StoreUnavailableError(AdapterStoreError):
    code = "store_unavailable"


class ChecksumMismatchError(AdapterStoreError):
    code = "checksum_mismatch"
