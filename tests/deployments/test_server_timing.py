"""The Server-Timing header of completions: its phases from the ingress's clock and the replica's
first item, on the ingress's FastAPI app in-process (no Ray) with a stub engine replica."""
import json
from types import SimpleNamespace

from fastapi.testclient import TestClient

from deployments.args import AppArgs
from deployments.ingress import Ingress, api
from deployments.server_timing import ServerTiming, parse

REPLICA_TIMING = {"fetch": 0.002, "prepare": 0.001, "tokenize": 0.0002, "handoff": 0.0005, "queue": 0.004,
                  "adapter": 0.003, "prefill": 0.010, "deliver": 0.0003, "first": 0.020}
ITEMS = [{"text": "Hel", "num_tokens": 1, "token_ids": [11], "timing": REPLICA_TIMING},
         {"text": "lo", "num_tokens": 1, "token_ids": [12], "finish_reason": "length",
          "prompt_tokens": 2, "completion_tokens": 2}]


def test_route_is_the_ingress_wait_less_the_replica_time_and_phases_keep_their_order():
    timing = ServerTiming(arrived=10.0, resolved=10.001, first={"timing": REPLICA_TIMING}, now=10.031)
    header = timing.headers(total=True, now=10.050)["Server-Timing"]
    names = [part.split(";")[0] for part in header.split(", ")]
    assert names == ["resolve", "route", "fetch", "prepare", "tokenize", "handoff", "queue", "adapter", "prefill",
                     "deliver", "ttft", "total"]
    got = parse(header)
    assert got["resolve"] == 1.0 and got["route"] == 10.0  # 30 ms waited, 20 of them in the replica
    assert got["queue"] == 4.0 and got["ttft"] == 31.0 and got["total"] == 50.0


def test_a_first_item_without_timing_gives_the_ingress_phases_only():
    timing = ServerTiming(arrived=1.0, resolved=1.002, first={"text": ""}, now=1.005)
    assert parse(timing.headers()["Server-Timing"]) == {"resolve": 2.0, "ttft": 5.0}


def test_a_negative_phase_is_shown_as_measured_and_route_never_is():
    """A replica phase below zero is a clock or ordering bug: shown, not hidden as 0. `route`, a
    difference of two processes' durations, is clamped (it can come out a hair below zero)."""
    timing = ServerTiming(arrived=0.0, resolved=0.0, first={"timing": {"queue": -0.002, "first": 0.011}}, now=0.010)
    got = parse(timing.headers()["Server-Timing"])
    assert got["queue"] == -2.0 and got["route"] == 0.0


def test_parse_skips_metrics_without_a_number():
    assert parse('a;dur=1.5, b;desc="x", c;dur=oops, d ; dur=2') == {"a": 1.5, "d": 2.0}


async def _aiter(items):
    for item in items:
        yield item


class _Replica:
    def __init__(self):
        self.generate = SimpleNamespace(remote=lambda _payload: _aiter(ITEMS))

    def options(self, **_options):
        return self


class _Metrics:
    def request(self, *_args):
        pass


def _client(tmp_path, tiny_checkpoint, monkeypatch, **args) -> TestClient:
    from ray import serve

    cls = Ingress.func_or_class
    ingress = cls.__new__(cls)
    cls.__mro__[1].__init__(ingress, _Replica(), AppArgs(
        model=str(tiny_checkpoint("qwen3_moe")), served_model_name="base", store=str(tmp_path / "store"),
        cache_dir=str(tmp_path / "cache"), **args))
    ingress._metrics = _Metrics()
    context = SimpleNamespace(servable_object=ingress, deployment="Ingress", app_name="moeplex")
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    return TestClient(api, raise_server_exceptions=False)


BODY = {"model": "base", "prompt": "hi", "max_tokens": 2}
HEADERS = {"X-Tenant-Id": "acme"}


def test_completions_answer_with_every_phase_and_streams_without_a_total(tmp_path, tiny_checkpoint, monkeypatch):
    with _client(tmp_path, tiny_checkpoint, monkeypatch) as http:
        whole = http.post("/v1/completions", json=BODY, headers=HEADERS)
        stream = http.post("/v1/completions", json={**BODY, "stream": True}, headers=HEADERS)
        chat = http.post("/v1/chat/completions", headers=HEADERS, json={
            "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert whole.status_code == stream.status_code == chat.status_code == 200
    assert whole.json()["choices"][0]["text"] == "Hello"
    assert "timing" not in json.dumps(whole.json())  # the replica's numbers go in the header only
    phases = parse(whole.headers["server-timing"])
    assert set(phases) == {"resolve", "route", "fetch", "prepare", "tokenize", "handoff", "queue", "adapter",
                           "prefill", "deliver", "ttft", "total"}
    assert phases["prefill"] == 10.0 and phases["ttft"] <= phases["total"]
    assert "total" not in parse(stream.headers["server-timing"])
    assert "ttft" in parse(chat.headers["server-timing"])


def test_server_timing_false_sends_no_header(tmp_path, tiny_checkpoint, monkeypatch):
    with _client(tmp_path, tiny_checkpoint, monkeypatch, server_timing=False) as http:
        response = http.post("/v1/completions", json=BODY, headers=HEADERS)
    assert response.status_code == 200 and "server-timing" not in response.headers


def test_a_refused_completion_has_no_server_timing(tmp_path, tiny_checkpoint, monkeypatch):
    with _client(tmp_path, tiny_checkpoint, monkeypatch) as http:
        response = http.post("/v1/completions", json={**BODY, "max_tokens": 10 ** 6}, headers=HEADERS)
    assert response.status_code == 400 and "server-timing" not in response.headers
