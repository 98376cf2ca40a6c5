"""The Server-Timing header of a completion: where its time went, in milliseconds by phase.

    Server-Timing: resolve;dur=0.4, route;dur=1.9, fetch;dur=0.0, prepare;dur=0.1,
                   tokenize;dur=0.2, handoff;dur=0.3, queue;dur=4.2, adapter;dur=3.8,
                   prefill;dur=11.0, deliver;dur=0.4, ttft;dur=18.7, total;dur=40.2

| name | from | until | measured by |
|---|---|---|---|
| `resolve` | the ingress's handler starts | the `model` is resolved to an adapter version | ingress |
| `route` | resolved | the first item is back, less the replica's `first` | ingress |
| `fetch` | the replica's generate starts | the adapter's files are on its disk | replica |
| `prepare` | fetched | the prompt is rendered (a chat's template), tokenised and checked against the context (a long one: on the long-input threads) | replica |
| `tokenize` | prepared | the request is a Sequence: its ids checked against the vocabulary, its sampling options (a long prompt: on the long-input threads) | replica |
| `handoff` | the request is a Sequence | the engine took it | engine |
| `queue` | the engine took it | a step first launched it | engine |
| `adapter` | the request is a Sequence | its adapter was first in a ready slot | engine |
| `prefill` | the first launch | its first token (a preemption before it included) | engine |
| `deliver` | the engine's first token | it reached the replica's stream | replica |
| `ttft` | the ingress's handler starts | the first item is back | ingress |
| `total` | the ingress's handler starts | the whole answer is ready (not for streams) | ingress |

`route` is Serve's choice of replica, its queue there and Ray's transport both ways: the one
phase measured as a difference, so each process's durations come from its own clock (the
replica and its engine core share one host's). `adapter` overlaps `handoff` and `queue`; the
others follow one another and, with `route`, add up to `ttft`. What happens before the handler
(the proxy, reading and parsing the body) is the client's time less `total`. Phases that did
not happen are left out (a base-model request has no `adapter`).
"""
from __future__ import annotations

import time

REPLICA_PHASES = ("fetch", "prepare", "tokenize", "handoff", "queue", "adapter", "prefill", "deliver")


class ServerTiming:
    """The phases of one completion, from the ingress's clock readings and the replica's first
    item (its `timing`, seconds)."""

    def __init__(self, arrived: float, resolved: float, first: dict, now: float | None = None):
        self.arrived = arrived
        first_at = time.perf_counter() if now is None else now
        replica = first.get("timing") or {}
        self.phases: dict[str, float] = {"resolve": resolved - arrived}
        if "first" in replica:
            self.phases["route"] = max(0.0, first_at - resolved - replica["first"])
        self.phases.update((name, replica[name]) for name in REPLICA_PHASES if name in replica)
        self.phases["ttft"] = first_at - arrived

    def headers(self, total: bool = False, now: float | None = None) -> dict[str, str]:
        phases = dict(self.phases)
        if total:
            phases["total"] = (time.perf_counter() if now is None else now) - self.arrived
        return {"Server-Timing": ", ".join(f"{name};dur={1e3 * s:.1f}" for name, s in phases.items())}


def parse(header: str) -> dict[str, float]:
    """A Server-Timing header's durations by name (ms), for clients and benchmarks."""
    out = {}
    for metric in header.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur":
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out
