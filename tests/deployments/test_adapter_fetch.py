"""AdapterFetcher: a replica's store -> disk-cache fetches run side by side (Serve's multiplexed
loader takes one adapter at a time), once per adapter, and a failure is not remembered."""
import asyncio
import threading
from pathlib import Path

import pytest

from deployments.adapter_fetch import AdapterFetcher


class FakeStore:
    def __init__(self, fail: set[str] = frozenset()):
        self.reads: list[str] = []
        self.fail = set(fail)

    def read_pinned(self, model_id: str) -> str:
        self.reads.append(model_id)
        if model_id in self.fail:
            raise FileNotFoundError(model_id)
        return model_id


class GatedCache:
    """cache.fetch that holds each fetch until `release` is set, counting fetches in flight."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.release = threading.Event()
        self.evicted: set[Path] = set()

    def still_holds(self, entry: Path) -> bool:
        return entry not in self.evicted

    def fetch(self, store, info: str) -> Path:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        self.release.wait(timeout=10)
        with self.lock:
            self.in_flight -= 1
        return Path("/cache") / info


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_fetches_of_different_adapters_overlap_up_to_the_bound():
    async def run():
        cache = GatedCache()
        fetcher = AdapterFetcher(FakeStore(), cache, parallel=3)
        fetches = [asyncio.create_task(fetcher.fetch(f"t/ad{k}@v1")) for k in range(5)]
        await _wait_for(lambda: cache.in_flight == 3)
        cache.release.set()
        dirs = await asyncio.gather(*fetches)
        return cache.peak, dirs

    peak, dirs = asyncio.run(run())
    assert peak == 3
    assert dirs == [Path("/cache") / f"t/ad{k}@v1" for k in range(5)]


def test_one_fetch_per_adapter_for_concurrent_and_later_requests():
    async def run():
        store, cache = FakeStore(), GatedCache()
        fetcher = AdapterFetcher(store, cache)
        waiting = [asyncio.create_task(fetcher.fetch("t/ad@v1")) for _ in range(3)]
        await _wait_for(lambda: cache.in_flight == 1)
        cache.release.set()
        await asyncio.gather(*waiting)
        await fetcher.fetch("t/ad@v1")  # fetched recently: nothing new
        return store.reads

    assert asyncio.run(run()) == ["t/ad@v1"]


def test_a_failed_fetch_reaches_its_waiters_and_the_next_request_retries():
    async def run():
        store, cache = FakeStore(fail={"t/gone@v1"}), GatedCache()
        cache.release.set()
        fetcher = AdapterFetcher(store, cache)
        with pytest.raises(FileNotFoundError):
            await fetcher.fetch("t/gone@v1")
        store.fail.clear()
        return await fetcher.fetch("t/gone@v1"), store.reads

    path, reads = asyncio.run(run())
    assert path == Path("/cache/t/gone@v1")
    assert reads == ["t/gone@v1", "t/gone@v1"]


def test_a_cancelled_waiter_leaves_the_fetch_to_the_others():
    async def run():
        cache = GatedCache()
        fetcher = AdapterFetcher(FakeStore(), cache)
        first = asyncio.create_task(fetcher.fetch("t/ad@v1"))
        second = asyncio.create_task(fetcher.fetch("t/ad@v1"))
        await _wait_for(lambda: cache.in_flight == 1)
        first.cancel()
        cache.release.set()
        return await second, first.cancelled()

    path, cancelled = asyncio.run(run())
    assert path == Path("/cache/t/ad@v1") and cancelled


def test_a_reload_of_an_adapter_still_in_the_disk_cache_reads_nothing_until_it_is_evicted():
    """Serve's loader calls fetch again for an adapter it dropped from its LRU: the directory
    comes back without a store read while the disk cache holds it, and is fetched anew after."""
    async def run():
        store, cache = FakeStore(), GatedCache()
        cache.release.set()
        fetcher = AdapterFetcher(store, cache)
        first = await fetcher.fetch("t/ad@v1")
        again = await fetcher.fetch("t/ad@v1")
        reads_while_cached = list(store.reads)
        cache.evicted.add(first)
        after_eviction = await fetcher.fetch("t/ad@v1")
        return first, again, after_eviction, reads_while_cached, store.reads

    first, again, after, reads_cached, reads = asyncio.run(run())
    assert first == again == after == Path("/cache/t/ad@v1")
    assert reads_cached == ["t/ad@v1"]
    assert reads == ["t/ad@v1", "t/ad@v1"]
