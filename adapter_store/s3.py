"""S3Store: the adapter store in S3 or any S3-compatible service (MinIO, R2, Ceph RGW).

- Credentials come from boto3's standard chain (env, config files, instance roles).
- Uploads go through boto3's managed transfer: multipart above `chunk_bytes`, parts
  in parallel, each part retried by botocore.
- Downloads are parallel ranged GETs into a preallocated file; each range is retried
  with exponential backoff and jitter on throttling, 5xx, timeouts and dropped
  connections (botocore retries the request, not a body that breaks mid-stream).
- The manifest is one PUT after every file is in place, and S3 PUTs are atomic, so
  no reader ever sees a partial version.
- No lock guards the per-tenant adapter count: it is checked again right before the
  manifest PUT, which narrows the race between two new names but does not close it.
- A stalled endpoint (connection open, no answer) fails a call with StoreUnavailableError
  (code "timeout") after at most `max_attempts` x (`connect_timeout_s` + `timeout_s`) plus
  backoff, 2 x 15 s by default, so a request bound to the store fails fast instead of
  waiting for the stall to end. A ranged download retries a range that breaks mid-stream
  on top of that, so one range waits at most `max_attempts` times as long.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError, ClientError, ConnectTimeoutError, NoCredentialsError, PartialCredentialsError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from adapter_store.errors import AdapterNotFoundError, AdapterStoreError, StoreUnavailableError
from adapter_store.store import AdapterStore
from adapter_store.versions import Progress

_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "InvalidClientTokenId", "UnrecognizedClientException", "403"}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                "ServiceUnavailable", "500", "502", "503", "504"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_OBJECT_ACTIONS = ("read", "download")  # where a 404 means the object is gone
_MIN_PART_BYTES = 5 << 20


class S3Store(AdapterStore):
    """Adapters under `s3://bucket/prefix`.

    `connect_timeout_s` bounds opening a connection, `timeout_s` any wait for the next bytes of
    an answer; `max_attempts` counts every try of one request, the first included.
    """

    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None,
                 chunk_bytes: int = 16 << 20, concurrency: int = 8, max_attempts: int = 2,
                 backoff_s: float = 0.2, timeout_s: float = 10.0, connect_timeout_s: float = 5.0):
        if max_attempts < 1 or timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(f"S3Store needs max_attempts >= 1 (got {max_attempts}), timeout_s > 0 "
                             f"(got {timeout_s}) and connect_timeout_s > 0 (got {connect_timeout_s})")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or not bucket:
            raise AdapterStoreError(f"bad S3 URI {uri!r}; expected s3://bucket[/prefix]", code="bad_store_uri")
        if endpoint_url and not endpoint_url.startswith(("http://", "https://")):
            raise AdapterStoreError(f"S3 endpoint {endpoint_url!r} needs its scheme: http://{endpoint_url} "
                                    f"or https://{endpoint_url}", code="bad_store_uri")
        self.uri, self.bucket, self.prefix = uri, bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.chunk_bytes, self.concurrency = chunk_bytes, concurrency
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        # botocore's `max_attempts` counts retries only; `total_max_attempts` counts the first try too
        config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                        connect_timeout=connect_timeout_s, read_timeout=timeout_s,
                        max_pool_connections=max(10, 2 * concurrency),
                        s3={"addressing_style": "path" if endpoint_url else "auto"})
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                                     region_name=region, config=config)
        # S3 wants every part but the last to be at least 5 MiB.
        self._transfer = TransferConfig(multipart_threshold=chunk_bytes,
                                        multipart_chunksize=max(chunk_bytes, _MIN_PART_BYTES),
                                        max_concurrency=concurrency, use_threads=True)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, action: str, key: str):
        """Translate boto errors into the store's typed errors, with what to do about them."""
        where = f"s3://{self.bucket}/{self._key(key)}"
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreUnavailableError(f"no usable AWS credentials to {action} {where} ({exc}); set "
                                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
                                        code="bad_credentials") from None
        except ClientError as exc:
            raise self._client_error(exc, action, where) from None
        except S3UploadFailedError as exc:  # boto3's transfer manager wraps the ClientError in it
            cause = exc.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(cause, action, where) from None
            raise StoreUnavailableError(f"S3 failed to {action} {where}: {exc}", code="s3_error") from None
        except (ReadTimeoutError, ConnectTimeoutError) as exc:
            raise StoreUnavailableError(f"S3 endpoint did not answer within {self.connect_timeout_s:g} s "
                                        f"(connect) / {self.timeout_s:g} s (read) while trying to {action} "
                                        f"{where}, {self.max_attempts} attempts ({exc}); check that the "
                                        "endpoint is up, then retry", code="timeout") from None
        except (BotoCoreError, Urllib3Error, ConnectionError) as exc:
            raise StoreUnavailableError(f"S3 endpoint unreachable while trying to {action} {where} "
                                        f"after {self.max_attempts} attempts ({exc}); check the endpoint "
                                        "URL and network, then retry", code="unreachable") from None

    def _client_error(self, exc: ClientError, action: str, where: str) -> AdapterStoreError:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StoreUnavailableError(f"bucket {self.bucket!r} does not exist: create it or fix the "
                                         "store URI (--store / MOEPLEX_STORE)", code="missing_bucket")
        if code in _MISSING and action in _OBJECT_ACTIONS:
            return AdapterNotFoundError(f"{where} is gone (deleted since it was resolved?); resolve the "
                                        "adapter again", code="not_found")
        if code in _MISSING:  # S3 lists an empty prefix and deletes a missing key without a 404
            return StoreUnavailableError(f"the S3 endpoint answered 404 ({code}) to {action} {where}: is "
                                         f"{self.endpoint_url or 'the endpoint'} an S3 API endpoint (not, "
                                         "say, a console port)?", code="s3_error")
        if code in _CREDENTIAL_CODES:
            return StoreUnavailableError(f"S3 refused to {action} {where} ({code}): check the AWS "
                                         "credentials and the bucket policy", code="bad_credentials")
        return StoreUnavailableError(f"S3 failed to {action} {where}: {code} {exc}", code="s3_error")

    def _read(self, key: str) -> bytes | None:
        with self._errors("read", key):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _MISSING:
                    return None
                raise

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        if len(keys) < 2:
            return [self._read(key) for key in keys]
        with ThreadPoolExecutor(min(len(keys), self.concurrency)) as pool:  # the client is thread-safe
            return list(pool.map(self._read, keys))

    def _write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _upload_file(self, key: str, path: Path, progress: Progress) -> None:
        # boto3's transfer manager runs the callback in its threads and does not always
        # re-raise what it raises (a Ctrl-C there aborts the upload yet returns): keep the
        # exception, raise it here, and check the object's size before going on.
        raised: list[BaseException] = []

        def callback(nbytes: int) -> None:
            try:
                if progress is not None:
                    progress(nbytes)
            except BaseException as exc:
                raised.append(exc)
                raise

        size = path.stat().st_size
        with self._errors("upload", key):
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer,
                                    Callback=callback)
            if raised:
                raise raised[0]
            stored = self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        if stored != size:
            raise StoreUnavailableError(f"upload of {key} stored {stored} of {size} bytes; retry the upload",
                                        code="incomplete_upload")

    def _download_file(self, key: str, dest: Path, size: int, progress: Progress) -> None:
        ranges = [(start, min(start + self.chunk_bytes, size) - 1)
                  for start in range(0, size, self.chunk_bytes)]
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            with self._errors("download", key), ThreadPoolExecutor(self.concurrency) as pool:
                for done in pool.map(lambda r: self._get_range(key, fd, r, progress), ranges):
                    pass
            os.fsync(fd)
        finally:
            os.close(fd)

    def _get_range(self, key: str, fd: int, byte_range: tuple[int, int], progress: Progress) -> None:
        first, last = byte_range
        for attempt in range(self.max_attempts):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                              Range=f"bytes={first}-{last}")["Body"]
                offset = first
                while chunk := body.read(1 << 20):
                    os.pwrite(fd, chunk, offset)
                    offset += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                if offset != last + 1:
                    raise StoreUnavailableError(f"short read of bytes {first}-{last}", code="unreachable")
                return
            except (BotoCoreError, ClientError, StoreUnavailableError, Urllib3Error, ConnectionError) as exc:
                if attempt + 1 == self.max_attempts or not _retryable(exc):
                    raise
                time.sleep(self.backoff_s * 2 ** attempt * (0.5 + random.random()))

    def _list_children(self, prefix: str) -> list[str]:
        base = self._key(prefix).rstrip("/") + "/"
        names = set()
        with self._errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/")
            for page in pages:
                names.update(p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", []))
                names.update(o["Key"][len(base):] for o in page.get("Contents", []))
        return sorted(n for n in names if n)

    def _list_objects(self, prefix: str) -> list[tuple[str, float]]:
        base = self._key(prefix).rstrip("/") + "/"
        skip = len(self._key(""))
        found = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                found += [(o["Key"][skip:], o["LastModified"].timestamp()) for o in page.get("Contents", [])]
        return found

    def _delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _delete_prefix(self, prefix: str) -> None:
        base = self._key(prefix).rstrip("/") + "/"
        with self._errors("delete", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            for page in pages:
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return error.get("Code") in _RETRY_CODES or status in _RETRY_CODES
    return True  # connection drops, timeouts, short reads, broken streams
