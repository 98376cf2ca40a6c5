"""Prefix affinity across engine replicas: a request without an adapter of its own to route by
goes to the replica its prompt's opening points to, so the requests that share a system prompt
(or a chat's earlier turns, or the n choices of one prompt) find it in that replica's prefix
cache instead of computing it once per replica.

Requests for an adapter keep Serve's multiplexed routing (the replicas that hold the adapter
first). The others, the base model's and those of a hot adapter sent to every replica
(deployments/hot_adapters.py), are routed by a key: the tenant (the engine's cache is per
tenant, `prefix_cache_scope`), the hot adapter if any, and the prompt's first
`PREFIX_CHARS` characters (a chat's messages as JSON). Each key ranks the replicas by
rendezvous hashing: a replica that goes or comes moves only the keys it wins. The first
replica gets the request unless its queue is longer than the shortest known queue by more than
`max_imbalance` requests: then the power of two choices decides, as without affinity. One
tenant's flood with one system prompt so spreads once its replica is that far ahead. A full
replica is passed over like any other (the next ranks are the rest).

The ingress does not tokenise: characters stand in for tokens. Two prompts that share fewer
than PREFIX_CHARS characters may land apart though they share some blocks.
"""
from __future__ import annotations

import hashlib
import json
import random

from ray.serve.request_router import FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter

PREFIX_CHARS = 1024  # ~256 tokens: 16 KV blocks of 16


def affinity_key(payload: dict, per_tenant: bool = True) -> str | None:
    """The routing key of a replica payload (the ingress's), or None for a payload without a prompt."""
    if not isinstance(payload, dict):
        return None
    if payload.get("messages") is not None:
        opening = json.dumps(payload["messages"], separators=(",", ":"), ensure_ascii=False)[:PREFIX_CHARS]
    elif isinstance(payload.get("prompt"), str):
        opening = payload["prompt"][:PREFIX_CHARS]
    elif isinstance(payload.get("prompt"), list):  # token ids: a quarter as many, about a character's worth each
        opening = ",".join(map(str, payload["prompt"][:PREFIX_CHARS // 4]))
    else:
        return None
    tenant = payload.get("tenant", "") if per_tenant else ""
    return f"{tenant}\0{payload.get('adapter') or ''}\0{opening}"


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """`replica_ids` in the key's order of preference (highest rendezvous weight first)."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return sorted(replica_ids, key=weight, reverse=True)


def too_busy(first: int | None, known: list[int], max_imbalance: int) -> bool:
    """Whether the preferred replica's queue (None: not known) is further ahead of the shortest
    known one than `max_imbalance` requests."""
    return first is not None and bool(known) and first - min(known) > max_imbalance


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """The LLMServer deployment's request router (AppArgs.prefix_affinity_routing): Serve's own
    rule (the power of two choices among the replicas multiplexing or locality prefer) for the
    requests without a key, affinity for the others."""

    max_imbalance, per_tenant = 8, True  # initialize_state sets them from request_router_kwargs

    def initialize_state(self, max_imbalance: int = 8, per_tenant: bool = True, **kwargs):
        super().initialize_state(**kwargs)
        self.max_imbalance, self.per_tenant = max_imbalance, per_tenant

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = None
        if pending_request is not None and not pending_request.metadata.multiplexed_model_id \
                and pending_request.args and len(candidate_replicas) > 1:
            key = affinity_key(pending_request.args[0], self.per_tenant)
        if key is not None:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            ranked = [by_id[i] for i in rank(key, list(by_id))]
            lengths = [self.replica_queue_len_cache.get(r.replica_id) for r in ranked]
            if not too_busy(lengths[0], [n for n in lengths if n is not None], self.max_imbalance):
                return [[ranked[0]], ranked[1:]]
        return self._two_choices(pending_request)

    def _two_choices(self, pending_request):
        """Two replicas at random among those multiplexing (a request for an adapter) or locality
        prefers; the router sends to the one with the shorter queue."""
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        chosen = random.sample(sorted(ids, key=str), min(2, len(ids)))
        return [[self.curr_replicas[i] for i in chosen]] if chosen else []
