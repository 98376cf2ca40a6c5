"""The per-tenant adapter-count limit under concurrent uploads of new names.

The count is checked before the upload and again right before the manifest; on
LocalStore the second check and the manifest write share a per-tenant flock, so two
uploads racing for the last place cannot both win; on S3, where no lock spans the
ingress processes, an upload of a new name counts again after its manifest and takes
it back where the tenant is over its limit.
"""
import fcntl
import threading

import pytest

from adapter_store.errors import LimitExceededError
from adapter_store.local import LocalStore
from adapter_store.store import MANIFEST_FILE
from adapter_store.validate import StoreLimits
from tests.adapter_store.helpers import stored_keys

LIMIT = StoreLimits(max_adapters_per_tenant=2)


def _upload_at_once(store, adapter, base_model, names) -> dict:
    """Upload `adapter` as each of `names` for tenant acme, each on a thread of its own, all at
    once: name -> its AdapterInfo, or the LimitExceededError it got."""
    outcomes = {}

    def upload(name):
        try:
            outcomes[name] = store.put("acme", name, adapter, base_model, limits=LIMIT)
        except LimitExceededError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=upload, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_count_is_checked_again_before_the_manifest(store, adapter, base_model, monkeypatch):
    """Another upload that takes the last place while ours is uploading wins; ours is refused."""
    store.put("acme", "first", adapter, base_model, limits=LIMIT)
    real_upload, other = store._upload_file, []

    def upload(key, path, progress):
        real_upload(key, path, progress)
        if not other:  # during our upload, another one commits "second"
            other.append(None)
            other[0] = store.put("acme", "second", adapter, base_model, limits=LIMIT)

    monkeypatch.setattr(store, "_upload_file", upload)
    with pytest.raises(LimitExceededError) as caught:
        store.put("acme", "third", adapter, base_model, limits=LIMIT)
    assert caught.value.code == "too_many_adapters"
    assert [i.name for i in store.list_adapters("acme")] == ["first", "second"]
    assert sorted(k.split("/")[1] for k in stored_keys(store)) == ["first", "second"]  # ours cleaned up
    monkeypatch.undo()
    store.put("acme", "second", adapter, base_model, limits=LIMIT)  # a new version of a name takes no place


def test_local_racing_uploads_at_limit_minus_one(tmp_path, adapter, base_model, monkeypatch):
    """Both pass the early check; the flock lets exactly one of them commit.

    The first to reach its manifest holds it until the other is either blocked on the
    tenant lock or done with its own last check (the latter only without a lock), so
    the interleaving that would let both through is forced, not hoped for.
    """
    store = LocalStore(tmp_path / "store")
    store.put("acme", "first", adapter, base_model, limits=LIMIT)
    other_waits, lock, checks = threading.Event(), threading.Lock(), []
    real_flock, real_write, real_check = fcntl.flock, store._write_bytes, store._check_count

    def flock(fd, op):
        if op == fcntl.LOCK_EX:
            try:
                return real_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other_waits.set()  # the other upload holds the tenant lock
        return real_flock(fd, op)

    def check(tenant, name, limits):
        live = real_check(tenant, name, limits)
        with lock:
            checks.append(name)
            if len(checks) == 4:  # both early checks and both last checks passed
                other_waits.set()
        return live

    def write(key, data):
        if key.endswith(MANIFEST_FILE):
            assert other_waits.wait(60), "the other upload never reached its commit"
        real_write(key, data)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(store, "_check_count", check)
    monkeypatch.setattr(store, "_write_bytes", write)
    outcomes = _upload_at_once(store, adapter, base_model, ("a", "b"))
    refused = [n for n, o in outcomes.items() if isinstance(o, LimitExceededError)]
    stored = [n for n, o in outcomes.items() if not isinstance(o, Exception)]
    assert len(refused) == 1 and len(stored) == 1, outcomes
    assert outcomes[refused[0]].code == "too_many_adapters"
    assert sorted(i.name for i in store.list_adapters("acme")) == sorted(["first", *stored])
    assert sorted(k.split("/")[1] for k in stored_keys(store)) == sorted(["first", *stored])


def test_s3_uploads_racing_past_the_last_check_leave_the_tenant_at_its_limit(moto_server, adapter, base_model,
                                                                             monkeypatch):
    """Three new names for one free place, each past its last count before any manifest lands:
    at most one keeps its version (all may fail where they list while every manifest stands),
    the others fail typed and leave nothing visible."""
    from tests.adapter_store.conftest import make_bucket, s3_store

    store = s3_store(moto_server, make_bucket(moto_server))
    store.put("acme", "first", adapter, base_model, limits=LIMIT)
    names = ("a", "b", "c")
    all_checked, real_check, calls = threading.Barrier(len(names), timeout=60), store._check_count, {}

    def check(tenant, name, limits):
        live = real_check(tenant, name, limits)
        calls[name] = calls.get(name, 0) + 1
        if calls[name] == 2:  # the last count, right before the manifest
            all_checked.wait()
        return live

    monkeypatch.setattr(store, "_check_count", check)
    outcomes = _upload_at_once(store, adapter, base_model, names)
    stored = [n for n, o in outcomes.items() if not isinstance(o, Exception)]
    refused = [o for o in outcomes.values() if isinstance(o, LimitExceededError)]
    assert len(stored) <= 1 and len(stored) + len(refused) == 3, outcomes
    assert {exc.code for exc in refused} == {"too_many_adapters"}
    assert [i.name for i in store.list_adapters("acme")] == sorted(["first", *stored])


def test_new_version_of_a_live_name_is_stored_when_the_tenant_is_over_a_lowered_limit(store, adapter, base_model):
    for name in ("a", "b", "c"):
        store.put("acme", name, adapter, base_model, limits=StoreLimits(max_adapters_per_tenant=3))
    info = store.put("acme", "c", adapter, base_model, limits=LIMIT)
    assert store.resolve("acme", "c") == info
    with pytest.raises(LimitExceededError):
        store.put("acme", "d", adapter, base_model, limits=LIMIT)


def test_s3_an_upload_whose_manifest_lands_after_a_later_ones_check_takes_it_back(moto_server, adapter, base_model):
    """A passes its last count and stalls before its manifest; B (a newer version) commits and
    checks meanwhile, seeing only itself; then A's manifest lands: A sees the tenant over its
    limit and fails, though its version is the older one."""
    from tests.adapter_store.conftest import make_bucket, s3_store

    store = s3_store(moto_server, make_bucket(moto_server))
    store.put("acme", "first", adapter, base_model, limits=LIMIT)
    real_write, at_manifest, resume = store._write_bytes, threading.Event(), threading.Event()

    def write(key, data):
        if key.endswith(MANIFEST_FILE) and "/adapters/a/" in key:
            at_manifest.set()
            assert resume.wait(60)
        real_write(key, data)

    store._write_bytes = write
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(_upload_at_once(store, adapter, base_model, ["a"])))
    thread.start()
    assert at_manifest.wait(60)
    store.put("acme", "b", adapter, base_model, limits=LIMIT)
    resume.set()
    thread.join()
    assert isinstance(outcome["a"], LimitExceededError) and outcome["a"].code == "too_many_adapters"
    assert [i.name for i in store.list_adapters("acme")] == ["b", "first"]
