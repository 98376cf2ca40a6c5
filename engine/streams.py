"""OutputStreams: per-request asyncio streams fed, one engine step at a time, from another thread.

The engine (a thread of this process or a process of its own) hands over each step's outputs
as one batch; `deliver` wakes every event loop that waits on them once per batch, not once per
output, and each request's consumer then takes all its outputs that arrived meanwhile as one
list. A consumer slower than the engine therefore gets fewer, larger lists instead of falling
behind by one message per token.

With `min_interval_s`, a consumer also waits that long between two lists (the first output
and a request's last one never wait): every list costs each hop downstream (Ray, the ingress,
the proxy) about the same whatever it holds, so under many streams fewer, fuller lists keep
those hops from bounding the token rate.
"""
import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput


@dataclass(slots=True)
class RequestStream:
    loop: asyncio.AbstractEventLoop
    outputs: list[RequestOutput] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set when outputs arrive
    ending: bool = False  # a finished (or failed) output is among `outputs`


class OutputStreams:
    def __init__(self):
        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}

    def open(self, request_id: str) -> RequestStream:
        """A stream for `request_id`'s outputs, read on the running event loop."""
        stream = RequestStream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = stream
        return stream

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def open_ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Thread-safe: route a step's outputs to their streams (outputs of closed streams drop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = defaultdict(list)
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop[stream.loop].append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_append_all, items)
            except RuntimeError:  # that caller's event loop is closed
                pass


def _append_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.outputs.append(out)
        stream.ending = stream.ending or out.finished or out.error is not None
        stream.wake.set()


async def _wait_until(stream: RequestStream, deadline: float) -> None:
    """Until `deadline` (loop time) or a final output arrives, whichever is first."""
    loop = stream.loop
    while not stream.ending and (remaining := deadline - loop.time()) > 0:
        stream.wake.clear()
        timer = loop.call_later(remaining, stream.wake.set)
        try:
            await stream.wake.wait()
        finally:
            timer.cancel()


async def read_batches(stream: RequestStream, on_exit: Callable[[bool], None],
                       min_interval_s: float = 0.0) -> AsyncIterator[list[RequestOutput]]:
    """Lists of one request's outputs until it finishes, at least `min_interval_s` apart (see
    the module docstring); an output's error is raised after the outputs before it.
    `on_exit(finished)` runs however the consumer stops."""
    finished, last_yield = False, None
    try:
        while not finished:
            if last_yield is not None and min_interval_s > 0:
                await _wait_until(stream, last_yield + min_interval_s)
            while not stream.outputs:
                stream.wake.clear()
                await stream.wake.wait()
            batch, stream.outputs = stream.outputs, []
            for i, out in enumerate(batch):
                if out.error is not None:
                    if i:
                        yield batch[:i]
                    finished = True  # the engine has let go of a failed request
                    raise out.error
                if out.finished:
                    finished = True
                    batch = batch[:i + 1]
                    break
            yield batch
            last_yield = stream.loop.time()
    finally:
        on_exit(finished)
