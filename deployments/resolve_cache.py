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

Concurrent misses for one key share a single store call. A store call that began before an
invalidation does not fill the cache, so an upload is never hidden by an older answer.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapter_store.errors import AdapterNotFoundError

Key = tuple[str, str]  # (tenant, ref exactly as the request spelled it)
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_PINNED_TTL_FACTOR = 10.0


@dataclass(slots=True)
class _Entry:
    name: str  # the adapter name inside the ref: what an upload or delete invalidates
    expires_at: float
    info: object = None  # AdapterInfo when found
    not_found: tuple[str, str] | None = None  # (message, code) of the store's not-found


class ResolveCache:
    """`await cache.resolve(tenant, ref)` -> AdapterInfo, or raises the store's error."""

    def __init__(self, resolve: Callable, ttl_s: float, max_entries: int = DEFAULT_MAX_ENTRIES,
                 pinned_ttl_factor: float = DEFAULT_PINNED_TTL_FACTOR,
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s < 0 or max_entries < 1 or pinned_ttl_factor < 1:
            raise ValueError(f"ResolveCache needs ttl_s >= 0 (got {ttl_s}), max_entries >= 1 "
                             f"(got {max_entries}) and pinned_ttl_factor >= 1 "
                             f"(got {pinned_ttl_factor})")
        self._resolve = resolve
        self._ttl_s = ttl_s
        self._pinned_ttl_s = ttl_s * pinned_ttl_factor
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._in_flight: dict[Key, asyncio.Task] = {}
        self._epoch = 0  # bumped by every invalidation
        self.num_hits = 0
        self.num_misses = 0

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
            task = asyncio.get_running_loop().create_task(self._fill(key, self._epoch))
            task.add_done_callback(_retrieve)  # no "never retrieved" warning if all callers left
            self._in_flight[key] = task
        # shielded: a caller that goes away must not cancel the lookup the others wait on
        return _answer(await asyncio.shield(task))

    def invalidate(self, name: str) -> None:
        """Forget every answer about adapter `name`, whoever asked and however it was spelled
        (`name`, `name@v`, `owner/name`): an upload or delete of it changed what they mean."""
        self._epoch += 1
        for key in [k for k, e in self._entries.items() if e.name == name]:
            del self._entries[key]
        for key in [k for k in self._in_flight if _name_of(k[1]) == name]:
            del self._in_flight[key]  # its result still goes to those already waiting

    def _fresh(self, key: Key) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    async def _fill(self, key: Key, epoch: int) -> _Entry:
        (tenant, ref), started = key, self._clock()  # the answer's age counts from here
        try:
            info = await asyncio.to_thread(self._resolve, tenant, ref)
            entry = _Entry(_name_of(ref), started + self._ttl(pinned="@" in ref), info=info)
        except AdapterNotFoundError as exc:  # other errors (S3 down, bad names) propagate
            entry = _Entry(_name_of(ref), started + self._ttl(pinned=False),
                           not_found=(str(exc), exc.code))
        finally:
            if self._in_flight.get(key) is asyncio.current_task():
                del self._in_flight[key]
        if epoch == self._epoch:  # else an upload or delete happened meanwhile
            self._store(key, entry)
        return entry

    def _ttl(self, pinned: bool) -> float:
        return self._pinned_ttl_s if pinned else self._ttl_s

    def _store(self, key: Key, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


def _answer(entry: _Entry):
    if entry.not_found is not None:
        message, code = entry.not_found  # a fresh exception per caller, no frames kept alive
        raise AdapterNotFoundError(message, code=code)
    return entry.info


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _name_of(ref: str) -> str:
    return ref.partition("@")[0].rpartition("/")[2]
