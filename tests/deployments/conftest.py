"""Fixtures of the Serve tests: one Ray instance + Serve app per module that asks for it.

`service`: two engine replicas on the tiny checkpoint, the adapter store on an S3 server
on loopback (moto), a key file with three tenants. `oracle`: the engine called directly.
"""
import json
import os

import pytest

from tests.deployments.fake_cluster import free_port
from tests.deployments.serve_helpers import (APP, BASE, KEYS, MAX_ADAPTER_BYTES,
                                             MAX_ADAPTERS_PER_TENANT, MAX_MODEL_LEN, DirectEngine,
                                             auth, upload)

@pytest.fixture(scope="module")
def s3_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import boto3
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="adapters")
    yield url
    server.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_checkpoint, s3_url):
    import ray
    from ray import serve

    from deployments.app import build_app, set_ray_env_defaults
    from deployments.args import AppArgs
    from deployments.auth import hash_key

    workdir = tmp_path_factory.mktemp("serve")
    keys = workdir / "keys.yaml"
    tenants = {t: {"key_sha256": [hash_key(k)]} for t, k in KEYS.items()}
    tenants["solo"]["max_concurrent_requests"] = 1
    keys.write_text(json.dumps({"tenants": tenants}))
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "OMP_NUM_THREADS": "1"}
    metrics_port = free_port()
    # Serve's Python proxy: HAProxy mode (the default where its binary is installed) binds every
    # interface and fixed stats ports, and tests bind loopback on ports the OS picks
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    set_ray_env_defaults()  # the proxy's transport, as `serve run` starts Ray
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": aws},
             _temp_dir=str(workdir / "ray"), _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(model=str(tiny_checkpoint()), served_model_name=BASE, store="s3://adapters/store",
                   store_endpoint_url=s3_url, store_region="us-east-1", api_keys=str(keys),
                   cache_dir=str(workdir / "cache"), num_replicas=2, device="cpu",
                   max_model_len=MAX_MODEL_LEN, max_adapter_bytes=MAX_ADAPTER_BYTES,
                   max_num_seqs=16, max_adapters_per_tenant=MAX_ADAPTERS_PER_TENANT)
    serve.run(build_app(args), name=APP, route_prefix="/")
    try:
        yield Service(f"http://127.0.0.1:{port}", workdir / "ray", metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()


class Service(str):
    """The base URL, with the Ray temp dir (logs are checked for prompts) and metrics port."""

    def __new__(cls, url: str, ray_dir, metrics_port: int):
        self = super().__new__(cls, url)
        self.ray_dir, self.metrics_port = ray_dir, metrics_port
        return self


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint):
    return DirectEngine(tiny_checkpoint(), MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def adapters(service, tiny_adapter):
    """acme/style and globex/style (same name, different weights), uploaded over HTTP."""
    dirs = {"acme": tiny_adapter(seed=1), "globex": tiny_adapter(seed=2, rank=4)}
    for tenant, path in dirs.items():
        response = upload(service, auth(tenant), "style", path)
        assert response.status_code == 201, response.text
        assert response.json()["owner"] == tenant and response.json()["name"] == "style"
    return dirs
