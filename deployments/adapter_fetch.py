"""Store -> disk-cache fetches of a replica's adapters, side by side.

Serve's multiplexed loader (`serve.multiplexed`) loads one model at a time per replica: it holds
one lock around the user's load function. A replica that fetched in there would fetch 16 new
adapters one after the other (H200, 1.7 GB adapters: 3.5 s each, the 16th tenant waiting ~56 s
before its first token), and a request for an adapter already on disk would wait behind them all.
So the loader Serve calls does no I/O (deployments/replica.py), and the first request of each
adapter's LRU entry fetches it here, up to `parallel` fetches at a time, one per adapter.

Serve's loader keeps `max_num_models_per_replica` adapters and calls the load function again for
one it dropped. A version is immutable, so an adapter fetched lately whose directory is still in
the disk cache comes back from here at once, with no store read and no thread: under one
tenant's requests over more adapters than that (bench_floods' slot_hog), every such reload was a
store read and a cache lookup on the loop's default threads.
"""
import asyncio
from collections import OrderedDict
from pathlib import Path


class AdapterFetcher:
    """fetch(model_id) -> local directory of the pinned adapter `owner/name@version`, through
    store.read_pinned and cache.fetch (blocking: run in threads). One fetch per adapter at a time;
    a failed fetch is forgotten, so the next request tries again."""

    def __init__(self, store, cache, parallel: int = 4, remember: int = 4096):
        self._store = store
        self._cache = cache
        self._slots = asyncio.Semaphore(parallel)
        self._running: dict[str, asyncio.Task] = {}
        self._fetched: OrderedDict[str, Path] = OrderedDict()  # LRU of adapters fetched lately, their dirs
        self._remember = remember

    async def fetch(self, model_id: str) -> Path:
        """The adapter's local directory: at once when fetched lately and still in the disk cache,
        else after its fetch (started here if need be). A caller cancelled while waiting leaves
        the fetch running for the others."""
        local = self._fetched.get(model_id)
        if local is not None and self._cache.still_holds(local):
            self._fetched.move_to_end(model_id)
            return local
        return await asyncio.shield(self._task(model_id))

    def _task(self, model_id: str) -> asyncio.Task:
        task = self._running.get(model_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(model_id))
            self._running[model_id] = task
            task.add_done_callback(lambda done: self._finished(model_id, done))
        return task

    async def _fetch(self, model_id: str) -> Path:
        async with self._slots:
            info = await asyncio.to_thread(self._store.read_pinned, model_id)
            return await asyncio.to_thread(self._cache.fetch, self._store, info)

    def _finished(self, model_id: str, task: asyncio.Task) -> None:
        self._running.pop(model_id, None)
        if task.cancelled() or task.exception() is not None:  # retrieved: its waiters may all have been cancelled
            return
        self._fetched[model_id] = task.result()
        self._fetched.move_to_end(model_id)
        while len(self._fetched) > self._remember:
            self._fetched.popitem(last=False)
