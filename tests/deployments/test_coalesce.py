"""coalesce(): merges what a slow consumer missed, keeps order, forwards errors, closes."""
import asyncio

import pytest

from deployments.coalesce import coalesce


async def _numbers(count: int, fail_at: int | None = None, log: list | None = None):
    try:
        for i in range(count):
            if i == fail_at:
                raise ValueError("boom")
            yield i
            await asyncio.sleep(0)
    finally:
        if log is not None:
            log.append("closed")


def test_slow_consumer_gets_merged_batches_in_order():
    async def run():
        batches = []
        async for batch in coalesce(_numbers(50)):
            batches.append(batch)
            await asyncio.sleep(0.002)  # slower than the producer
        return batches

    batches = asyncio.run(run())
    assert [x for b in batches for x in b] == list(range(50))
    assert len(batches) < 50 and all(batches)


def test_error_is_raised_after_the_items_before_it():
    async def run():
        seen = []
        with pytest.raises(ValueError, match="boom"):
            async for batch in coalesce(_numbers(10, fail_at=4)):
                seen += batch
        return seen

    assert asyncio.run(run()) == [0, 1, 2, 3]


def test_closing_early_closes_the_source():
    async def run():
        log = []

        async def endless():
            try:
                while True:
                    yield 1
                    await asyncio.sleep(0.001)
            finally:
                log.append("closed")

        stream = coalesce(endless())
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.01)
        return log

    assert asyncio.run(run()) == ["closed"]
