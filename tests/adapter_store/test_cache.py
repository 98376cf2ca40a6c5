"""DiskCache: verified, content-addressed, LRU-bounded, one download per node."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapter_store import DiskCache
from adapter_store.errors import StoreUnavailableError
from tests.adapter_store.conftest import MotoServer, make_bucket, s3_store
from tests.adapter_store.helpers import CONFIG, WEIGHTS, same_files

REPO = Path(__file__).resolve().parents[2]


def _count_backend_calls(store, monkeypatch) -> list:
    calls = []
    for method in ("_read", "_download_file", "_list_children"):
        original = getattr(store, method)
        monkeypatch.setattr(store, method, lambda *a, _m=original, _n=method, **k: (calls.append(_n), _m(*a, **k))[1])
    return calls


def test_cached_fetch_costs_no_store_request(store, adapter, base_model, tmp_path, monkeypatch):
    info = store.put("acme", "ad", adapter, base_model)
    http = []
    if hasattr(store, "client"):  # S3: count the real HTTP requests too
        store.client.meta.events.register("before-send.s3", lambda **kw: http.append(1))
    calls = _count_backend_calls(store, monkeypatch)
    first = DiskCache(tmp_path / "cache", 1 << 30).fetch(store, info)
    assert calls and (http or not hasattr(store, "client"))
    calls.clear(), http.clear()
    again = DiskCache(tmp_path / "cache", 1 << 30)  # as another process on the node would
    assert again.fetch(store, info) == first and again.hits == 1 and again.downloads == 0
    assert calls == [] and http == []
    assert same_files(first, adapter)


def test_identical_content_shares_one_entry(store, adapter, base_model, tmp_path):
    a = store.put("acme", "one", adapter, base_model)
    b = store.put("beta", "two", adapter, base_model)
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    assert cache.fetch(store, a) == cache.fetch(store, b)
    assert (cache.downloads, cache.hits) == (1, 1)


def test_lru_eviction_keeps_recent_entries(tiny_adapter, base_model, tmp_path):
    from adapter_store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    infos = [store.put("acme", f"ad{i}", tiny_adapter(rank=4, seed=20 + i), base_model) for i in range(3)]
    cache = DiskCache(tmp_path / "cache", int(2.5 * infos[0].size_bytes))
    cache.fetch(store, infos[0])
    cache.fetch(store, infos[1])
    time.sleep(0.01)
    cache.fetch(store, infos[0])  # a hit: now more recent than ad1
    cache.fetch(store, infos[2])
    assert [cache.contains(i) for i in infos] == [True, False, True]
    assert cache.size_bytes() <= cache.max_bytes


def test_still_holds_an_entry_until_it_is_evicted_and_never_a_path_outside_it(tiny_adapter, base_model, tmp_path):
    from adapter_store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    infos = [store.put("acme", f"ad{i}", tiny_adapter(rank=4, seed=30 + i), base_model) for i in range(2)]
    cache = DiskCache(tmp_path / "cache", int(1.5 * infos[0].size_bytes))
    first = cache.fetch(store, infos[0])
    assert cache.still_holds(first)
    assert not cache.still_holds(tmp_path / "store")  # a directory, but not one of its entries
    time.sleep(0.01)
    cache.fetch(store, infos[1])  # room for one: the first is evicted
    assert not cache.still_holds(first)


def test_a_file_cut_short_in_the_cache_is_fetched_again_and_verified(store, adapter, base_model, tmp_path):
    """A hit checks sizes (a full disk or a crash cut the file): the entry is downloaded again, so a
    re-upload of the same content, which maps to the same entry, is not served the damaged copy."""
    info = store.put("acme", "ad", adapter, base_model)
    entry = DiskCache(tmp_path / "cache", 1 << 30).fetch(store, info)
    with open(entry / "adapter_model.safetensors", "r+b") as f:
        f.truncate(100)
    fresh = DiskCache(tmp_path / "cache", 1 << 30)  # another replica of the node
    assert fresh.fetch(store, info) == entry and fresh.downloads == 1
    assert same_files(entry, adapter)


def test_discard_drops_an_entry_so_the_next_fetch_downloads_it(store, adapter, base_model, tmp_path):
    info = store.put("acme", "ad", adapter, base_model)
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    entry = cache.fetch(store, info)
    cache.discard(entry)
    assert not cache.still_holds(entry)
    (tmp_path / "elsewhere").mkdir()
    cache.discard(tmp_path / "elsewhere")  # not an entry: left alone
    assert (tmp_path / "elsewhere").is_dir()
    assert cache.fetch(store, info) == entry and cache.downloads == 2 and same_files(entry, adapter)
    from adapter_store.cache import files_signature
    unreadable = files_signature(entry)
    cache.discard(entry)
    cache.fetch(store, info)  # another process of the node fetched it again meanwhile
    cache.discard(entry, files=unreadable)  # a late report about the files before: the new copy stays
    assert cache.still_holds(entry) and cache.downloads == 3


def test_two_processes_fetching_at_once_download_once(store, adapter, base_model, tmp_path):
    info = store.put("acme", "ad", adapter, base_model)
    chunk = 4 << 10
    args = {"uri": store.uri, "endpoint_url": getattr(store, "endpoint_url", None), "tenant": "acme",
            "ref": "ad", "cache_dir": str(tmp_path / "cache"), "chunk_bytes": chunk,
            "start_at": time.time() + 4.0}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.adapter_store.fetch_worker", json.dumps(args)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted((r["downloads"], r["hits"]) for r in reports) == [(0, 1), (1, 0)]
    assert reports[0]["path"] == reports[1]["path"]
    assert same_files(Path(reports[0]["path"]), adapter)
    if args["endpoint_url"]:  # exactly one download's worth of ranged GETs in total
        sizes = [info.manifest["files"][f]["size"] for f in (CONFIG, WEIGHTS)]
        assert sum(r["get_objects"] for r in reports) == sum(math.ceil(s / chunk) for s in sizes)


def test_server_stopped_mid_download_then_restarted(aws_env, adapter, base_model, tmp_path):
    server = MotoServer()
    server.start()
    try:
        store = s3_store(server, make_bucket(server), chunk_bytes=4 << 10, concurrency=2)
        info = store.put("acme", "ad", adapter, base_model)
        cache = DiskCache(tmp_path / "cache", 1 << 30)
        moved = []

        def stop_server_once(nbytes):
            moved.append(nbytes)
            if len(moved) == 1:
                server.stop()

        with pytest.raises(StoreUnavailableError, match="unreachable|retry") as caught:
            cache.fetch(store, info, progress=stop_server_once)
        assert caught.value.code == "unreachable"
        assert sum(moved) < info.size_bytes
        assert not cache.contains(info) and os.listdir(cache.root / "tmp") == []
        server.start()
        assert same_files(cache.fetch(store, info), adapter) and cache.downloads == 1
    finally:
        server.stop()


def test_download_survives_a_server_blip(aws_env, adapter, base_model, tmp_path):
    """Ranges that fail while the server is down are retried with backoff and succeed."""
    import threading

    server = MotoServer()
    server.start()
    try:
        store = s3_store(server, make_bucket(server), chunk_bytes=4 << 10, concurrency=2,
                         max_attempts=6, backoff_s=0.2)
        info = store.put("acme", "ad", adapter, base_model)
        restarted = threading.Event()

        def blip(nbytes):
            if not restarted.is_set():
                restarted.set()
                server.stop()
                threading.Timer(0.3, server.start).start()

        cache = DiskCache(tmp_path / "cache", 1 << 30)
        assert same_files(cache.fetch(store, info, progress=blip), adapter)
        assert restarted.is_set() and cache.downloads == 1
    finally:
        time.sleep(0.5)  # let the timer's restart happen before the final stop
        server.stop()
