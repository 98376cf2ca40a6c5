"""Fixtures of the adapter-store tests: a moto S3 server on loopback and a store per backend.

The S3 server is moto's standalone server (HTTP on 127.0.0.1, a free port); boto3 talks
to it over real HTTP. It runs in a thread of the test process so that it can be
stopped and restarted on the same port with its buckets intact.
"""
import os
import socket
import uuid

import pytest
from moto.server import ThreadedMotoServer

from adapter_store.local import LocalStore
from adapter_store.s3 import S3Store

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """moto's threaded server with a stop that also closes the listening socket."""

    def __init__(self):
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self):
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self):
        self._server.stop()
        self._server._server.server_close()  # refuse connections, free the port


@pytest.fixture(scope="session")
def aws_env():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        yield AWS_ENV


@pytest.fixture(scope="session")
def moto_server(aws_env):
    server = MotoServer()
    server.start()
    yield server
    server.stop()


def make_bucket(moto_server) -> str:
    import boto3

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def s3_store(moto_server, bucket: str, **options) -> S3Store:
    options = {"chunk_bytes": 16 << 10, "concurrency": 4, "max_attempts": 2, "backoff_s": 0.05,
               "timeout_s": 5.0, **options}
    return S3Store(f"s3://{bucket}/moeplex", endpoint_url=moto_server.endpoint_url,
                   region="us-east-1", **options)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same tests against LocalStore and S3Store (through moto's server)."""
    if request.param == "local":
        return LocalStore(tmp_path / "store", chunk_bytes=16 << 10)
    server = request.getfixturevalue("moto_server")
    return s3_store(server, make_bucket(server))


@pytest.fixture
def base_model(tiny_checkpoint):
    return tiny_checkpoint("qwen3_moe")


@pytest.fixture
def adapter(tiny_adapter):
    return tiny_adapter("qwen3_moe", "per_expert", rank=4)
