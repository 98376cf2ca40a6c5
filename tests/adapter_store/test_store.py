"""The store API, the same tests on LocalStore and S3Store (moto's server over HTTP)."""
import threading

import pytest

from adapter_store import DiskCache
from adapter_store.errors import (
    AdapterNotFoundError, ChecksumMismatchError, InvalidNameError, StoreUnavailableError,
)
from adapter_store.store import MANIFEST_FILE
from adapter_store.versions import file_digest
from tests.adapter_store.helpers import CONFIG, WEIGHTS, same_files


@pytest.mark.parametrize("family,fmt", [
    ("qwen3_moe", "per_expert"), ("mixtral", "per_expert"), ("olmoe", "fused"), ("qwen3_moe", "attn_only"),
])
def test_round_trip(store, tiny_checkpoint, tiny_adapter, tmp_path, family, fmt):
    src = tiny_adapter(family, fmt, rank=4)
    info = store.put("acme", "ad", src, tiny_checkpoint(family))
    assert info.manifest["files"][WEIGHTS] == file_digest(src / WEIGHTS)
    assert info.manifest["layout"] == fmt and info.manifest["tenant"] == "acme"
    got = store.resolve("acme", "ad")
    assert got == info and not got.shared
    path = DiskCache(tmp_path / "cache", 1 << 30).fetch(store, got)
    assert same_files(path, src)


def test_versions_are_immutable_and_latest_wins(store, tiny_adapter, base_model):
    first = store.put("acme", "ad", tiny_adapter(rank=4, seed=1), base_model)
    second = store.put("acme", "ad", tiny_adapter(rank=4, seed=2), base_model)
    assert first.version < second.version
    assert [v.version for v in store.list_versions("acme", "ad")] == [first.version, second.version]
    assert store.resolve("acme", "ad") == second
    assert store.resolve("acme", f"ad@{first.version}") == first
    assert first.manifest["files"] != second.manifest["files"]
    [listed] = store.list_adapters("acme")
    assert listed == second


def test_delete_version_then_adapter(store, adapter, base_model):
    first = store.put("acme", "ad", adapter, base_model)
    second = store.put("acme", "ad", adapter, base_model)
    store.delete("acme", "ad", second.version)
    assert store.resolve("acme", "ad") == first
    with pytest.raises(AdapterNotFoundError):
        store.resolve("acme", f"ad@{second.version}")
    store.delete("acme", "ad")
    with pytest.raises(AdapterNotFoundError):
        store.resolve("acme", "ad")
    assert store.list_adapters("acme") == [] and store.list_versions("acme", "ad") == []
    with pytest.raises(AdapterNotFoundError):
        store.delete("acme", "ad")


def test_other_tenants_see_nothing_until_shared(store, adapter, base_model):
    info = store.put("acme", "ad", adapter, base_model)
    for ref in ("ad", "acme/ad", f"acme/ad@{info.version}"):
        with pytest.raises(AdapterNotFoundError) as caught:
            store.resolve("beta", ref)
        assert "forbidden" not in str(caught.value).lower() and "permission" not in str(caught.value).lower()
    assert store.list_adapters("beta") == [] and store.list_versions("beta", "acme/ad") == []
    with pytest.raises(AdapterNotFoundError):
        store.share("beta", "ad")  # nor may they share or delete it
    with pytest.raises(AdapterNotFoundError):
        store.delete("beta", "ad")

    store.share("acme", "ad")
    for ref in ("ad", "acme/ad", f"acme/ad@{info.version}"):
        got = store.resolve("beta", ref)
        assert (got.tenant, got.version, got.shared) == ("acme", info.version, True)
    assert [(i.tenant, i.name, i.shared) for i in store.list_adapters("beta")] == [("acme", "ad", True)]
    assert store.resolve("acme", "ad").shared
    with pytest.raises(AdapterNotFoundError):
        store.delete("beta", "ad")  # shared is not owned

    store.share("acme", "ad", shared=False)
    with pytest.raises(AdapterNotFoundError):
        store.resolve("beta", "acme/ad")


def test_deleting_the_last_version_drops_the_share_mark(store, adapter, base_model):
    """A name whose every version was deleted one by one comes back unshared."""
    info = store.put("acme", "ad", adapter, base_model)
    store.share("acme", "ad")
    store.delete("acme", "ad", version=info.version)
    store.put("acme", "ad", adapter, base_model)
    with pytest.raises(AdapterNotFoundError):
        store.resolve("beta", "acme/ad")
    assert not store.resolve("acme", "ad").shared


def test_own_names_first_and_ambiguous_shared_names(store, tiny_adapter, base_model):
    a = store.put("acme", "ad", tiny_adapter(rank=4, seed=1), base_model)
    c = store.put("corp", "ad", tiny_adapter(rank=4, seed=2), base_model)
    own = store.put("beta", "ad", tiny_adapter(rank=4, seed=3), base_model)
    store.share("acme", "ad")
    store.share("corp", "ad")
    assert store.resolve("beta", "ad") == own
    assert store.resolve("beta", "corp/ad").version == c.version
    store.delete("beta", "ad")
    with pytest.raises(AdapterNotFoundError, match="owner/ad"):
        store.resolve("beta", "ad")
    assert store.resolve("beta", "acme/ad").version == a.version


@pytest.mark.parametrize("ref", ["", "a/b/c", "../x", "x@", "x@../y", "ow ner/x"])
def test_bad_references_are_typed_errors(store, ref):
    with pytest.raises(InvalidNameError):
        store.resolve("acme", ref)


def test_concurrent_uploads_of_one_name(store, tiny_adapter, base_model, tmp_path):
    sources = [tiny_adapter(rank=4, seed=10), tiny_adapter(rank=4, seed=11)]
    results, errors = [None, None], []

    def upload(i):
        try:
            results[i] = store.put("acme", "ad", sources[i], base_model)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results[0].version != results[1].version
    assert len(store.list_versions("acme", "ad")) == 2
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    for src, info in zip(sources, results):
        assert same_files(cache.fetch(store, store.resolve("acme", f"ad@{info.version}")), src)


def test_upload_interrupted_before_manifest_is_invisible(store, adapter, base_model):
    first = store.put("acme", "ad", adapter, base_model)
    calls = []

    def interrupt(nbytes):
        calls.append(nbytes)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the weights upload

    with pytest.raises(KeyboardInterrupt):
        store.put("acme", "ad", adapter, base_model, progress=interrupt)
    # A crash leaves the files but no manifest: write such a version by hand.
    crashed = "29991231T235959.999999Z-dead00"
    prefix = f"tenants/acme/adapters/ad/versions/{crashed}"
    for name in (CONFIG, WEIGHTS):
        store._upload_file(f"{prefix}/{name}", adapter / name, None)
    assert store.resolve("acme", "ad") == first  # though the crashed version sorts last
    assert [v.version for v in store.list_versions("acme", "ad")] == [first.version]
    with pytest.raises(AdapterNotFoundError):
        store.resolve("acme", f"ad@{crashed}")
    assert store._read(f"{prefix}/{MANIFEST_FILE}") is None


def test_corrupted_object_is_detected(store, adapter, base_model, tmp_path):
    info = store.put("acme", "ad", adapter, base_model)
    key = f"tenants/acme/adapters/ad/versions/{info.version}/{WEIGHTS}"
    data = bytearray((adapter / WEIGHTS).read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the last tensor
    store._write_bytes(key, bytes(data))
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    with pytest.raises(ChecksumMismatchError, match="re-upload"):
        cache.fetch(store, store.resolve("acme", "ad"))
    assert not cache.contains(info) and list((cache.root / "tmp").iterdir()) == []


def test_corrupt_manifest_and_vanished_files_are_typed_errors(store, adapter, base_model, tmp_path):
    info = store.put("acme", "ad", adapter, base_model)
    prefix = f"tenants/acme/adapters/ad/versions/{info.version}"
    store._delete(f"{prefix}/{WEIGHTS}")  # deleted between resolve and fetch
    with pytest.raises((AdapterNotFoundError, StoreUnavailableError)):
        DiskCache(tmp_path / "cache", 1 << 30).fetch(store, info)
    store._write_bytes(f"{prefix}/{MANIFEST_FILE}", b"{not json")
    with pytest.raises(ChecksumMismatchError, match="corrupt"):
        store.resolve("acme", "ad")


def test_a_corrupt_manifest_blocks_neither_its_deletion_nor_other_uploads(store, tiny_adapter, base_model):
    """The corrupt-manifest error says to delete the version: that, the whole adapter's delete and
    an upload of another name (which counts the tenant's adapters) all read past it."""
    first = store.put("acme", "ad", tiny_adapter(rank=4, seed=1), base_model)
    second = store.put("acme", "ad", tiny_adapter(rank=4, seed=2), base_model)
    store._write_bytes(f"tenants/acme/adapters/ad/versions/{second.version}/{MANIFEST_FILE}", b"{not json")
    store.put("acme", "other", tiny_adapter(rank=4, seed=3), base_model)
    store.delete("acme", "ad", version=second.version)
    assert store.resolve("acme", "ad") == first
    store._write_bytes(f"tenants/acme/adapters/ad/versions/{first.version}/{MANIFEST_FILE}", b"{not json")
    store.delete("acme", "ad")
    assert [a.name for a in store.list_adapters("acme")] == ["other"]


def test_a_pinned_ref_reads_that_version_whatever_is_latest(store, tiny_adapter, base_model):
    first = store.put("acme", "ad", tiny_adapter(rank=4, seed=1), base_model)
    store.put("acme", "ad", tiny_adapter(rank=4, seed=2), base_model)
    assert first.ref == f"acme/ad@{first.version}"
    assert store.read_pinned(first.ref) == first
    store.delete("acme", "ad", first.version)
    with pytest.raises(AdapterNotFoundError):
        store.read_pinned(first.ref)


@pytest.mark.parametrize("ref", ["ad", "acme/ad", "ad@v1", "acme/../ad@v1"])
def test_only_owner_name_version_refs_are_pinned(store, ref):
    with pytest.raises(InvalidNameError):
        store.read_pinned(ref)


def _before_the_manifest(store, monkeypatch, action):
    """Run `action` once, just before the store writes a new version's manifest (another client
    acting while this upload is in flight)."""
    write, fired = store._write_bytes, []

    def hooked(key, data):
        if key.endswith(f"/{MANIFEST_FILE}") and not fired:
            fired.append(key)  # first: the action may upload, and so come here itself
            action()
        return write(key, data)
    monkeypatch.setattr(store, "_write_bytes", hooked)
    return fired


def test_a_delete_during_an_upload_leaves_the_upload_whole(store, tiny_adapter, base_model, tmp_path,
                                                           monkeypatch):
    """The delete removes the versions it listed; the upload in flight commits after it, whole (a
    manifest that named files the delete had taken served a 404 for good)."""
    store.put("acme", "ad", tiny_adapter(rank=4, seed=1), base_model)
    _before_the_manifest(store, monkeypatch, lambda: store.delete("acme", "ad"))
    info = store.put("acme", "ad", tiny_adapter(rank=4, seed=2), base_model)
    assert [v.version for v in store.list_versions("acme", "ad")] == [info.version]
    path = DiskCache(tmp_path / "cache", 1 << 30).fetch(store, store.resolve("acme", "ad"))
    assert same_files(path, tiny_adapter(rank=4, seed=2))


def test_an_upload_never_prunes_the_version_it_stored(store, tiny_adapter, base_model, monkeypatch):
    from adapter_store.validate import StoreLimits
    limits = StoreLimits(max_versions_per_adapter=1)
    upload, fired = store._upload_file, []

    def another_upload_meanwhile(key, path, progress):
        upload(key, path, progress)
        if key.endswith(WEIGHTS) and not fired:  # this upload's files are up, its manifest not yet
            fired.append(key)
            store.put("acme", "ad", tiny_adapter(rank=4, seed=1), base_model, limits=limits)
    monkeypatch.setattr(store, "_upload_file", another_upload_meanwhile)
    mine = store.put("acme", "ad", tiny_adapter(rank=4, seed=2), base_model, limits=limits)
    assert store.resolve("acme", f"ad@{mine.version}") == mine  # the other upload, named later, did not prune it


def test_files_gone_before_the_manifest_fail_the_upload_and_leave_no_version(store, adapter, base_model,
                                                                             monkeypatch):
    """A `gc` younger than the upload took its files: the upload fails, typed, rather than commit a
    manifest of missing files."""
    def gc_too_eager():
        [prefix] = {key.rsplit("/", 1)[0] for key, _ in store._list_objects("tenants/acme/adapters/ad")
                    if key.endswith(WEIGHTS)}
        store._delete(f"{prefix}/{WEIGHTS}")
    _before_the_manifest(store, monkeypatch, gc_too_eager)
    with pytest.raises(StoreUnavailableError, match="vanished") as refused:
        store.put("acme", "ad", adapter, base_model)
    assert refused.value.code == "upload_interrupted" and store.list_versions("acme", "ad") == []


def test_list_adapters_gives_each_newest_version_and_the_shared_ones(store, adapter, base_model):
    stored = {name: store.put("acme", name, adapter, base_model) for name in ("b", "a", "c")}
    stored["b"] = store.put("acme", "b", adapter, base_model)  # a newer version of b
    store.put("beta", "theirs", adapter, base_model)
    store.put("beta", "private", adapter, base_model)
    store.share("beta", "theirs")
    store.share("acme", "c")
    listed = store.list_adapters("acme")
    assert [(i.tenant, i.name, i.version) for i in listed] == [
        *(("acme", n, stored[n].version) for n in ("a", "b", "c")), ("beta", "theirs", listed[-1].version)]
    assert [i.shared for i in listed] == [False, False, True, True]
    assert listed[:3] == [store.resolve("acme", n) for n in ("a", "b", "c")]


def test_list_adapters_falls_back_when_the_newest_manifest_goes_between_listing_and_read(store, adapter, base_model):
    first = store.put("acme", "ad", adapter, base_model)
    second = store.put("acme", "ad", adapter, base_model)
    read_many = store._read_many

    def delete_first(keys):  # a delete of the newest version lands after the listing
        store.delete("acme", "ad", second.version)
        return read_many(keys)
    store._read_many = delete_first
    assert store.list_adapters("acme") == [first]


def test_local_store_write_failure_is_a_typed_store_error_and_leaves_no_version(tmp_path, adapter, base_model):
    from adapter_store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    (tmp_path / "store" / "tenants").mkdir()
    (tmp_path / "store" / "tenants" / "blocked").write_text("a file where the tenant's directory goes")
    with pytest.raises(StoreUnavailableError, match="tenants/blocked") as caught:
        store.put("blocked", "ad", adapter, base_model)
    assert caught.value.code == "io_error"
    assert store.list_adapters("blocked") == []
    store.put("acme", "ad", adapter, base_model)  # other tenants are unaffected
