"""Autoscaling on a local autoscaling Ray cluster (fake multi-node provider).

The worker node type carries a custom resource `moeplex_replica` that each engine replica
asks for, so a new replica needs a new node: sustained load takes replicas 1 -> 2 and
nodes 2 -> 3 (head + workers), and both go back once the load ends. The app runs on its
defaults (embedded tiny checkpoint generated on first start, local adapter store).
"""
import threading
import time

import httpx
import pytest

from tests.deployments.fake_cluster import FakeAutoscalingCluster, free_port, wait_for

APP = "moeplex-autoscale"
NUM_CLIENTS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("RAY_AUTH_MODE", "disabled")
    fake = FakeAutoscalingCluster(tmp_path_factory.mktemp("fake-cluster"),
                                  worker_resources={"CPU": 2, "moeplex_replica": 1},
                                  max_workers=2, idle_timeout_minutes=0.2)
    try:
        fake.start()
        yield fake
    finally:
        fake.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    patcher = pytest.MonkeyPatch()
    yield patcher
    patcher.undo()


@pytest.fixture(scope="module")
def autoscaled(cluster, tmp_path_factory):
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.args import AppArgs

    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    # One proxy on the head: the fake worker nodes share this machine's ports.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(
        cache_dir=str(tmp_path_factory.mktemp("autoscale-cache")), device="cpu",
        max_model_len=256, replica_resources={"moeplex_replica": 1}, replica_num_cpus=1,
        autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                            "upscale_delay_s": 2, "downscale_delay_s": 8,
                            "metrics_interval_s": 1, "look_back_period_s": 4})
    serve.run(build_app(args), name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments["LLMServer"]
    return status.replica_states.get("RUNNING", 0)


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"])


def _closed_loop_client(url: str, stop: threading.Event, counts: dict) -> None:
    body = {"model": "moeplex-tiny-qwen3-moe", "prompt": "Mixture of experts", "max_tokens": 24,
            "temperature": 0}
    with httpx.Client(timeout=120, headers={"X-Tenant-Id": "load"}) as client:
        while not stop.is_set():
            response = client.post(f"{url}/v1/completions", json=body)
            counts["ok" if response.status_code == 200 else "failed"] += 1


def test_load_scales_replicas_and_nodes_up_then_down(autoscaled):
    assert _running_replicas() == 1 and _alive_nodes() == 2
    stop, counts = threading.Event(), {"ok": 0, "failed": 0}
    clients = [threading.Thread(target=_closed_loop_client, args=(autoscaled, stop, counts))
               for _ in range(NUM_CLIENTS)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: _running_replicas() >= 2, timeout_s=240, what="a second replica")
        peak_nodes = _alive_nodes()
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=180)
    assert peak_nodes == 3, "a second replica needs a new worker node"
    assert counts["ok"] > 0 and counts["failed"] == 0, counts
    started = time.monotonic()
    wait_for(lambda: _running_replicas() == 1, timeout_s=180, what="scale down to 1 replica")
    wait_for(lambda: _alive_nodes() == 2, timeout_s=180, what="the idle worker node removed")
    assert time.monotonic() - started < 360
