"""S3-only behaviour: multipart upload, ranged parallel download, clear backend errors."""
import math

import pytest

from adapter_store import DiskCache, open_store
from adapter_store.errors import AdapterStoreError, StoreUnavailableError
from adapter_store.local import LocalStore
from adapter_store.s3 import S3Store
from tests.adapter_store.conftest import free_port, make_bucket, s3_store
from tests.adapter_store.helpers import WEIGHTS, same_files


def _count(store, *operations) -> dict:
    counts = {op: 0 for op in operations}
    for op in operations:
        store.client.meta.events.register(f"before-send.s3.{op}",
                                          lambda _op=op, **kw: counts.__setitem__(_op, counts[_op] + 1))
    return counts


def test_multipart_upload_and_ranged_download(moto_server, tiny_adapter, base_model, tmp_path):
    store = s3_store(moto_server, make_bucket(moto_server), chunk_bytes=32 << 10)
    src = tiny_adapter(rank=16)
    size = (src / WEIGHTS).stat().st_size
    assert size > 3 * store.chunk_bytes
    counts = _count(store, "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
    info = store.put("acme", "big", src, base_model)
    assert counts["CreateMultipartUpload"] == 1 and counts["CompleteMultipartUpload"] == 1
    assert counts["UploadPart"] == math.ceil(size / (5 << 20))  # S3 parts are >= 5 MiB but the last
    ranges = []
    store.client.meta.events.register("before-parameter-build.s3.GetObject",
                                      lambda params, **kw: ranges.append(params.get("Range")))
    path = DiskCache(tmp_path / "cache", 1 << 30).fetch(store, info)
    assert same_files(path, src)
    # One range for the small config, then the weights in chunk-sized ranges.
    want = [(0, info.manifest["files"]["adapter_config.json"]["size"] - 1)] + [
        (start, min(start + store.chunk_bytes, size) - 1) for start in range(0, size, store.chunk_bytes)]
    assert sorted(ranges[1:]) == sorted(f"bytes={a}-{b}" for a, b in want[1:])
    assert ranges[0] == f"bytes={want[0][0]}-{want[0][1]}"


def test_missing_bucket_is_a_clear_error(moto_server, adapter, base_model):
    store = s3_store(moto_server, "no-such-bucket-here")
    for call in (lambda: store.put("acme", "ad", adapter, base_model), lambda: store.resolve("acme", "ad"),
                 lambda: store.list_adapters("acme")):
        with pytest.raises(StoreUnavailableError, match="no-such-bucket-here") as caught:
            call()
        assert caught.value.code == "missing_bucket"


def test_missing_credentials_are_a_clear_error(moto_server, monkeypatch):
    bucket = make_bucket(moto_server)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreUnavailableError, match="AWS_ACCESS_KEY_ID") as caught:
        s3_store(moto_server, bucket).list_adapters("acme")
    assert caught.value.code == "bad_credentials"


def test_unreachable_endpoint_is_a_clear_error(aws_env):
    store = S3Store("s3://bucket/p", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                    max_attempts=1, timeout_s=2.0)
    with pytest.raises(StoreUnavailableError, match="unreachable") as caught:
        store.resolve("acme", "ad")
    assert caught.value.code == "unreachable"


def test_open_store_picks_the_backend(tmp_path, aws_env):
    assert isinstance(open_store(str(tmp_path / "a")), LocalStore)
    assert open_store(f"file://{tmp_path}/b").root == tmp_path / "b"
    s3 = open_store("s3://bkt/some/prefix", endpoint_url="http://127.0.0.1:1", region="us-east-1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bkt", "some/prefix")
    for bad in ("gs://bucket", "", "s3://"):
        with pytest.raises(AdapterStoreError):
            open_store(bad)
