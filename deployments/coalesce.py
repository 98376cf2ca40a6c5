"""Coalescing a fast async stream for a slower consumer.

Every hop of a streamed token (replica -> ingress -> proxy -> client) costs CPU; when the
consumer falls behind, the outputs waiting for it are merged into one message instead
of being sent one by one. An idle consumer still gets each output as soon as it exists.
"""
import asyncio
from collections.abc import AsyncIterator

_END = object()


async def coalesce(stream: AsyncIterator) -> AsyncIterator[list]:
    """Yield lists of the items `stream` produced since the last yield (never empty).

    An exception of `stream` is raised after the items before it; closing this generator
    cancels the pump, which closes `stream`.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for item in stream:
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer in order
            queue.put_nowait(_Failure(exc))
        finally:
            queue.put_nowait(_END)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            items = [b for b in batch if b is not _END and not isinstance(b, _Failure)]
            if items:
                yield items
            for marker in batch:
                if isinstance(marker, _Failure):
                    raise marker.exc
            if batch[-1] is _END:
                return
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc
