"""Garbage of crashed uploads (`collect_garbage`, CLI `gc`), on LocalStore and S3Store.

A crash is an upload whose manifest write raises after its files are stored and whose
process dies before it can clean up. Its files are made "2 hours old" by the backend's
own clock: os.utime on LocalStore, moto's clock held back on S3 (the threaded server
runs in this process), so no test waits for time to pass.
"""
import contextlib
import datetime
import os
import threading
import time

import pytest

from adapter_store import DiskCache
from adapter_store.cli import main
from adapter_store.errors import AdapterNotFoundError
from adapter_store.garbage import find_orphans, version_prefix
from adapter_store.local import LocalStore
from adapter_store.store import MANIFEST_FILE
from tests.adapter_store.helpers import CONFIG, WEIGHTS, same_files, stored_keys

AGE_S = 2 * 3600


class Crash(BaseException):
    """The uploading process dies (no except clause of the store catches it)."""


@contextlib.contextmanager
def aged(store, monkeypatch, seconds=AGE_S):
    """Whatever the store writes inside is `seconds` old by its backend's clock."""
    if isinstance(store, LocalStore):
        started = time.time()
        yield
        for key, modified in store._list_objects("tenants"):
            if modified >= started - 1:
                os.utime(store.root / key, (modified - seconds, modified - seconds))
        return
    import moto.s3.models as moto_s3

    real = moto_s3.utcnow
    with monkeypatch.context() as mp:
        mp.setattr(moto_s3, "utcnow", lambda: real() - datetime.timedelta(seconds=seconds))
        yield


def crash_before_manifest(store, monkeypatch, name, adapter, base_model) -> str:
    """Upload until the manifest write, die there; return the orphan's version prefix."""
    written = []
    real_upload, real_write = store._upload_file, store._write_bytes

    def upload(key, path, progress):
        real_upload(key, path, progress)
        written.append(key)

    def write(key, data):
        if key.endswith(MANIFEST_FILE):
            raise Crash()
        real_write(key, data)

    with monkeypatch.context() as mp:
        mp.setattr(store, "_upload_file", upload)
        mp.setattr(store, "_write_bytes", write)
        mp.setattr(store, "_cleanup_quietly", lambda prefix: None)  # a dead process cleans nothing
        with pytest.raises(Crash):
            store.put("acme", name, adapter, base_model)
    assert [k.rsplit("/", 1)[1] for k in written] == [CONFIG, WEIGHTS]
    return written[0].rsplit("/", 1)[0]


def test_gc_removes_only_old_uncommitted_versions(store, adapter, tiny_adapter, base_model, monkeypatch, tmp_path):
    with aged(store, monkeypatch):
        committed = store.put("acme", "ad", adapter, base_model)
        orphan = crash_before_manifest(store, monkeypatch, "ad", adapter, base_model)
        lone = crash_before_manifest(store, monkeypatch, "lone", adapter, base_model)
    version = orphan.rsplit("/", 1)[1]
    assert store.list_versions("acme", "ad") == [committed]
    assert [i.name for i in store.list_adapters("acme")] == ["ad"]
    with pytest.raises(AdapterNotFoundError):
        store.resolve("acme", f"ad@{version}")
    assert len(stored_keys(store)) == 3  # the files are there, unseen

    # An upload in flight: its config is stored, it is paused before the weights.
    paused, resume, done = threading.Event(), threading.Event(), []
    real_upload = store._upload_file

    def slow_upload(key, path, progress):
        if key.endswith(WEIGHTS):
            paused.set()
            assert resume.wait(60)
        real_upload(key, path, progress)

    monkeypatch.setattr(store, "_upload_file", slow_upload)
    fresh_src = tiny_adapter(rank=4, seed=7)
    uploader = threading.Thread(target=lambda: done.append(store.put("acme", "fresh", fresh_src, base_model)))
    uploader.start()
    try:
        assert paused.wait(60)
        assert store.collect_garbage(older_than_s=3 * 3600) == []  # younger than the age: kept
        assert len(stored_keys(store)) == 4
        # Two hours later, a 3 hour age takes the crashed uploads (now 4 h old) only.
        later = time.time() + 2 * 3600
        assert store.collect_garbage(older_than_s=3 * 3600, now=later, dry_run=True) == sorted([orphan, lone])
        assert len(stored_keys(store)) == 4
        assert store.collect_garbage(older_than_s=3 * 3600, now=later) == sorted([orphan, lone])
    finally:
        resume.set()
        uploader.join()
    assert store._list_objects(orphan) == [] and store._list_objects(lone) == []
    [fresh] = done
    assert store.list_versions("acme", "ad") == [committed]
    assert sorted(stored_keys(store)) == sorted([f"acme/ad/{committed.version}", f"acme/fresh/{fresh.version}"])
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    assert same_files(cache.fetch(store, store.resolve("acme", "ad")), adapter)
    assert same_files(cache.fetch(store, store.resolve("acme", "fresh")), fresh_src)
    assert store.collect_garbage(older_than_s=0) == []  # committed versions are never garbage


def _gc_cli(capsys, store, *argv):
    extra = ["--store", store.uri]
    if getattr(store, "endpoint_url", None):
        extra += ["--endpoint-url", store.endpoint_url, "--region", "us-east-1"]
    code = main(["gc", *argv, *extra])
    return code, capsys.readouterr()


def test_gc_cli_dry_run_lists_without_deleting(store, adapter, base_model, monkeypatch, capsys):
    with aged(store, monkeypatch):
        orphan = crash_before_manifest(store, monkeypatch, "ad", adapter, base_model)
    code, (out, _) = _gc_cli(capsys, store, "--older-than", "3600", "--dry-run")
    assert code == 0 and out.splitlines() == [f"would delete {orphan}"]
    assert len(store._list_objects(orphan)) >= 2
    code, (out, _) = _gc_cli(capsys, store, "--older-than", str(3 * 3600), "--json")
    assert code == 0 and '"removed": []' in out and len(store._list_objects(orphan)) >= 2
    code, (out, _) = _gc_cli(capsys, store, "--older-than", "3600")
    assert code == 0 and out.splitlines() == [f"deleted {orphan}"]
    assert store._list_objects(orphan) == [] and stored_keys(store) == []
    code, (out, err) = _gc_cli(capsys, store, "--older-than", "-1")
    assert code == 1 and "negative" in err


def test_find_orphans_groups_by_version_and_ignores_other_keys():
    v = "tenants/t/adapters/n/versions"
    objects = [(f"{v}/a/{CONFIG}", 10.0), (f"{v}/a/{WEIGHTS}", 50.0),      # newest file decides
               (f"{v}/b/{CONFIG}", 10.0), (f"{v}/b/{MANIFEST_FILE}", 10.0),  # committed
               (f"{v}/c/{CONFIG}", 10.0), (f"{v}/c", 10.0),                 # old orphan, dir entry too
               (f"{v}/.tmp-1-d/{CONFIG}", 1.0), ("shared/t/n", 1.0), ("tenants/t/other", 1.0)]
    assert find_orphans(objects, cutoff=40.0) == [f"{v}/c"]
    assert find_orphans(objects, cutoff=60.0) == [f"{v}/a", f"{v}/c"]
    assert version_prefix(f"{v}/a/x/y") == f"{v}/a" and version_prefix("tenants/t/adapters/n") is None
