"""Per-tenant concurrent-request limit, enforced by each ingress replica (429 when exceeded).

The count lives in the ingress replica; with k replicas each one allows ceil(limit / k), so
a tenant holds at most limit + k - 1 requests in all. Serve's proxy spreads requests over
the replicas by their load, so a tenant under its limit is rarely refused early; a shared
count would cost a round trip to one place on every request.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

from deployments.errors import RateLimitError


class TenantLimiter:
    def __init__(self, default_limit: int, limit_of: Callable[[str], int | None] = lambda t: None,
                 num_replicas: int = 1):
        self._default = default_limit
        self._limit_of = limit_of
        self.num_replicas = num_replicas
        self._active: Counter[str] = Counter()

    def limit(self, tenant: str) -> int:
        """This replica's share of the tenant's limit."""
        return -(-(self._limit_of(tenant) or self._default) // self.num_replicas)

    def setting_of(self, tenant: str) -> str:
        """Where the tenant's limit is set, for an operator to raise it."""
        if self._limit_of(tenant) is not None:
            return f"max_concurrent_requests of tenant {tenant!r} in the key file"
        return "max_concurrent_requests_per_tenant"

    def active(self, tenant: str) -> int:
        return self._active[tenant]

    def can_acquire(self, tenant: str, count: int = 1) -> bool:
        return self._active[tenant] + count <= self.limit(tenant)

    def acquire(self, tenant: str, count: int = 1) -> None:
        """Take `count` of the tenant's places (a request of n choices takes n) or raise 429."""
        if not self.can_acquire(tenant, count):
            asked = "" if count == 1 else f"; this request's {count} choices count as {count}"
            raise RateLimitError(
                f"tenant {tenant!r} already has {self._active[tenant]} requests in flight on this ingress "
                f"replica (its share {self.limit(tenant)} of the tenant's limit over {self.num_replicas} "
                f"replica(s){asked}); wait for one to finish and retry",
                code="too_many_concurrent_requests", retry_after_s=1)
        self._active[tenant] += count

    @contextlib.contextmanager
    def held(self, tenant: str, count: int = 1) -> Iterator[None]:
        """`count` of the tenant's places (or the 429) for the length of a `with` block."""
        self.acquire(tenant, count)
        try:
            yield
        finally:
            self.release(tenant, count)

    def release(self, tenant: str, count: int = 1) -> None:
        self._active[tenant] -= count
        if self._active[tenant] <= 0:
            del self._active[tenant]
