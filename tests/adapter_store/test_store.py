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
