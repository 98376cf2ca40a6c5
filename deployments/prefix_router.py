"""Prefix affinity across engine replicas: a request for the base model goes to the replica its
tenant and prompt opening point to, so the requests that share a system prompt, a chat's first
message, or one prompt's n choices find it in that replica's prefix cache instead of computing
it once on each replica.

Requests for an adapter keep Serve's multiplexed routing (the replicas that hold the adapter
first), and a hot adapter's requests, sent without a model id so that they spread
(deployments/hot_adapters.py), keep the power of two choices. A base-model request's key is its
tenant (the engine's cache is per tenant, `prefix_cache_scope`) and its opening: a completion's
first PREFIX_CHARS characters (or PREFIX_CHARS / 4 token ids), a chat's first message (the
system prompt, or the first user turn, which every later turn of that chat repeats). Each key
ranks the replicas by rendezvous hashing: a replica that goes or comes moves only the keys it
wins. The first replica gets the request, the second if the first is full, unless the first's
queue is longer than the shortest (a replica this router has no recent length of counts as
empty) by more than `max_imbalance` requests: then the power of two choices decides. One
tenant's flood with one system prompt so spreads once its replica is that far ahead.

The ingress does not tokenise: characters stand in for tokens. Prompts that share blocks but
differ within the opening may land apart.
"""
from __future__ import annotations

import hashlib
import json
import random

from ray.serve.request_router import FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter

PREFIX_CHARS = 256  # ~64 tokens: 4 KV blocks of 16


def affinity_key(payload: dict, per_tenant: bool = True) -> str | None:
    """The routing key of a replica payload (the ingress's); None for a hot adapter's payload
    (spread by load) and for one without a prompt."""
    if not isinstance(payload, dict) or payload.get("adapter"):
        return None
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        opening = json.dumps(messages[0], sort_keys=True, ensure_ascii=False)[:PREFIX_CHARS]
    elif isinstance(payload.get("prompt"), str):
        opening = payload["prompt"][:PREFIX_CHARS]
    elif isinstance(payload.get("prompt"), list):  # token ids: a few characters each
        opening = ",".join(map(str, payload["prompt"][:PREFIX_CHARS // 4]))
    else:
        return None
    return f"{payload.get('tenant', '') if per_tenant else ''}\0{opening}"


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """`replica_ids` in the key's order of preference (highest rendezvous weight first)."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return sorted(replica_ids, key=weight, reverse=True)


def too_busy(first: int | None, others: list[int | None], max_imbalance: int) -> bool:
    """Whether the preferred replica's queue (None: not known) is further ahead of the shortest
    other one than `max_imbalance` requests; an unknown other one counts as empty."""
    return first is not None and bool(others) and first - min(n or 0 for n in others) > max_imbalance


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """The LLMServer deployment's request router (AppArgs.prefix_affinity_routing): Serve's own
    rule (the power of two choices among the replicas multiplexing or locality prefer, a replica
    that frees going to the oldest request waiting for that adapter) for requests without a key,
    affinity for the others."""

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
            first, second, *rest = [by_id[i] for i in rank(key, list(by_id))]
            lengths = [self.replica_queue_len_cache.get(r.replica_id) for r in (first, second, *rest)]
            if not too_busy(lengths[0], lengths[1:], self.max_imbalance):
                # both full: back off between tries, as Serve's rule does, rather than probe on
                pending_request.routing_context.should_backoff = True
                return [[first], [second]]
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

    def _fulfill_next_pending_request(self, replica, request_metadata=None):
        """A replica chosen for a keyed request goes to that request: FIFOMixin would hand it to
        the oldest request waiting without a model id, whose key may point elsewhere. Requests
        without a key (a hot adapter's) keep FIFOMixin's order."""
        if request_metadata is not None and not request_metadata.multiplexed_model_id:
            request = self._get_pending_request_matching_internal_request_id(request_metadata)
            if request is not None and request.args and affinity_key(request.args[0], self.per_tenant) is not None:
                return RequestRouter._fulfill_next_pending_request(self, replica, request_metadata)
        return super()._fulfill_next_pending_request(replica, request_metadata)
