"""Request bodies over the cap get a 413 in OpenAI's error JSON before any route parses them."""
import asyncio
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.http_guards import BodyLimitMiddleware, BodyTooLarge, default_max_body_bytes

LIMIT = 1000


@pytest.fixture
def client():
    app = FastAPI()
    app.add_middleware(BodyLimitMiddleware, limit=lambda: LIMIT)
    seen = []

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request, exc: BodyTooLarge):
        return exc.api_error.response()

    @app.post("/v1/completions")
    async def completions(body: dict):
        seen.append(body)
        return {"chars": len(body["prompt"])}

    @app.post("/v1/adapters")
    async def upload(body: dict):
        return {"chars": len(body["prompt"])}

    test_client = TestClient(app)
    test_client.seen = seen
    return test_client


def test_a_body_within_the_cap_reaches_the_route(client):
    assert client.post("/v1/completions", json={"prompt": "x" * 100}).json() == {"chars": 100}


def test_a_declared_length_over_the_cap_is_refused_before_the_route(client):
    response = client.post("/v1/completions", json={"prompt": "x" * 5000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert client.seen == []


def test_a_chunked_body_over_the_cap_is_refused_with_openais_error_json(client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    response = client.post("/v1/completions", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]
    assert client.seen == []


def test_uploads_are_left_to_their_own_limit(client):
    assert client.post("/v1/adapters", content=json.dumps({"prompt": "x" * 5000}),
                       headers={"content-type": "application/json"}).json() == {"chars": 5000}


def test_the_default_cap_grows_with_the_context_and_has_a_floor():
    assert default_max_body_bytes(2048) == 4 << 20
    assert default_max_body_bytes(262144) == 64 * 262144


@pytest.mark.parametrize("enabled", [True, False])
def test_the_api_docs_answer_only_when_enabled(enabled):
    from deployments.http_guards import DocsSwitch

    app = FastAPI()
    app.add_middleware(DocsSwitch, enabled=lambda: enabled)
    client = TestClient(app)
    for path in ("/docs", "/openapi.json"):
        response = client.get(path)
        assert response.status_code == (200 if enabled else 404)
        if not enabled:
            assert response.json()["error"]["type"] == "not_found_error"


def test_the_guards_see_paths_below_a_route_prefix():
    import asyncio

    from deployments.http_guards import DocsSwitch

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/api/openapi.json", "root_path": "/api",
             "headers": [], "query_string": b""}
    asyncio.run(DocsSwitch(app, enabled=lambda: False)(scope, receive, send))
    assert reached == [] and sent[0]["status"] == 404


_HEAP_SCRIPT = """
import sys
from deployments.http_guards import map_large_allocations

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "mapped":
    assert map_large_allocations()
del bytearray(1 << 20)[:]  # a large free: glibc's own rule would now raise its threshold
before = rss_mb()
chunks, keepers = [], []
for _ in range(800):  # body chunks of 256 KiB between small objects that outlive them
    chunks.append(bytearray(256 << 10))
    keepers.append(bytearray(4 << 10))
del chunks
print(rss_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_freed_body_chunks_leave_the_process_only_with_large_allocations_mapped():
    """200 MiB of 256 KiB chunks freed between 4 KiB survivors: with the ingress's setting
    the process gives them back; with glibc's default they stay (what uploads did)."""
    def retained_mb(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, mode], capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip())

    if not hasattr(ctypes.CDLL(None), "mallopt"):  # asked here without changing this process
        pytest.skip("the C library is not glibc")
    assert retained_mb("mapped") < 30
    assert retained_mb("default") > 150


def _feed_through_serves_receive_proxy(chunks: int, chunk_bytes: int) -> dict:
    """A body of `chunks` messages fed as fast as they come through Serve's own direct-ingress
    receive proxy, to an app that reads one message per loop turn: the most messages waiting in
    its queue, and whether the app got every byte, in order, then the disconnect."""
    from ray.serve._private.direct_ingress_http_util import ASGIDIReceiveProxy

    async def run() -> dict:
        sent = 0

        async def receive():  # the HTTP server's side: every message at once, then a disconnect
            nonlocal sent
            await asyncio.sleep(0)
            if sent == chunks:
                return {"type": "http.disconnect"}
            sent += 1
            return {"type": "http.request", "body": bytes([sent % 256]) * chunk_bytes, "more_body": sent < chunks}

        proxy = ASGIDIReceiveProxy({"type": "http"}, receive, asyncio.get_running_loop())
        task = proxy.fetch_until_disconnect_task()
        most, got = 0, []
        while True:
            for _ in range(3):  # the app works between its reads
                await asyncio.sleep(0)
            most = max(most, proxy.queue.qsize())
            message = await proxy()
            if message["type"] == "http.disconnect":
                break
            got.append(message["body"][0])
        await task
        return {"most_waiting": most, "in_order": got == [i % 256 for i in range(1, chunks + 1)]}

    return asyncio.run(run())


def test_serves_direct_ingress_queue_holds_a_fast_body_only_once_bounded(monkeypatch):
    from ray.serve._private.direct_ingress_http_util import ASGIDIReceiveProxy

    from deployments.http_guards import bound_direct_ingress_receive

    unbounded = _feed_through_serves_receive_proxy(chunks=200, chunk_bytes=1024)
    assert unbounded["in_order"] and unbounded["most_waiting"] > 100  # Serve alone: the body piles up
    monkeypatch.setattr(ASGIDIReceiveProxy, "queue", ASGIDIReceiveProxy.queue)  # restored after the test
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    assert bound_direct_ingress_receive(maxsize=4)
    bounded = _feed_through_serves_receive_proxy(chunks=200, chunk_bytes=1024)
    assert bounded["in_order"] and bounded["most_waiting"] <= 4


def test_the_receive_bound_is_left_off_where_serve_hands_messages_across_loops(monkeypatch):
    from ray.serve._private.direct_ingress_http_util import ASGIDIReceiveProxy

    from deployments.http_guards import bound_direct_ingress_receive

    monkeypatch.setattr(ASGIDIReceiveProxy, "queue", ASGIDIReceiveProxy.queue)
    monkeypatch.delenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", raising=False)
    assert not bound_direct_ingress_receive()
    assert _feed_through_serves_receive_proxy(chunks=50, chunk_bytes=16)["most_waiting"] > 25
