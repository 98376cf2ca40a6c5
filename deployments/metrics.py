"""Prometheus metrics through `ray.serve.metrics` (created inside a replica, never at import).

Ingress: requests per tenant and status. Replica: tokens per tenant, TTFT and TPOT
histograms, adapter fetches (multiplexed loads, their latency, DiskCache misses), and
gauges fed from `engine.stats()`: running/waiting requests, the last step's batch size
and distinct adapters, and the engine's adapter-slot hits/misses/loads as counters.
"""
from __future__ import annotations

from ray.serve import metrics

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
}
ENGINE_GAUGES = {
    "running": "moeplex_engine_running_requests",
    "waiting": "moeplex_engine_waiting_requests",
    "last_step_batch_size": "moeplex_engine_batch_size",
    "last_step_adapters": "moeplex_engine_distinct_adapters_per_step",
    "free_kv_blocks": "moeplex_engine_free_kv_blocks",
}


class IngressMetrics:
    def __init__(self):
        self.requests = metrics.Counter(
            "moeplex_requests", "HTTP requests by tenant, route and status",
            tag_keys=("tenant", "route", "status"))

    def request(self, tenant: str, route: str, status: int) -> None:
        self.requests.inc(tags={"tenant": tenant or "-", "route": route, "status": str(status)})


class ReplicaMetrics:
    def __init__(self):
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
            "moeplex_adapter_loads", "adapters the replica resolved and fetched (multiplex misses)")
        self.adapter_requests = metrics.Counter(
            "moeplex_adapter_requests", "requests that used an adapter (hits = this - loads)")
        self.adapter_load_latency = metrics.Histogram(
            "moeplex_adapter_load_seconds", "store resolve + disk cache fetch time",
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
