"""GET /metrics: vLLM's series for the Gateway API Inference Extension, and the node's moeplex ones.

Unit level: the exposition text (read back with prometheus_client's parser, as a scraper
would), `MetricsPage`'s sources and cache, the engine's adapter names in `stats()`, and the
route on an in-process ingress (no Ray). The real Serve app is scraped in test_serve_app.py.
"""
import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from deployments.args import AppArgs
from deployments.ingress import Ingress, api
from deployments.metrics import (MetricsPage, adapter_names, engine_snapshot, label_value,
                                 node_series, vllm_series)

NODE_PAGE = """# HELP ray_moeplex_requests_total HTTP requests by tenant, route and status
# TYPE ray_moeplex_requests_total counter
ray_moeplex_requests_total{route="completions",status="200",tenant="acme"} 3.0
# HELP ray_node_cpu_utilization Total CPU usage
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="127.0.0.1"} 12.5
# HELP ray_moeplex_ttft_seconds time to first token
# TYPE ray_moeplex_ttft_seconds histogram
ray_moeplex_ttft_seconds_bucket{le="0.1"} 1.0
ray_moeplex_ttft_seconds_bucket{le="+Inf"} 1.0
ray_moeplex_ttft_seconds_count 1.0
ray_moeplex_ttft_seconds_sum 0.05
"""


def _snapshot(running=0, waiting=0, max_lora=4, running_adapters=(), waiting_adapters=(), resident_adapters=(),
              kv_blocks=0, kv_blocks_used=0, prefix_cache_queries=0, prefix_cache_hits=0):
    return {"running": running, "waiting": waiting, "max_lora": max_lora,
            "running_adapters": list(running_adapters), "waiting_adapters": list(waiting_adapters),
            "resident_adapters": list(resident_adapters), "kv_blocks": kv_blocks, "kv_blocks_used": kv_blocks_used,
            "prefix_cache_queries": prefix_cache_queries, "prefix_cache_hits": prefix_cache_hits}


def _samples(text: str) -> dict:
    """{metric name: [(labels, value), ...]} as a Prometheus text parser reads `text`."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


# ---- the exposition text -------------------------------------------------------------------
def test_label_values_escape_backslash_quote_and_newline():
    assert label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert label_value("plain-name_1.2") == "plain-name_1.2"


def test_vllm_series_sum_replicas_and_survive_odd_adapter_names_in_a_parser():
    odd = ['quo"te', "back\\slash", "new\nline"]
    snapshots = [_snapshot(2, 1, 4, ["style", odd[0]], [odd[1]]),
                 _snapshot(1, 3, 2, ["style", odd[2]], [])]
    text = "\n".join(vllm_series(snapshots, 'tiny "moe"', now=1700000000.25)) + "\n"
    assert '\nvllm:num_requests_waiting{model_name="tiny \\"moe\\""} 4\n' in text
    samples = _samples(text)
    assert samples["vllm:num_requests_running"] == [({"model_name": 'tiny "moe"'}, 3.0)]
    assert samples["vllm:num_requests_waiting"] == [({"model_name": 'tiny "moe"'}, 4.0)]
    [(labels, value)] = samples["vllm:lora_requests_info"]
    assert value == 1700000000.25  # vLLM's set_to_current_time(): when it was set
    # max_lora: the slots of one engine (the fewest of any replica), as vLLM's --max-loras
    assert labels == {"max_lora": "2", "running_lora_adapters": ",".join(sorted(["style", odd[0], odd[2]])),
                      "waiting_lora_adapters": odd[1]}
    assert "# TYPE vllm:lora_requests_info gauge" in text


def test_vllm_series_idle_empty_lists_and_none_without_replicas_or_slots():
    [(labels, _)] = _samples("\n".join(vllm_series([_snapshot()], "m", 1.0)) + "\n")[
        "vllm:lora_requests_info"]
    assert labels == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert vllm_series([], "m", 1.0) == []  # no replica answered: missing, not idle
    assert "vllm:lora_requests_info" not in "\n".join(vllm_series([_snapshot(max_lora=0)], "m", 1.0))


def test_kv_cache_usage_is_the_share_of_blocks_sequences_hold_and_prefix_counters_are_summed():
    snapshots = [_snapshot(kv_blocks=100, kv_blocks_used=30, prefix_cache_queries=500, prefix_cache_hits=200),
                 _snapshot(kv_blocks=300, kv_blocks_used=70, prefix_cache_queries=100, prefix_cache_hits=0)]
    samples = _samples("\n".join(vllm_series(snapshots, "m", 1.0)) + "\n")
    assert samples["vllm:kv_cache_usage_perc"] == [({"model_name": "m"}, 0.25)]
    assert samples["vllm:prefix_cache_queries_total"] == [({"model_name": "m"}, 600.0)]
    assert samples["vllm:prefix_cache_hits_total"] == [({"model_name": "m"}, 200.0)]


def test_engine_snapshot_names_adapters_as_clients_do():
    stats = {"running": 2, "waiting": 1, "num_lora_slots": 8, "free_kv_blocks": 3, "num_kv_blocks": 10,
             "kv_blocks_lent": 2, "prefix_cache_queries": 40, "prefix_cache_hits": 16,
             "running_adapters": ["acme/style@3", "globex/style@1", "acme/chat@2"],
             "waiting_adapters": ["acme/chat@4"], "resident_adapters": ["acme/chat@4", "acme/old@1"]}
    assert engine_snapshot(stats) == _snapshot(2, 1, 8, ["chat", "style"], ["chat"], ["chat", "old"],
                                               kv_blocks=10, kv_blocks_used=5, prefix_cache_queries=40,
                                               prefix_cache_hits=16)
    assert adapter_names(["not a ref!"]) == ["not a ref!"]
    assert engine_snapshot({}) == _snapshot(max_lora=0)


def test_node_series_keep_whole_moeplex_families_only():
    kept = node_series(NODE_PAGE)
    assert [line for line in kept if "ray_node" in line] == []
    assert kept[:3] == NODE_PAGE.splitlines()[:3] and len(kept) == 3 + 6
    assert set(_samples("\n".join(kept) + "\n")) == {
        "ray_moeplex_requests_total", "ray_moeplex_ttft_seconds_bucket",
        "ray_moeplex_ttft_seconds_count", "ray_moeplex_ttft_seconds_sum"}


# ---- MetricsPage: sources, failures, cache -----------------------------------------------
@pytest.fixture
def node_url():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = NODE_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def _gatherer(*results):
    calls = []

    async def gather():
        calls.append(1)
        return list(results)
    return gather, calls


def test_page_sums_answering_replicas_appends_node_series_and_caches(node_url):
    gather, calls = _gatherer(_snapshot(1, 0, 4, ["a"]), RuntimeError("replica gone"),
                              _snapshot(0, 2, 4, [], ["b"]))
    page = MetricsPage(gather, "m", node_url, ttl_s=60)

    async def scrape_twice():
        return await asyncio.gather(page.text(), page.text())

    first, second = asyncio.run(scrape_twice())
    assert first == second and len(calls) == 1  # concurrent scrapes share one rebuild
    samples = _samples(first)
    assert samples["vllm:num_requests_waiting"][0][1] == 2
    assert samples["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == "a"
    assert dict((labels["outcome"], value) for labels, value
                in samples["moeplex_metrics_engine_replicas"]) == {"answered": 2, "failed": 1}
    assert samples["ray_moeplex_requests_total"][0][1] == 3.0
    assert "ray_node_cpu_utilization" not in first


def test_page_answers_when_node_or_replicas_do_not():
    async def late():
        await asyncio.sleep(10)

    # a port nothing listens on (the server is closed at once), and replicas too slow
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    dead_url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.server_close()
    text = asyncio.run(MetricsPage(late, "m", dead_url, timeout_s=0.2).text())
    assert "vllm:num_requests" not in text and 'moeplex_metrics_engine_replicas{outcome="answered"} 0' in text
    gather, _ = _gatherer(_snapshot(waiting=5))
    text = asyncio.run(MetricsPage(gather, "m", dead_url, timeout_s=0.5).text())
    assert _samples(text)["vllm:num_requests_waiting"][0][1] == 5


def test_a_timed_out_scrape_keeps_the_last_answered_counts():
    answered = [False]

    async def first_fast_then_stuck():
        if answered[0]:
            await asyncio.sleep(10)  # behind full request slots
        answered[0] = True
        return [_snapshot(waiting=7)]

    page = MetricsPage(first_fast_then_stuck, "m", None, ttl_s=0.0, timeout_s=0.2)

    async def scrape_twice():
        return await page.text(), await page.text()

    first, second = asyncio.run(scrape_twice())
    assert _samples(second)["vllm:num_requests_waiting"][0][1] == 7 == \
        _samples(first)["vllm:num_requests_waiting"][0][1]


def test_page_rebuilds_after_its_ttl():
    gather, calls = _gatherer(_snapshot())
    page = MetricsPage(gather, "m", None, ttl_s=0.0)

    async def scrape_twice():
        await page.text()
        await page.text()

    asyncio.run(scrape_twice())
    assert len(calls) == 2


# ---- the route on an in-process ingress ---------------------------------------------------
class _EngineReplicas:
    """The LLMServer handle: `broadcast("metrics_snapshot")` answers two replicas' snapshots."""

    def __init__(self, snapshots):
        self.snapshots, self.calls = snapshots, []

    def options(self, **_options):
        return self

    def broadcast(self, method: str, *args):
        self.calls.append(method)

        async def results_async(**_options):
            return list(self.snapshots)
        return SimpleNamespace(results_async=results_async)


def _ingress_client(monkeypatch, tmp_path, tiny_checkpoint, **options) -> TestClient:
    from ray import serve

    args = AppArgs(model=str(tiny_checkpoint("qwen3_moe")), served_model_name="base",
                   store=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), **options)
    cls = Ingress.func_or_class  # Serve's wrapper; its base is our class, its __init__ sync
    self = cls.__new__(cls)
    replicas = _EngineReplicas([_snapshot(1, 2, 4, ["style"], ["chat"]), _snapshot(0, 1, 4)])
    cls.__mro__[1].__init__(self, replicas, args)
    context = SimpleNamespace(servable_object=self, deployment="Ingress", app_name="moeplex")
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    return TestClient(api, raise_server_exceptions=False)


def test_metrics_route_needs_no_tenant_and_speaks_prometheus_text(monkeypatch, tmp_path,
                                                                   tiny_checkpoint):
    with _ingress_client(monkeypatch, tmp_path, tiny_checkpoint) as http:
        response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = _samples(response.text)
    assert samples["vllm:num_requests_waiting"] == [({"model_name": "base"}, 3.0)]
    assert samples["vllm:num_requests_running"] == [({"model_name": "base"}, 1.0)]
    [(labels, _)] = samples["vllm:lora_requests_info"]
    assert labels == {"max_lora": "4", "running_lora_adapters": "style",
                      "waiting_lora_adapters": "chat"}


def test_metrics_endpoint_false_is_an_openai_404(monkeypatch, tmp_path, tiny_checkpoint):
    with _ingress_client(monkeypatch, tmp_path, tiny_checkpoint, metrics_endpoint=False) as http:
        response = http.get("/metrics")
        unknown = http.get("/no-such-route")
    assert response.status_code == 404
    # as any path the server lacks: the same error but for the path it names
    assert response.json()["error"]["message"] == unknown.json()["error"]["message"].replace("/no-such-route", "/metrics")
    assert {**response.json()["error"], "message": ""} == {**unknown.json()["error"], "message": ""}
    assert response.json()["error"]["type"] == "not_found_error"


# ---- the engine's part: adapter names in stats() ------------------------------------------
def test_engine_stats_name_the_adapters_of_running_and_waiting_requests(tiny_checkpoint,
                                                                         tiny_adapter):
    from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", max_loras=2,
                                    max_num_seqs=1, max_model_len=64))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    path = str(tiny_adapter(rank=4))
    engine.add_request("r0", "hello there", params, LoRARequest("acme/style@1", path))
    engine.add_request("r1", "hello again", params, LoRARequest("acme/chat@2", path))
    engine.add_request("r2", "no adapter", params)
    stats = engine.stats()
    assert (stats["running_adapters"], stats["waiting_adapters"]) == ([], ["acme/chat@2", "acme/style@1"])
    while not engine.stats()["running_adapters"]:  # its adapter loads, then it runs
        engine.step()
    stats = engine.stats()  # one sequence at a time: the other adapter's request waits
    assert stats["running"] == 1 and stats["waiting"] >= 1
    assert sorted(stats["running_adapters"] + stats["waiting_adapters"]) == ["acme/chat@2", "acme/style@1"]
    assert engine_snapshot(stats)["running_adapters"] in (["chat"], ["style"])
    engine.shutdown()
