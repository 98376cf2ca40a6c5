"""The resolve cache through a store outage: an adapter in use keeps serving from its last good
answer for `stale_if_error_s`, a reachable store's not-found still wins, and a stalled store
costs one wait, not one a request."""
import asyncio
import logging
import threading

import pytest

from adapter_store.errors import AdapterNotFoundError, ChecksumMismatchError, StoreUnavailableError

from deployments.resolve_cache import ResolveCache
from tests.deployments.test_resolve_cache import TTL_S, CountingStore, FakeClock, _info

STALE_S = 600.0
HANG_GUARD_S = 30.0


@pytest.fixture
def fake():
    return CountingStore({("acme", "style"): _info("acme", "style", "v2")})


def _cache(fake, clock, **options) -> ResolveCache:
    return ResolveCache(fake.resolve, TTL_S, stale_if_error_s=STALE_S, clock=clock, **options)


async def _version(cache: ResolveCache, ref: str = "style") -> str:
    return (await asyncio.wait_for(cache.resolve("acme", ref), HANG_GUARD_S)).version


async def _stale_after_outage(cache: ResolveCache, fake, clock) -> None:
    """Resolve once, take the store down, let the entry expire: the answer is the stale one."""
    await _version(cache)
    fake.down = True
    clock.now += TTL_S
    assert await _version(cache) == "v2"


async def _until_version(cache: ResolveCache, want: str) -> None:
    """Ask until the background refresh has landed `want` (a hang guard, not a timing check)."""
    for _ in range(int(HANG_GUARD_S / 0.01)):
        if await _version(cache) == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the cache never answered {want!r}")


def test_an_adapter_in_use_keeps_serving_while_the_store_is_down(fake):
    clock = FakeClock()
    cache = _cache(fake, clock)

    async def run():
        assert await _version(cache) == "v2"
        fake.down = True
        answers = []
        for _ in range(5):
            clock.now += TTL_S * 3  # every answer is past its TTL
            answers.append(await _version(cache))
        return answers

    assert asyncio.run(run()) == ["v2"] * 5
    assert cache.num_stale == 5 and len(fake.calls) >= 2  # the store was asked again


def test_stale_answers_end_stale_if_error_s_after_the_last_good_one(fake):
    clock = FakeClock()
    cache = _cache(fake, clock)

    async def run():
        await _version(cache)
        fake.down = True
        clock.now += STALE_S * 0.99
        assert await _version(cache) == "v2"
        clock.now += STALE_S * 0.02
        with pytest.raises(StoreUnavailableError):
            await _version(cache)
    asyncio.run(run())


def test_stale_if_error_s_zero_keeps_the_old_fail_fast(fake):
    clock = FakeClock()
    cache = ResolveCache(fake.resolve, TTL_S, stale_if_error_s=0, clock=clock)

    async def run():
        await _version(cache)
        fake.down = True
        clock.now += TTL_S
        with pytest.raises(StoreUnavailableError):
            await _version(cache)
    asyncio.run(run())


def test_a_reachable_stores_not_found_wins_over_a_stale_answer(fake):
    clock = FakeClock()
    cache = _cache(fake, clock)

    async def run():
        await _stale_after_outage(cache, fake, clock)
        del fake.known[("acme", "style")]  # deleted elsewhere during the outage
        fake.down = False
        for _ in range(int(HANG_GUARD_S / 0.01)):  # the background refresh brings the 404
            try:
                await _version(cache)
            except AdapterNotFoundError:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the store's not-found never reached the callers")
    asyncio.run(run())


def test_other_store_errors_are_not_hidden_by_a_stale_answer():
    def corrupt(tenant, ref):
        raise ChecksumMismatchError("manifest is corrupt", code="corrupt_manifest")

    calls = {"n": 0}
    good = _info("acme", "style", "v2")

    def resolve(tenant, ref):
        calls["n"] += 1
        return good if calls["n"] == 1 else corrupt(tenant, ref)

    clock = FakeClock()
    cache = ResolveCache(resolve, TTL_S, stale_if_error_s=STALE_S, clock=clock)

    async def run():
        await _version(cache)
        clock.now += TTL_S
        with pytest.raises(ChecksumMismatchError):
            await _version(cache)
    asyncio.run(run())


def test_the_store_coming_back_is_used_by_the_next_refresh(fake):
    clock = FakeClock()
    cache = _cache(fake, clock)

    async def run():
        await _stale_after_outage(cache, fake, clock)
        fake.known[("acme", "style")] = _info("acme", "style", "v3")  # uploaded elsewhere
        fake.down = False
        await _until_version(cache, "v3")
        clock.now += TTL_S * 0.5
        assert await _version(cache) == "v3"
    asyncio.run(run())


def test_an_invalidated_adapter_gets_no_stale_answer(fake):
    clock = FakeClock()
    cache = _cache(fake, clock)

    async def run():
        await _version(cache)
        cache.invalidate("style")  # an upload or delete through this ingress
        fake.down = True
        with pytest.raises(StoreUnavailableError):
            await _version(cache)
    asyncio.run(run())


def test_a_stalled_store_costs_one_wait_not_one_a_request(fake):
    """Once a refresh found the store down, later requests answer from memory at once while
    a single refresh keeps waiting on the stalled store."""
    clock = FakeClock()
    stalled, released = threading.Event(), threading.Event()

    def stalling(tenant, ref):
        if stalled.is_set():
            released.wait(HANG_GUARD_S)  # an endpoint that accepts and never answers
        return fake.resolve(tenant, ref)

    cache = ResolveCache(stalling, TTL_S, stale_if_error_s=STALE_S, clock=clock)

    async def run():
        await _stale_after_outage(cache, fake, clock)  # the store failed fast this time
        stalled.set()
        clock.now += TTL_S
        answers = [await _version(cache) for _ in range(5)]  # one refresh hangs meanwhile
        calls_while_stalled = len(fake.calls)
        released.set()
        return answers, calls_while_stalled

    try:
        answers, calls_while_stalled = asyncio.run(run())
    finally:
        released.set()
    assert answers == ["v2"] * 5
    assert calls_while_stalled == 2  # the first answer, the failed refresh; the stalled one not yet


def test_an_outage_is_logged_once_and_its_end_once(fake, caplog):
    clock = FakeClock()
    cache = _cache(fake, clock)

    async def run():
        await _version(cache)
        fake.down = True
        for _ in range(4):
            clock.now += TTL_S
            await _version(cache)
        fake.known[("acme", "style")] = _info("acme", "style", "v3")
        fake.down = False
        await _until_version(cache, "v3")
        clock.now += TTL_S
        await _version(cache)

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        asyncio.run(run())
    messages = [r.getMessage() for r in caplog.records if r.name == "ray.serve"]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("answers again" in m for m in messages) == 1
