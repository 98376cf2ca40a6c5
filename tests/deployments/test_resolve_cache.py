"""The ingress's resolve cache: a counting fake store for TTLs, errors and concurrency, and a
real local store for "an upload or delete through this ingress shows at once"."""
import asyncio
import threading

import pytest

from adapter_store import open_store
from adapter_store.errors import AdapterNotFoundError, InvalidNameError, StoreUnavailableError
from adapter_store.versions import AdapterInfo

from deployments.args import AppArgs
from deployments.resolve_cache import ResolveCache

TTL_S = 2.0


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """`resolve` answers from a dict {(tenant, ref): AdapterInfo}; everything else is not
    found; `down` makes it fail as an unreachable S3 would. Counts every call."""

    def __init__(self, known: dict):
        self.known, self.calls, self.down = known, [], False

    def resolve(self, tenant: str, ref: str) -> AdapterInfo:
        self.calls.append((tenant, ref))
        if self.down:
            raise StoreUnavailableError("S3 is unreachable; check the endpoint")
        if (tenant, ref) not in self.known:
            raise AdapterNotFoundError(f"adapter {ref!r} not found")
        return self.known[(tenant, ref)]


def _info(tenant: str, name: str, version: str) -> AdapterInfo:
    return AdapterInfo(tenant, name, version, manifest={"files": {}})


@pytest.fixture
def fake():
    return CountingStore({("acme", "style"): _info("acme", "style", "v2"),
                          ("acme", "style@v1"): _info("acme", "style", "v1"),
                          ("globex", "style"): _info("globex", "style", "g1")})


def _resolve_all(cache: ResolveCache, refs: list[tuple[str, str]]) -> list:
    async def run():
        answers = []
        for tenant, ref in refs:
            try:
                answers.append((await cache.resolve(tenant, ref)).version)
            except AdapterNotFoundError as exc:
                answers.append(type(exc).__name__)
        return answers
    return asyncio.run(run())


def test_repeated_requests_within_the_ttl_resolve_once(fake):
    clock = FakeClock()
    cache = ResolveCache(fake.resolve, TTL_S, clock=clock)
    assert _resolve_all(cache, [("acme", "style")]) == ["v2"]
    clock.now += TTL_S * 0.99
    assert _resolve_all(cache, [("acme", "style")] * 5) == ["v2"] * 5
    assert fake.calls == [("acme", "style")]
    assert (cache.num_hits, cache.num_misses) == (5, 1)


def test_a_bare_name_is_asked_again_after_the_ttl_a_pinned_version_later(fake):
    clock = FakeClock()
    cache = ResolveCache(fake.resolve, TTL_S, pinned_ttl_factor=10, clock=clock)
    _resolve_all(cache, [("acme", "style"), ("acme", "style@v1")])
    clock.now += TTL_S
    fake.known[("acme", "style")] = _info("acme", "style", "v3")  # uploaded elsewhere
    assert _resolve_all(cache, [("acme", "style"), ("acme", "style@v1")]) == ["v3", "v1"]
    assert fake.calls.count(("acme", "style")) == 2
    assert fake.calls.count(("acme", "style@v1")) == 1
    clock.now += 9 * TTL_S  # 10x the TTL after the pinned answer
    assert _resolve_all(cache, [("acme", "style@v1")]) == ["v1"]
    assert fake.calls.count(("acme", "style@v1")) == 2


def test_not_found_is_cached_for_the_ttl_and_raised_afresh_each_time(fake):
    clock = FakeClock()
    cache = ResolveCache(fake.resolve, TTL_S, pinned_ttl_factor=10, clock=clock)

    async def errors():
        raised = []
        for _ in range(3):
            with pytest.raises(AdapterNotFoundError, match="'acme/secret@v9' not found") as info:
                await cache.resolve("globex", "acme/secret@v9")
            raised.append(info.value)
        return raised

    raised = asyncio.run(errors())
    assert len({id(e) for e in raised}) == 3 and all(e.code == "not_found" for e in raised)
    assert len(fake.calls) == 1
    # a pinned ref that was not found follows the plain TTL (it may be shared later)
    clock.now += TTL_S
    asyncio.run(errors())
    assert len(fake.calls) == 2


def test_store_outage_is_not_cached(fake):
    cache = ResolveCache(fake.resolve, TTL_S, clock=FakeClock())
    fake.down = True

    async def down():
        for _ in range(2):
            with pytest.raises(StoreUnavailableError):
                await cache.resolve("acme", "style")
    asyncio.run(down())
    fake.down = False
    assert _resolve_all(cache, [("acme", "style"), ("acme", "style")]) == ["v2", "v2"]
    assert len(fake.calls) == 3 and len(cache) == 1


def test_malformed_refs_are_not_cached(tmp_path):
    store = open_store(str(tmp_path / "store"))
    cache = ResolveCache(store.resolve, TTL_S, clock=FakeClock())

    async def bad():
        with pytest.raises(InvalidNameError):
            await cache.resolve("acme", "a/b/c")
    asyncio.run(bad())
    assert len(cache) == 0


def test_each_tenant_has_its_own_entries(fake):
    cache = ResolveCache(fake.resolve, TTL_S, clock=FakeClock())
    refs = [("acme", "style"), ("globex", "style"), ("solo", "style")]
    assert _resolve_all(cache, refs * 2) == ["v2", "g1", "AdapterNotFoundError"] * 2
    assert fake.calls == refs


def test_size_is_bounded_least_recently_used_first(fake):
    cache = ResolveCache(fake.resolve, TTL_S, max_entries=2, clock=FakeClock())
    _resolve_all(cache, [("acme", "style"), ("globex", "style"), ("acme", "style"),
                         ("acme", "style@v1")])  # evicts globex/style, the least recently used
    assert len(cache) == 2
    _resolve_all(cache, [("acme", "style"), ("globex", "style")])
    assert fake.calls.count(("acme", "style")) == 1 and fake.calls.count(("globex", "style")) == 2


def test_ttl_zero_asks_the_store_every_time(fake):
    cache = ResolveCache(fake.resolve, 0.0)
    assert _resolve_all(cache, [("acme", "style")] * 3) == ["v2"] * 3
    assert len(fake.calls) == 3 and len(cache) == 0


def test_concurrent_misses_share_one_store_call(fake):
    release = threading.Event()
    slow = fake.resolve

    def blocking(tenant, ref):
        release.wait(timeout=30)
        return slow(tenant, ref)

    cache = ResolveCache(blocking, TTL_S, clock=FakeClock())

    async def run():
        waiting = [asyncio.ensure_future(cache.resolve("acme", "style")) for _ in range(8)]
        await asyncio.sleep(0)
        waiting[0].cancel()  # a caller that leaves does not cancel the others' lookup
        release.set()
        return await asyncio.gather(*waiting[1:])

    assert {info.version for info in asyncio.run(run())} == {"v2"}
    assert fake.calls == [("acme", "style")]


def _blocking(fake):
    """(a resolver of `fake` that holds every lookup until `release` is set, `started`: set once
    a lookup began, `release`)."""
    started, release = threading.Event(), threading.Event()

    def blocking(tenant, ref):
        started.set()
        release.wait(timeout=30)
        return fake.resolve(tenant, ref)
    return blocking, started, release


def test_a_lookup_begun_before_an_invalidation_does_not_fill_the_cache(fake):
    blocking, started, release = _blocking(fake)

    cache = ResolveCache(blocking, TTL_S, clock=FakeClock())

    async def run():
        pending = asyncio.ensure_future(cache.resolve("acme", "style"))
        await asyncio.to_thread(started.wait, 30)
        cache.invalidate("style")  # e.g. an upload finished while the store was being read
        release.set()
        return (await pending).version

    assert asyncio.run(run()) == "v2"
    assert len(cache) == 0



def test_an_invalidation_of_another_name_keeps_a_lookup_in_flight_cached(fake):
    blocking, started, release = _blocking(fake)

    cache = ResolveCache(blocking, TTL_S, max_entries=2, clock=FakeClock())

    async def run():
        pending = asyncio.ensure_future(cache.resolve("acme", "style"))
        await asyncio.to_thread(started.wait, 30)
        cache.invalidate("junk")  # another tenant's failed upload of another adapter
        release.set()
        await pending
        await cache.resolve("acme", "style")
        for name in ("a", "b", "c"):  # more names than max_entries: the table starts over
            cache.invalidate(name)
        pending = asyncio.ensure_future(cache.resolve("acme", "style@v1"))
        await asyncio.sleep(0)
        for name in ("d", "e", "f"):
            cache.invalidate(name)
        await pending

    asyncio.run(run())
    assert fake.calls == [("acme", "style"), ("acme", "style@v1")]
    assert len(cache) == 1  # style@v1 began under the old table: not kept

@pytest.fixture(scope="module")
def local_store(tmp_path_factory, tiny_checkpoint, tiny_adapter):
    """A real local store, the checkpoint and two adapters to upload; calls count."""
    store = open_store(str(tmp_path_factory.mktemp("store")))
    return store, tiny_checkpoint(), tiny_adapter(seed=1), tiny_adapter(seed=2, rank=4)


def _counted(store):
    calls = []

    def resolve(tenant, ref):
        calls.append((tenant, ref))
        return store.resolve(tenant, ref)
    return resolve, calls


def test_an_upload_through_the_ingress_shows_the_new_version_at_once(local_store):
    store, base, first, second = local_store
    resolve, calls = _counted(store)
    cache = ResolveCache(resolve, TTL_S, clock=FakeClock())
    v1 = store.put("acme", "rolling", first, base).version
    store.put("globex", "rolling", second, base)
    assert _resolve_all(cache, [("acme", "rolling"), ("globex", "rolling")]) != [v1, v1]
    v2 = store.put("acme", "rolling", second, base).version
    # without the ingress's invalidation the cache still answers v1: it is really in use
    assert _resolve_all(cache, [("acme", "rolling")]) == [v1]
    cache.invalidate("rolling")  # what the ingress's upload endpoint does
    assert _resolve_all(cache, [("acme", "rolling")]) == [v2]
    assert calls.count(("acme", "rolling")) == 2


def test_a_delete_through_the_ingress_makes_the_name_404_at_once(local_store):
    store, base, first, _ = local_store
    resolve, calls = _counted(store)
    cache = ResolveCache(resolve, TTL_S, clock=FakeClock())
    version = store.put("acme", "doomed", first, base).version
    assert _resolve_all(cache, [("acme", "doomed"), ("acme", f"doomed@{version}")]) == [version] * 2
    store.delete("acme", "doomed")
    cache.invalidate("doomed")  # what the ingress's delete endpoint does
    assert _resolve_all(cache, [("acme", "doomed"), ("acme", f"doomed@{version}")]) == \
        ["AdapterNotFoundError"] * 2
    assert len(calls) == 4


def test_app_args_default_and_bounds():
    assert AppArgs().adapter_resolve_ttl_s == 2.0
    assert AppArgs(adapter_resolve_ttl_s=0).adapter_resolve_ttl_s == 0
    with pytest.raises(ValueError, match="adapter_resolve_ttl_s"):
        AppArgs(adapter_resolve_ttl_s=-1)
    with pytest.raises(ValueError, match="ttl_s >= 0"):
        ResolveCache(lambda tenant, ref: None, -1.0)


def test_last_listings_stand_in_for_an_unavailable_store_only_within_their_window():
    from deployments.resolve_cache import LastListings
    clock, down = FakeClock(), [False]

    def list_adapters(tenant):
        if down[0]:
            raise StoreUnavailableError("S3 is unreachable; check the endpoint")
        return [f"{tenant}-adapter"]
    listings = LastListings(list_adapters, stale_if_error_s=60.0, clock=clock)
    assert asyncio.run(listings.list("acme")) == (["acme-adapter"], False)
    down[0] = True
    clock.now += 59.0
    assert asyncio.run(listings.list("acme")) == (["acme-adapter"], True)
    clock.now += 1.0  # the last good list is 60 s old: the store's error, not a stale guess
    with pytest.raises(StoreUnavailableError):
        asyncio.run(listings.list("acme"))
