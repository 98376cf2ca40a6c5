"""FairPool: a few threads that take queued calls by key (a tenant) in turn.

The long inputs of every tenant (prompts to tokenise, chat templates, long id lists to check)
share a few threads so that a flood of them cannot take every core from the step loop. A
first-come queue there lets one tenant's burst of megabyte prompts (~1.5 s each to tokenise)
hold another tenant's ordinary long prompt for the whole burst; taking the keys in turn, a call
waits for at most one call of each other key with work queued, whatever their backlog. A call
cancelled before it starts (its client went away) never runs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future


class FairPool:
    def __init__(self, num_threads: int, name: str):
        if num_threads < 1:
            raise ValueError(f"FairPool needs at least one thread, got {num_threads}")
        self._num_threads, self._name = num_threads, name
        self._ready = threading.Condition()
        # key -> its queued calls; the first key is the next to be served, and a served key
        # with calls left goes to the back
        self._queues: OrderedDict[str, deque] = OrderedDict()
        self._threads: list[threading.Thread] = []

    def submit(self, key: str, fn: Callable, *args) -> Future:
        """Queue `fn(*args)` under `key`; its Future gives the result or the exception."""
        future: Future = Future()
        with self._ready:
            self._queues.setdefault(key, deque()).append((future, fn, args))
            if len(self._threads) < self._num_threads:  # started on demand, like ThreadPoolExecutor's
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}-{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
            self._ready.notify()
        return future

    def queued(self) -> int:
        with self._ready:
            return sum(len(calls) for calls in self._queues.values())

    def _next(self) -> tuple:
        with self._ready:
            while not self._queues:
                self._ready.wait()
            key, calls = self._queues.popitem(last=False)
            call = calls.popleft()
            if calls:
                self._queues[key] = calls
            return call

    def _work(self) -> None:
        while True:
            future, fn, args = self._next()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the call
                future.set_exception(exc)
            else:
                future.set_result(result)
