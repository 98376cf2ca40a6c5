"""Prometheus metrics through `ray.serve.metrics` (created inside a replica, never at import).

Ingress: requests per tenant and status. Replica: tokens per tenant, TTFT and TPOT
histograms, adapter fetches (multiplexed loads, their latency, DiskCache misses), and
gauges fed from `engine.stats()`: running/waiting requests, the last step's batch size
and distinct adapters, and the engine's adapter-slot hits/misses/loads as counters. Those
are Ray metrics (`ray_moeplex_*` on each node's metrics export port). Both deployments: how late
their event loop ran a timer (`moeplex_event_loop_lag_seconds`, deployments/loop_lag.py).

`MetricsPage` is the ingress's `GET /metrics`: the series the Gateway API Inference
Extension's endpoint picker reads, as vLLM names them, beside this node's `ray_moeplex_*`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from ray.serve import metrics

from adapter_store.names import ref_name

logger = logging.getLogger("ray.serve")

_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
# engine.stats() keys reported as cumulative counters; their deltas are added each poll.
ENGINE_COUNTERS = {
    "lora_slot_hits": "moeplex_engine_adapter_slot_hits",
    "lora_slot_misses": "moeplex_engine_adapter_slot_misses",
    "lora_slot_loads": "moeplex_engine_adapter_slot_loads",
    "lora_load_seconds": "moeplex_engine_adapter_load_seconds",
    "lora_evictions": "moeplex_engine_adapter_evictions",
    "lora_failures": "moeplex_engine_adapter_failures",
    "lora_prefetches": "moeplex_engine_adapter_prefetches",
    "lora_slot_preemptions": "moeplex_engine_adapter_slot_preemptions",
    "lora_bytes_loaded": "moeplex_engine_adapter_bytes_loaded",
    "lora_kv_blocks_borrowed": "moeplex_engine_adapter_heap_kv_blocks_borrowed",
    "lora_kv_blocks_returned": "moeplex_engine_adapter_heap_kv_blocks_returned",
    "gc_collections": "moeplex_engine_gc_collections",
    "gc_pause_seconds": "moeplex_engine_gc_pause_seconds",
    "slow_turns": "moeplex_engine_slow_turns",
    "lora_host_pin_seconds": "moeplex_engine_adapter_host_pin_seconds",
    "lora_host_unpinned_images": "moeplex_engine_adapter_host_unpinned_images",
    "prefix_cache_queries": "moeplex_engine_prefix_cache_queried_tokens",
    "prefix_cache_hits": "moeplex_engine_prefix_cache_hit_tokens",
}
ENGINE_GAUGES = {
    "running": "moeplex_engine_running_requests",
    "waiting": "moeplex_engine_waiting_requests",
    "last_step_batch_size": "moeplex_engine_batch_size",
    "last_step_adapters": "moeplex_engine_distinct_adapters_per_step",
    "free_kv_blocks": "moeplex_engine_free_kv_blocks",
    "aged_requests": "moeplex_engine_aged_adapter_requests",
    "gc_longest_pause_seconds": "moeplex_engine_gc_longest_pause_seconds",
    "longest_turn_seconds": "moeplex_engine_longest_turn_seconds",
    "lora_heap_bytes": "moeplex_engine_adapter_heap_bytes",
    "lora_heap_bytes_used": "moeplex_engine_adapter_heap_bytes_used",
    "kv_blocks_lent": "moeplex_engine_kv_blocks_lent_to_adapter_heap",
    "lora_host_bytes_used": "moeplex_engine_adapter_host_bytes_used",
    "lora_host_pinned_bytes": "moeplex_engine_adapter_host_pinned_bytes",
    "prefix_cache_blocks": "moeplex_engine_prefix_cache_blocks",
}


_LOOP_LAG_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def loop_lag_histogram() -> metrics.Histogram:
    """deployments.loop_lag's samples: how late this replica's event loop ran a timer."""
    return metrics.Histogram("moeplex_event_loop_lag_seconds", "how late the replica's event loop "
                             "ran a 50 ms timer (synchronous work on the loop, or the process short of CPU)",
                             boundaries=_LOOP_LAG_BUCKETS)


class IngressMetrics:
    def __init__(self):
        self.loop_lag = loop_lag_histogram()
        self.requests = metrics.Counter(
            "moeplex_requests", "HTTP requests by tenant, route and status",
            tag_keys=("tenant", "route", "status"))

    def request(self, tenant: str, route: str, status: int) -> None:
        self.requests.inc(tags={"tenant": tenant or "-", "route": route, "status": str(status)})


class ReplicaMetrics:
    def __init__(self):
        self.loop_lag = loop_lag_histogram()
        tenant = ("tenant",)
        self.prompt_tokens = metrics.Counter(
            "moeplex_prompt_tokens", "prompt tokens by tenant", tag_keys=tenant)
        self.output_tokens = metrics.Counter(
            "moeplex_output_tokens", "generated tokens by tenant", tag_keys=tenant)
        self.ttft = metrics.Histogram(
            "moeplex_time_to_first_token_seconds", "time to first token in the replica",
            boundaries=_LATENCY_BUCKETS, tag_keys=tenant)
        self.tpot = metrics.Histogram(
            "moeplex_time_per_output_token_seconds", "mean time per output token after the first",
            boundaries=_TPOT_BUCKETS, tag_keys=tenant)
        self.adapter_loads = metrics.Counter(
            "moeplex_adapter_loads", "multiplex misses: adapters Serve's per-replica LRU loaded")
        self.adapter_requests = metrics.Counter(
            "moeplex_adapter_requests", "requests that used an adapter (hits = this - loads)")
        self.adapter_load_latency = metrics.Histogram(
            "moeplex_adapter_load_seconds", "store resolve + disk cache fetch time, once per multiplex miss",
            boundaries=_LATENCY_BUCKETS)
        self.engine_counters = {key: metrics.Counter(name, f"engine.stats()['{key}']")
                                for key, name in ENGINE_COUNTERS.items()}
        self.engine_gauges = {key: metrics.Gauge(name, f"engine.stats()['{key}']")
                              for key, name in ENGINE_GAUGES.items()}
        self._last_counters: dict[str, float] = {}

    def finished(self, tenant: str, prompt_tokens: int, output_tokens: int,
                 ttft: float | None, decode_seconds: float) -> None:
        tags = {"tenant": tenant}
        self.prompt_tokens.inc(prompt_tokens, tags=tags)
        if output_tokens:
            self.output_tokens.inc(output_tokens, tags=tags)
        if ttft is not None:
            self.ttft.observe(ttft, tags=tags)
        if output_tokens > 1:
            self.tpot.observe(decode_seconds / (output_tokens - 1), tags=tags)

    def engine_stats(self, stats: dict) -> None:
        """Publish one `engine.stats()` snapshot (cumulative counters become deltas)."""
        for key, delta in counter_deltas(self._last_counters, stats).items():
            self.engine_counters[key].inc(delta)
        for key, gauge in self.engine_gauges.items():
            value = stats.get(key)
            if isinstance(value, (int, float)):
                gauge.set(value)


def counter_deltas(last: dict[str, float], stats: dict) -> dict[str, float]:
    """Positive increments of the cumulative engine counters since `last` (updated in place)."""
    deltas = {}
    for key in ENGINE_COUNTERS:
        value = stats.get(key)
        if not isinstance(value, (int, float)):
            continue
        previous = last.get(key, 0.0)
        if value > previous:
            deltas[key] = value - previous
        last[key] = value
    return deltas


# ---- GET /metrics -------------------------------------------------------------------------
EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NODE_SERIES_PREFIX = "ray_moeplex_"
_SCRAPE_TIMEOUT_S = 2.0
_STALE_OK_S = 30.0  # how old the last answered snapshots may be when a scrape times out
_NODE_PAGE_BYTES = 8 << 20  # Ray's whole page for one node; past this its series are left out


def engine_snapshot(stats: dict) -> dict:
    """`LLMServer.metrics_snapshot()` from one `engine.stats()`: request counts, adapter slots,
    and the adapters with a running / waiting request by the name a client puts in `model`
    (the engine knows them by multiplexed id, `owner/name@version`)."""
    return {"running": int(stats.get("running", 0)), "waiting": int(stats.get("waiting", 0)),
            "max_lora": int(stats.get("num_lora_slots", 0)),
            "running_adapters": adapter_names(stats.get("running_adapters", ())),
            "waiting_adapters": adapter_names(stats.get("waiting_adapters", ())),
            "resident_adapters": adapter_names(stats.get("resident_adapters", ())),
            # KV blocks, and those sequences hold (not the free ones, cached or not, nor those
            # the adapter heap borrowed: both come back when a sequence needs them)
            "kv_blocks": int(stats.get("num_kv_blocks", 0)),
            "kv_blocks_used": int(stats.get("num_kv_blocks", 0)) - int(stats.get("free_kv_blocks", 0))
            - int(stats.get("kv_blocks_lent", 0)),
            "prefix_cache_queries": int(stats.get("prefix_cache_queries", 0)),
            "prefix_cache_hits": int(stats.get("prefix_cache_hits", 0))}


def adapter_names(model_ids) -> list[str]:
    """The distinct adapter names in multiplexed ids, sorted."""
    return sorted({ref_name(model_id) for model_id in model_ids})


def vllm_series(snapshots: list[dict], model_name: str, now: float) -> list[str]:
    """vLLM's scheduler series, as exposition lines, over the engine replicas in `snapshots`.

    Followed: vLLM v1's `PrometheusStatLogger` and the Gateway API Inference Extension's
    model server protocol (docs/proposals/003-model-server-protocol). `vllm:num_requests_
    running|waiting` are gauges labelled `model_name`. `vllm:lora_requests_info` is a gauge
    whose value is the time it was set (vLLM's `set_to_current_time()`), labelled `max_lora`
    (vLLM's `--max-loras`: adapters one engine holds on the GPU for a batch, here its slots),
    `running_lora_adapters` and `waiting_lora_adapters` (vLLM: ",".join of the names of the
    adapters with a running / waiting request, no spaces, "" for none). vLLM leaves every older
    label set behind as a series of its own and the picker takes the one of largest value; we
    emit the current one only, which the picker reads the same way.

    `vllm:kv_cache_usage_perc` (the share of KV blocks sequences hold, over every replica's
    blocks: the picker's KV-cache scorer) and the prefix cache's `vllm:prefix_cache_queries` /
    `_hits` counters (tokens, vLLM v1's) follow the same protocol.

    Summed over the replicas, not one series each: the picker scrapes one endpoint per model
    server (our ingress) and reads one series of a family (for the counts the first, for the
    LoRA info the latest), so per-replica series would show it one replica. Counts are the
    sums, the adapter lists the unions; `max_lora` stays per engine (vLLM's meaning; vLLM
    behind one server with several engines does the same), the fewest slots of any replica.
    No snapshots, no series: the picker then sees the metrics as missing, not an idle server.
    """
    if not snapshots:
        return []
    model = f'model_name="{label_value(model_name)}"'

    def total(key: str) -> int:
        return sum(s.get(key, 0) for s in snapshots)
    lines = [*_family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
                      model, total("running")),
             *_family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
                      model, total("waiting"))]
    if total("kv_blocks"):
        lines += _family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
                         model, repr(total("kv_blocks_used") / total("kv_blocks")))
    lines += [*_family("vllm:prefix_cache_queries", "counter",
                       "Prefix cache queries, in terms of number of queried tokens.", model, total("prefix_cache_queries")),
              *_family("vllm:prefix_cache_hits", "counter",
                       "Prefix cache hits, in terms of number of cached tokens.", model, total("prefix_cache_hits"))]
    max_lora = min(s["max_lora"] for s in snapshots)
    if max_lora > 0:  # vLLM has the family only with LoRA enabled
        running = sorted(set().union(*(s["running_adapters"] for s in snapshots)))
        waiting = sorted(set().union(*(s["waiting_adapters"] for s in snapshots)))
        labels = (f'max_lora="{max_lora}",waiting_lora_adapters="{label_value(",".join(waiting))}"'
                  f',running_lora_adapters="{label_value(",".join(running))}"')
        lines += ["# HELP vllm:lora_requests_info Running stats on lora requests.",
                  "# TYPE vllm:lora_requests_info gauge",
                  f"vllm:lora_requests_info{{{labels}}} {float(now)!r}"]
    return lines


def _family(name: str, kind: str, doc: str, labels: str, value) -> list[str]:
    """A metric family of one sample, as exposition lines; a counter's HELP and TYPE name it with
    its _total, as prometheus_client writes them (and its parser needs)."""
    name = f"{name}_total" if kind == "counter" else name
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]


def label_value(value: str) -> str:
    """A label value in the text exposition format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def node_series(page: str, prefix: str = NODE_SERIES_PREFIX) -> list[str]:
    """The lines of a Prometheus text page whose metric name starts with `prefix`, HELP and TYPE
    lines included (a whole family shares its name, so the families stay whole)."""
    kept = []
    for line in page.splitlines():
        words = line.split(maxsplit=3)
        name = words[2] if line.startswith("#") and len(words) > 2 else line
        if name.startswith(prefix):
            kept.append(line)
    return kept


def node_metrics_url() -> str | None:
    """Ray's metrics export endpoint of this process's node; None outside Ray or without one."""
    try:
        from ray._private.worker import global_worker
        node = global_worker.node
        host, port = node.node_ip_address, node.metrics_export_port
    except Exception:  # noqa: BLE001 - a private API: not connected, or changed
        return None
    if not isinstance(port, int) or port <= 0:
        return None
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def read_page(url: str, timeout_s: float, max_bytes: int) -> str:
    """GET `url` (blocking: run it in a thread); ValueError past `max_bytes`."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body = response.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise ValueError(f"the page is over {max_bytes} bytes")
    return body.decode("utf-8", errors="replace")


class MetricsPage:
    """The text of `GET /metrics`, rebuilt at most once per `ttl_s` however many scrape it.

    `gather()` returns every engine replica's `metrics_snapshot()` (an exception in place of
    a replica that failed); `node_url` is Ray's metrics export endpoint of this node, or None.
    Each source has `timeout_s`; one that fails or is late is left out and the other still
    answers. The engine replicas are one source: when they are late (a broadcast waits behind
    a replica's full request slots) the page keeps their last answer for up to _STALE_OK_S,
    then leaves the vllm: series out; a replica that raised is left out of the sums (and
    counted as failed).
    """

    def __init__(self, gather: Callable[[], Awaitable[list]], model_name: str,
                 node_url: str | None, ttl_s: float = 1.0, timeout_s: float = _SCRAPE_TIMEOUT_S):
        self._gather, self._model_name, self._node_url = gather, model_name, node_url
        self._ttl_s, self._timeout_s = ttl_s, timeout_s
        self._text, self._built_at = "", float("-inf")
        self._lock = asyncio.Lock()
        self._failing: set[str] = set()  # sources whose failure was logged: once, not per scrape
        # (when, snapshots, failed) of the last broadcast that answered: recent counts beat none
        # for a router reading them
        self._last: tuple[float, list[dict], int] | None = None

    async def text(self) -> str:
        async with self._lock:  # concurrent scrapes wait for one rebuild and share it
            if time.monotonic() - self._built_at >= self._ttl_s:
                self._text = await self._build()
                self._built_at = time.monotonic()
            return self._text

    async def _build(self) -> str:
        (snapshots, failed), node = await asyncio.gather(self._snapshots(), self._node_lines())
        lines = vllm_series(snapshots, self._model_name, time.time())
        lines += ["# HELP moeplex_metrics_engine_replicas Engine replicas this page's vllm: "
                  "series sum (answered), or that answered with an error (failed).",
                  "# TYPE moeplex_metrics_engine_replicas gauge",
                  f'moeplex_metrics_engine_replicas{{outcome="answered"}} {len(snapshots)}',
                  f'moeplex_metrics_engine_replicas{{outcome="failed"}} {failed}']
        return "\n".join(lines + node) + "\n"

    async def _snapshots(self) -> tuple[list[dict], int]:
        try:
            results = await asyncio.wait_for(self._gather(), self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - e.g. a timeout, no replica yet
            self._failed("engine replicas", exc)
            if self._last is not None and time.monotonic() - self._last[0] <= _STALE_OK_S:
                return self._last[1], self._last[2]
            return [], 0
        self._failing.discard("engine replicas")
        snapshots = [r for r in results if isinstance(r, dict)]
        self._last = (time.monotonic(), snapshots, len(results) - len(snapshots))
        return self._last[1:]

    async def _node_lines(self) -> list[str]:
        if self._node_url is None:
            return []
        def read_and_filter() -> list[str]:  # off the event loop: the page may be megabytes
            return node_series(read_page(self._node_url, self._timeout_s, _NODE_PAGE_BYTES))

        try:
            lines = await asyncio.wait_for(asyncio.to_thread(read_and_filter), self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - the node's exporter is down, slow or huge
            self._failed(self._node_url, exc)
            return []
        self._failing.discard(self._node_url)
        return lines

    def _failed(self, source: str, exc: Exception) -> None:
        level = logging.DEBUG if source in self._failing else logging.WARNING
        self._failing.add(source)
        logger.log(level, "GET /metrics: nothing from %s (left out until it answers): %s: %s",
                   source, type(exc).__name__, exc)
