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


def test_a_write_s3_refuses_in_the_transfer_manager_is_the_typed_credentials_error(moto_server, adapter,
                                                                                   base_model, monkeypatch):
    """boto3's transfer manager wraps the AccessDenied of a read-only key in S3UploadFailedError:
    it was an untyped traceback (CLI) and a 500 (HTTP), where delete and share gave the typed error."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError
    store = s3_store(moto_server, make_bucket(moto_server))

    def read_only_key(*_args, **_kwargs):
        try:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")
        except ClientError as denied:
            raise S3UploadFailedError("Failed to upload (AccessDenied)") from denied
    monkeypatch.setattr(store.client, "upload_file", read_only_key)
    with pytest.raises(StoreUnavailableError, match="credentials") as caught:
        store.put("acme", "ad", adapter, base_model)
    assert caught.value.code == "bad_credentials"


def test_an_endpoint_that_answers_404_to_a_listing_is_unavailable_not_a_missing_adapter(aws_env):
    """A listing never 404s on S3: an endpoint that does (a console port, a web server) is a store
    problem for the operator (503, exit 5), not an adapter the tenant lacks (404, exit 4)."""
    import http.server
    import threading

    class NotS3(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *_args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), NotS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = S3Store("s3://adapters/p", endpoint_url=f"http://127.0.0.1:{server.server_port}",
                        region="us-east-1", max_attempts=1)
        with pytest.raises(StoreUnavailableError, match="S3 API endpoint") as caught:
            store.list_adapters("acme")
        assert caught.value.code == "s3_error"
    finally:
        server.shutdown()
        server.server_close()


def test_an_endpoint_without_its_scheme_is_a_typed_error(aws_env):
    with pytest.raises(AdapterStoreError, match="needs its scheme") as caught:
        S3Store("s3://adapters/p", endpoint_url="127.0.0.1:9000")
    assert caught.value.code == "bad_store_uri"


def test_list_adapters_costs_one_manifest_read_per_adapter_and_three_listings(moto_server, adapter, base_model):
    store = s3_store(moto_server, make_bucket(moto_server))
    for name in ("a", "b", "c", "d", "e"):
        store.put("acme", name, adapter, base_model)
    store.put("acme", "a", adapter, base_model)
    store.put("beta", "theirs", adapter, base_model)
    store.share("beta", "theirs")
    counts = _count(store, "ListObjectsV2", "GetObject", "HeadObject")
    listed = store.list_adapters("acme")
    assert [i.name for i in listed] == ["a", "b", "c", "d", "e", "theirs"]
    # the tenant's adapters, the share marks, the sharer's adapter; a manifest each
    assert counts == {"ListObjectsV2": 3, "GetObject": 6, "HeadObject": 0}
