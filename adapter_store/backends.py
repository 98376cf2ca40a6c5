"""`open_store(uri)`: the store URI picks the backend.

This module sits above `store` and both backends, so the base class never has to know
its subclasses.
"""
from __future__ import annotations

from adapter_store.errors import AdapterStoreError
from adapter_store.local import LocalStore
from adapter_store.store import AdapterStore


def open_store(uri: str, endpoint_url: str | None = None, region: str | None = None,
               **options) -> AdapterStore:
    """`/dir`, `file:///dir` -> LocalStore; `s3://bucket/prefix` -> S3Store."""
    if not isinstance(uri, str) or not uri:
        raise AdapterStoreError("store URI is empty; pass a directory, file:///dir or s3://bucket/prefix",
                                code="bad_store_uri")
    if uri.startswith("s3://"):
        from adapter_store.s3 import S3Store  # boto3 only where S3 is used (the engine never needs it)
        return S3Store(uri, endpoint_url=endpoint_url, region=region, **options)
    if "://" in uri and not uri.startswith("file://"):
        raise AdapterStoreError(f"unsupported store URI {uri!r}; use a directory, file:///dir or "
                                "s3://bucket/prefix", code="bad_store_uri")
    return LocalStore(uri.removeprefix("file://"), **options)
