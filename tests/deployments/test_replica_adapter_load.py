"""LLMServer's adapter path: the function Serve's multiplexed loader calls under its one lock does
no I/O, so a request for an adapter already on disk never waits behind another adapter's store
fetch (bench_floods' slot_hog on the H200: ~1.3 s when fetches ran under the lock)."""
import asyncio
import threading
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest

from deployments.adapter_fetch import AdapterFetcher
from deployments.replica import LLMServer


class GatedStore:
    """read_pinned holds the adapters named in `slow` until `release` is set; raises for `down`."""

    def __init__(self, slow: set[str] = frozenset()):
        self.slow, self.release, self.reads, self.down = set(slow), threading.Event(), [], False

    def read_pinned(self, model_id: str) -> str:
        self.reads.append(model_id)
        if self.down:
            raise ConnectionError("store unreachable")
        if model_id in self.slow:
            self.release.wait(timeout=10)
        return model_id


class Cache:
    def __init__(self):
        self.evicted = False

    def still_holds(self, entry: Path) -> bool:
        return not self.evicted

    def discard(self, entry: Path, files: tuple | None = None) -> None:
        self.evicted = True

    def fetch(self, store, info: str) -> Path:
        return Path("/cache") / info


class Counter:
    def __init__(self):
        self.value = 0

    def inc(self):
        self.value += 1

    def observe(self, seconds: float):
        self.value += 1


def _server(store, cache=None, lru_size: int = 8) -> LLMServer:
    server = object.__new__(LLMServer)  # the adapter path reads only these
    server._engine = SimpleNamespace(shutdown=lambda: None)  # __del__ calls it
    server._fetcher = AdapterFetcher(store, cache or Cache())
    server._metrics = SimpleNamespace(adapter_loads=Counter(), adapter_requests=Counter(),
                                      adapter_load_latency=Counter())
    # what serve.multiplexed does around the loader: an LRU of lru_size entries, one lock over
    # every load (Serve's _ModelMultiplexWrapper.load_model)
    lock, entries = asyncio.Lock(), OrderedDict()

    async def get_adapter(model_id: str):
        if model_id in entries:
            entries.move_to_end(model_id)
            return entries[model_id]
        async with lock:
            if len(entries) >= lru_size:
                entries.popitem(last=False)
            entries[model_id] = await server._load_adapter(model_id)
            return entries[model_id]
    server._get_adapter = get_adapter
    return server


def test_a_request_for_an_adapter_on_disk_does_not_wait_behind_another_adapters_store_fetch():
    """The slot hog's case: the victim's adapter dropped from Serve's LRU by the hog's fresh
    adapters, whose store fetches are still running."""
    async def run():
        store = GatedStore(slow={"hog/new@v1"})
        server = _server(store, lru_size=1)
        first = await server._adapter_request("victim/style@v1")  # fetched once, then on disk
        slow = asyncio.create_task(server._adapter_request("hog/new@v1"))  # drops the victim's entry
        await asyncio.sleep(0.05)  # the hog's request holds its fetch open
        again = await asyncio.wait_for(server._adapter_request("victim/style@v1"), timeout=1.0)
        slow_done_before_release = slow.done()
        store.release.set()
        hog = await slow
        return first, again, hog, slow_done_before_release, store.reads, server._metrics

    first, again, hog, slow_done, reads, metrics = asyncio.run(run())
    assert first.lora_path == again.lora_path == str(Path("/cache/victim/style@v1"))
    assert first.lora_name == "victim/style@v1" and hog.lora_path == str(Path("/cache/hog/new@v1"))
    assert not slow_done  # the victim's second request finished while the hog's fetch was held
    assert reads == ["victim/style@v1", "hog/new@v1"]  # the victim's adapter was read once
    assert metrics.adapter_loads.value == 3 and metrics.adapter_requests.value == 3


def test_an_adapter_kept_in_serves_lru_serves_through_a_store_outage_and_a_disk_eviction():
    async def run():
        store, cache = GatedStore(), Cache()
        server = _server(store, cache)
        first = await server._adapter_request("t/ad@v1")
        store.down, cache.evicted = True, True  # the engine may still hold it in memory
        again = await server._adapter_request("t/ad@v1")
        return first, again, store.reads, server._metrics

    first, again, reads, metrics = asyncio.run(run())
    assert again is first and reads == ["t/ad@v1"]
    assert metrics.adapter_loads.value == 1 and metrics.adapter_load_latency.value == 1


def test_one_fetch_for_concurrent_requests_of_a_new_adapter_and_a_retry_after_a_failure():
    async def run():
        store = GatedStore(slow={"t/ad@v1"})
        server = _server(store)
        store.down = True
        with pytest.raises(ConnectionError):
            await server._adapter_request("t/ad@v1")
        store.down = False
        waiting = [asyncio.create_task(server._adapter_request("t/ad@v1")) for _ in range(3)]
        await asyncio.sleep(0.05)
        store.release.set()
        loras = await asyncio.gather(*waiting)
        return loras, store.reads, server._metrics

    loras, reads, metrics = asyncio.run(run())
    assert loras[0] is loras[1] is loras[2] and reads == ["t/ad@v1", "t/ad@v1"]  # the failure, then one fetch
    assert metrics.adapter_loads.value == 1  # one LRU entry; its first fetch failed, the next one held


def test_a_refetched_copy_the_engine_still_cannot_read_is_refused_not_fetched_for_every_request():
    from engine.errors import AdapterLoadError

    async def run():
        store, cache = GatedStore(), Cache()
        server = _server(store, cache)
        server._cache = cache
        first = await server._adapter_request("t/ad@v1")
        again = await server._refetch_adapter("t/ad@v1", first)  # the first report: fetched again
        assert again is not first and await server._refetch_adapter("t/ad@v1", first) is again
        with pytest.raises(AdapterLoadError, match="still cannot be read"):
            await server._refetch_adapter("t/ad@v1", again)
        return store.reads

    assert asyncio.run(run()) == ["t/ad@v1", "t/ad@v1"]


def _engine_server(tmp_path, checkpoint, cache_bytes: int):
    """An LLMServer over a real AsyncLLMEngine (one slot, one adapter in the host tier), a local
    store and the node's DiskCache of `cache_bytes`; Serve's LRU as in _server."""
    from adapter_store import DiskCache, open_store
    from engine import AsyncLLMEngine, EngineConfig

    store, cache = open_store(str(tmp_path / "store")), DiskCache(tmp_path / "cache", cache_bytes)
    server = _server(store, cache)
    server._cache = cache
    server._engine = AsyncLLMEngine(EngineConfig(model=checkpoint, max_loras=1, max_cpu_loras=1,
                                                 block_size=4, max_model_len=64))
    server._args = SimpleNamespace(stream_interval_ms=0, max_model_len=64)
    server._metrics.finished = lambda *args: None
    server._loop_lag = SimpleNamespace(ensure_started=lambda: None)
    server._stats_task = asyncio.Future()  # no stats publisher
    return server, store


async def _complete(server, model_id: str, rid: str) -> dict:
    request = {"request_id": rid, "tenant": "acme", "adapter": model_id, "prompt": [5, 6, 7, 8],
               "max_tokens": 3, "sampling": {"temperature": 0.0}}
    items = [item async for item in server.generate(request)]
    return items[-1] if "error" in items[-1] else {"tokens": [t for i in items for t in i["token_ids"]]}


@pytest.mark.parametrize("damage", ["evicted", "cut_short"])
def test_adapter_files_the_disk_cache_dropped_or_damaged_are_fetched_again_for_the_engine(
        tmp_path, tiny_checkpoint, tiny_adapter, damage):
    """Serve's LRU keeps an adapter's directory while the disk cache (its own bound, other replicas)
    drops or damages it; once the engine's host tier no longer holds the adapter it reads the files
    again. That request is served from a fresh, verified fetch (it was a 422 naming the adapter,
    every time, for as long as Serve kept the entry)."""
    checkpoint = tiny_checkpoint("qwen3_moe")
    a, b = (tiny_adapter("qwen3_moe", "per_expert", rank=4, seed=s) for s in (101, 102))

    async def run():
        server, store = _engine_server(tmp_path, checkpoint, cache_bytes=1 << 30)
        refs = [store.put("acme", name, path, checkpoint).ref for name, path in (("a", a), ("b", b))]
        try:
            first = await _complete(server, refs[0], "r0")
            await _complete(server, refs[1], "r1")  # the engine's one host place goes to b
            entry = Path((await server._get_adapter(refs[0])).lora.lora_path)
            if damage == "evicted":
                server._cache.discard(entry)
            else:
                with open(entry / "adapter_model.safetensors", "r+b") as f:
                    f.truncate(1000)
            again = await _complete(server, refs[0], "r2")
            return first, again, server._cache.downloads
        finally:
            server._engine.shutdown()

    first, again, downloads = asyncio.run(run())
    assert "tokens" in first and again == first
    assert downloads == 3  # a, b, then a again
