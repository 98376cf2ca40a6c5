"""The versions kept per adapter name, the same tests on LocalStore and S3Store: an upload
beyond the limit deletes the oldest versions (after its own manifest), pinned references to
them get 404, and neither other names nor uploads still in flight are touched."""
import pytest

from adapter_store.errors import AdapterNotFoundError, StoreUnavailableError
from adapter_store.limits import DEFAULT_MAX_VERSIONS_PER_ADAPTER as KEEP
from adapter_store.store import MANIFEST_FILE

VERSIONS = "tenants/acme/adapters/ad/versions"


def _upload(store, adapter, base_model, count: int, name: str = "ad") -> list[str]:
    return [store.put("acme", name, adapter, base_model).version for _ in range(count)]


def test_an_upload_beyond_the_limit_deletes_the_oldest_versions(store, adapter, base_model):
    versions = _upload(store, adapter, base_model, KEEP + 2)
    assert [v.version for v in store.list_versions("acme", "ad")] == versions[2:]
    assert sorted(store._list_children(VERSIONS)) == versions[2:]  # their files are gone too
    assert store.resolve("acme", "ad").version == versions[-1]
    assert store.resolve("acme", f"ad@{versions[2]}").version == versions[2]


def test_a_pinned_reference_to_a_deleted_version_gets_not_found(store, adapter, base_model):
    oldest = _upload(store, adapter, base_model, KEEP + 1)[0]
    with pytest.raises(AdapterNotFoundError):
        store.resolve("acme", f"ad@{oldest}")


def test_the_limit_counts_each_name_apart(store, adapter, base_model):
    other = _upload(store, adapter, base_model, 1, name="other")
    _upload(store, adapter, base_model, KEEP + 1)
    assert [v.version for v in store.list_versions("acme", "other")] == other
    assert len(store.list_versions("acme", "ad")) == KEEP


def test_an_upload_in_flight_is_neither_counted_nor_deleted(store, adapter, base_model):
    """A version without a manifest yet (an upload in flight) older than every other one."""
    in_flight = "00000101T000000.000000Z-aaaaaa"
    store._write_bytes(f"{VERSIONS}/{in_flight}/adapter_config.json", b"{}")
    versions = _upload(store, adapter, base_model, KEEP + 1)
    assert [v.version for v in store.list_versions("acme", "ad")] == versions[1:]
    assert store._read(f"{VERSIONS}/{in_flight}/adapter_config.json") == b"{}"


def test_a_failed_prune_leaves_the_upload_committed(store, adapter, base_model, monkeypatch):
    versions = _upload(store, adapter, base_model, KEEP)

    def unavailable(prefix):
        raise StoreUnavailableError("store went away mid-prune", code="unreachable")

    with monkeypatch.context() as patched:
        patched.setattr(store, "_delete_prefix", unavailable)
        newest = store.put("acme", "ad", adapter, base_model)
    assert store.resolve("acme", "ad") == newest
    # the oldest is invisible (its manifest went first); its files are a leftover for gc
    assert store.resolve("acme", f"ad@{versions[1]}").version == versions[1]
    with pytest.raises(AdapterNotFoundError):
        store.resolve("acme", f"ad@{versions[0]}")
    latest = store.put("acme", "ad", adapter, base_model)
    kept = [v.version for v in store.list_versions("acme", "ad")]
    assert kept == versions[2:] + [newest.version, latest.version]
    assert store._read(f"{VERSIONS}/{versions[0]}/{MANIFEST_FILE}") is None
