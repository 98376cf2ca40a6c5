"""Whether a completion for an adapter goes with adapter affinity or to the least loaded replica.

Serve routes a request to a replica that has its `multiplexed_model_id` loaded and moves on to
another only when that replica's request slots are full, so an adapter that takes most of the
traffic queues on one engine replica while the others idle (Ray Serve LLM pins a hot adapter to
one replica: ray-project/ray #65691, #48741). The ingress counts the adapters of its recent
completions; while an adapter's share is above `share`, its requests go without a multiplexed id
(the adapter named in the payload instead), so Serve balances them by load over every engine
replica, and each replica loads the adapter on first use like any other.
"""
from collections import Counter, deque


class HotAdapters:
    """is_hot(ref): records one request for ref and says whether ref is hot now, over the last
    `window` requests with an adapter, once `min_requests` of them were seen."""

    def __init__(self, share: float, max_replicas: int, window: int = 256, min_requests: int = 32):
        self._share = share
        self._spread = max_replicas > 1 and share < 1.0
        self._window: deque[str] = deque(maxlen=window)
        self._counts: Counter[str] = Counter()
        self._min_requests = min_requests

    def is_hot(self, ref: str, count: int = 1) -> bool:
        """count: the engine requests this one makes (its choices, a batch's prompts times n), so
        that a client batching its prompts weighs what it asks of the replicas."""
        if not self._spread:  # one engine replica, or share 1: nothing to count
            return False
        for _ in range(min(count, self._window.maxlen)):
            if len(self._window) == self._window.maxlen:
                oldest = self._window[0]
                self._counts[oldest] -= 1
                if not self._counts[oldest]:
                    del self._counts[oldest]
            self._window.append(ref)
            self._counts[ref] += 1
        return self.share_of(ref) > self._share

    def share_of(self, ref: str) -> float:
        """ref's share of the recent requests with an adapter; 0 until min_requests were seen."""
        if len(self._window) < self._min_requests:
            return 0.0
        return self._counts[ref] / len(self._window)
