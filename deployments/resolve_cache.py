"""`ResolveCache`: the ingress's short-lived memory of `store.resolve(tenant, ref)`.

Resolving an adapter costs a thread hop and, on S3, at least one GET; without this cache
every completion paid it before its first token. An entry maps (tenant, ref) to the
resolved `AdapterInfo`, or to the store's not-found answer (which also stands for
"another tenant's, not shared": the store never says "forbidden").

Staleness bound: a change made through this ingress (upload, delete) invalidates every
entry naming that adapter at once; a change made elsewhere (another ingress replica, the
CLI, an operator's share) is seen after at most `ttl_s`. A positive answer for a pinned
ref (`name@version`) lives `pinned_ttl_factor` times longer: a version never changes, it
can only be deleted or unshared, which another ingress then shows after that longer bound.
Store errors other than not-found (S3 down, bad names) are never cached.

Stale while the store is down: an adapter in use must keep serving through a store outage.
When a refresh fails with `StoreUnavailableError`, the last answer that found the adapter is
given instead, for up to `stale_if_error_s` after that answer was fetched; later requests get
it at once while one refresh at a time keeps asking the store in the background, so an outage
costs one store timeout, not one a request. A not-found answer from a reachable store replaces
it as usual, and so does an invalidation: neither is ever hidden by a stale answer. What a
stale answer may miss is a change made elsewhere during the outage (a new version, a delete,
an unshare), for at most `stale_if_error_s`. The first stale answer of an outage logs a
warning and the first store answer after it logs the recovery.

Concurrent misses for one key share a single store call. A store call that began before an
invalidation does not fill the cache, so an upload is never hidden by an older answer.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapter_store.errors import AdapterNotFoundError, StoreUnavailableError
from adapter_store.names import ref_name

logger = logging.getLogger("ray.serve")

Key = tuple[str, str]  # (tenant, ref exactly as the request spelled it)
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_PINNED_TTL_FACTOR = 10.0
DEFAULT_STALE_IF_ERROR_S = 600.0


@dataclass(slots=True)
class _Entry:
    name: str  # the adapter name inside the ref: what an upload or delete invalidates
    expires_at: float
    info: object = None  # AdapterInfo when found
    not_found: tuple[str, str] | None = None  # (message, code) of the store's not-found
    stale_until: float = 0.0  # a found answer may stand in for an unavailable store until then
    refresh_failed: bool = False  # the last refresh found the store unavailable


class ResolveCache:
    """`await cache.resolve(tenant, ref)` -> AdapterInfo, or raises the store's error."""

    def __init__(self, resolve: Callable, ttl_s: float, max_entries: int = DEFAULT_MAX_ENTRIES,
                 pinned_ttl_factor: float = DEFAULT_PINNED_TTL_FACTOR,
                 stale_if_error_s: float = DEFAULT_STALE_IF_ERROR_S,
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s < 0 or max_entries < 1 or pinned_ttl_factor < 1 or stale_if_error_s < 0:
            raise ValueError(f"ResolveCache needs ttl_s >= 0 (got {ttl_s}), max_entries >= 1 "
                             f"(got {max_entries}), pinned_ttl_factor >= 1 "
                             f"(got {pinned_ttl_factor}) and stale_if_error_s >= 0 "
                             f"(got {stale_if_error_s})")
        self._resolve = resolve
        self._ttl_s = ttl_s
        self._pinned_ttl_s = ttl_s * pinned_ttl_factor
        self._stale_if_error_s = stale_if_error_s
        self._serving_stale = False  # an outage is under way: logged at its start and its end
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._in_flight: dict[Key, asyncio.Task] = {}
        # per adapter name, bumped by its invalidations: a lookup in flight across an upload or
        # delete of its name is not kept, one of another name is (a tenant's failed uploads must
        # not make everyone's lookups uncached); past max_entries names the table starts over
        # under a new generation, which no lookup in flight matches
        self._epochs: dict[str, int] = {}
        self._generation = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_stale = 0  # answers given from a stale entry because the store was unavailable

    def __len__(self) -> int:
        return len(self._entries)

    async def resolve(self, tenant: str, ref: str):
        """The store's answer for (tenant, ref), from memory while it is fresh."""
        if self._ttl_s == 0:
            return await asyncio.to_thread(self._resolve, tenant, ref)
        key = (tenant, ref)
        entry = self._fresh(key)
        if entry is not None:
            self.num_hits += 1
            return _answer(entry)
        self.num_misses += 1
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fill(key, self._epoch_of(ref_name(ref))))
            task.add_done_callback(_retrieve)  # no "never retrieved" warning if all callers left
            self._in_flight[key] = task
        stale = self._stale(key)
        if stale is not None and stale.refresh_failed:  # the store was down a moment ago: no wait
            self.num_stale += 1
            return stale.info
        # shielded: a caller that goes away must not cancel the lookup the others wait on
        entry = await asyncio.shield(task)
        if entry.refresh_failed:
            self.num_stale += 1
        return _answer(entry)

    def invalidate(self, name: str) -> None:
        """Forget every answer about adapter `name`, whoever asked and however it was spelled
        (`name`, `name@v`, `owner/name`): an upload or delete of it changed what they mean."""
        self._epochs[name] = self._epochs.get(name, 0) + 1
        if len(self._epochs) > self._max_entries:
            self._epochs.clear()
            self._generation += 1
        for key in [k for k, e in self._entries.items() if e.name == name]:
            del self._entries[key]
        for key in [k for k in self._in_flight if ref_name(k[1]) == name]:
            del self._in_flight[key]  # its result still goes to those already waiting

    def _fresh(self, key: Key) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            if now >= entry.stale_until:  # kept past its TTL only as a stand-in for an outage
                del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _stale(self, key: Key) -> _Entry | None:
        """The expired answer that may still stand in for an unavailable store, if any."""
        entry = self._entries.get(key)
        if entry is None or entry.info is None or self._clock() >= entry.stale_until:
            return None
        return entry

    def _epoch_of(self, name: str) -> tuple[int, int]:
        return self._generation, self._epochs.get(name, 0)

    async def _fill(self, key: Key, epoch: tuple[int, int]) -> _Entry:
        (tenant, ref), started = key, self._clock()  # the answer's age counts from here
        try:
            info = await asyncio.to_thread(self._resolve, tenant, ref)
            entry = _Entry(ref_name(ref), started + self._ttl(pinned="@" in ref), info=info,
                           stale_until=started + self._stale_if_error_s)
        except AdapterNotFoundError as exc:  # other errors (bad names) propagate
            entry = _Entry(ref_name(ref), started + self._ttl(pinned=False),
                           not_found=(str(exc), exc.code))
        except StoreUnavailableError as exc:
            return self._stand_in(key, exc)
        except Exception:
            self._forget_stale(key)  # the store answered, with an error the callers must see
            raise
        finally:
            if self._in_flight.get(key) is asyncio.current_task():
                del self._in_flight[key]
        if self._serving_stale:
            self._serving_stale = False
            logger.warning("adapter store answers again; resolving adapters afresh")
        if epoch == self._epoch_of(entry.name):  # else an upload or delete of it happened meanwhile
            self._store(key, entry)
        return entry

    def _stand_in(self, key: Key, exc: StoreUnavailableError) -> _Entry:
        """The last good answer for `key` in place of the store's, or raise `exc`.

        An invalidation deletes the entries it names, so what is found here is never older
        than an upload or delete made through this ingress."""
        stale = self._stale(key)
        if stale is None:
            raise exc
        stale.refresh_failed = True
        if not self._serving_stale:
            self._serving_stale = True
            logger.warning("adapter store unavailable (%s); serving adapters resolved in the "
                           "last %.0f s from memory until it answers", exc.code, self._stale_if_error_s)
        return stale

    def _forget_stale(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is not None and self._clock() >= entry.expires_at:
            del self._entries[key]

    def _ttl(self, pinned: bool) -> float:
        return self._pinned_ttl_s if pinned else self._ttl_s

    def _store(self, key: Key, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class LastListings:
    """The last adapter list the store gave for each tenant, as a stand-in while it is down.

    /v1/models lists what a caller may use; with the store unreachable, completions keep
    resolving adapters from `ResolveCache`'s stale answers, so the list a client reads to pick
    one should not fail either. Every call asks the store; only on `StoreUnavailableError` is
    the tenant's last list (fetched at most `stale_if_error_s` ago) given instead, and with
    none that recent the error propagates. An upload or delete of an adapter through this
    ingress forgets every list that names it (`invalidate`), as it forgets resolved names; a new
    name a stand-in may lack, for at most `stale_if_error_s`. At most `max_entries` tenants' lists
    are kept (each lists the shared adapters too)."""

    def __init__(self, list_adapters: Callable, stale_if_error_s: float = DEFAULT_STALE_IF_ERROR_S,
                 max_entries: int = 1024, clock: Callable[[], float] = time.monotonic):
        self._list = list_adapters
        self._stale_if_error_s = stale_if_error_s
        self._max_entries = max_entries
        self._clock = clock
        self._lists: OrderedDict[str, tuple[float, list]] = OrderedDict()  # tenant -> (fetched, list)
        self._epoch = 0

    async def list(self, tenant: str) -> tuple[list, bool]:
        """(the tenant's adapters, whether the list is a stand-in for an unavailable store)."""
        started, epoch = self._clock(), self._epoch
        try:
            adapters = await asyncio.to_thread(self._list, tenant)
        except StoreUnavailableError:
            last = self._lists.get(tenant)
            if last is None or self._clock() - last[0] >= self._stale_if_error_s:
                raise
            return last[1], True
        if epoch == self._epoch:
            self._lists[tenant] = (started, adapters)
            self._lists.move_to_end(tenant)
            while len(self._lists) > self._max_entries:
                self._lists.popitem(last=False)
        return adapters, False

    def invalidate(self, name: str) -> None:
        self._epoch += 1
        for tenant in [t for t, (_, adapters) in self._lists.items() if any(a.name == name for a in adapters)]:
            del self._lists[tenant]


def _answer(entry: _Entry):
    if entry.not_found is not None:
        message, code = entry.not_found  # a fresh exception per caller, no frames kept alive
        raise AdapterNotFoundError(message, code=code)
    return entry.info


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
