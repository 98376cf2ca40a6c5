"""LLMServer's adapter path: the function Serve's multiplexed loader calls under its one lock does
no I/O, so a request for an adapter already on disk never waits behind another adapter's store
fetch (bench_floods' slot_hog on the H200: ~1.3 s when fetches ran under the lock)."""
import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

from deployments.adapter_fetch import AdapterFetcher
from deployments.replica import LLMServer


class GatedStore:
    """read_pinned holds the adapters named in `slow` until `release` is set."""

    def __init__(self, slow: set[str]):
        self.slow, self.release, self.reads = slow, threading.Event(), []

    def read_pinned(self, model_id: str) -> str:
        self.reads.append(model_id)
        if model_id in self.slow:
            self.release.wait(timeout=10)
        return model_id


class Cache:
    def still_holds(self, entry: Path) -> bool:
        return True

    def fetch(self, store, info: str) -> Path:
        return Path("/cache") / info


class Counter:
    def __init__(self):
        self.value = 0

    def inc(self):
        self.value += 1

    def observe(self, seconds: float):
        self.value += 1


def _server(store) -> LLMServer:
    server = object.__new__(LLMServer)  # the adapter path reads only these
    server._engine = SimpleNamespace(shutdown=lambda: None)  # __del__ calls it
    server._fetcher = AdapterFetcher(store, Cache())
    server._metrics = SimpleNamespace(adapter_loads=Counter(), adapter_requests=Counter(),
                                      adapter_load_latency=Counter())
    lock = asyncio.Lock()  # what serve.multiplexed holds around every call of the loader

    async def get_adapter(model_id: str):
        async with lock:
            return await server._load_adapter(model_id)
    server._get_adapter = get_adapter
    return server


def test_a_request_for_an_adapter_on_disk_does_not_wait_behind_another_adapters_store_fetch():
    async def run():
        store = GatedStore(slow={"hog/new@v1"})
        server = _server(store)
        first = await server._adapter_request("victim/style@v1")  # fetched once, then on disk
        slow = asyncio.create_task(server._adapter_request("hog/new@v1"))
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
    assert metrics.adapter_requests.value == 3 and metrics.adapter_load_latency.value == 2
