"""benchmarks/bench_floods.py: its multipart bodies parse as uploads, and one flood runs end to end."""
import asyncio
import json
import os
import subprocess
import sys

import pytest
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from benchmarks import bench_floods


def test_streamed_multipart_body_parses_into_the_name_and_both_files():
    body = bench_floods._multipart({"name": "big"}, [("adapter_config.json", b'{"r": 4}'),
                                                     ("adapter_model.safetensors", None)],
                                   "bnd", big_file_bytes=3 * bench_floods.MiB + 5)

    async def parse():
        async def stream():
            for chunk in body:
                yield chunk
        headers = Headers({"content-type": "multipart/form-data; boundary=bnd"})
        form = await MultiPartParser(headers, stream(), max_part_size=1 << 30).parse()
        files = {f.filename: len(await f.read()) for f in form.getlist("files")}
        return form["name"], files

    name, files = asyncio.run(parse())
    assert name == "big"
    assert files == {"adapter_config.json": 8, "adapter_model.safetensors": 3 * bench_floods.MiB + 5}


@pytest.mark.slow
def test_one_flood_measures_the_victim_and_front_memory_end_to_end(tmp_path):
    """In a process of its own: Ray keeps per-process state (its auth mode among it) that a
    later test starting another Ray instance must not inherit. Serve's Python proxy: HAProxy
    mode binds every interface and fixed stats ports."""
    out = tmp_path / "floods.json"
    argv = ["--floods", "big_header", "--baseline-probes", "3", "--min-probes", "2", "--settle-s", "0",
            "--out", str(out)]
    done = subprocess.run([sys.executable, bench_floods.__file__, *argv], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled",
                                                       "RAY_SERVE_ENABLE_HA_PROXY": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    flood = result["floods"]["big_header"]
    assert flood["flood"]["statuses"] == {"422": 1}  # the 95 MiB header is refused, not stored
    assert flood["victim"]["errors"] == 0 and flood["victim"]["n"] >= 2
    slowest = flood["victim"]["slowest"]  # the slowest requests, slowest first, with when they were sent
    assert 1 <= len(slowest) <= min(flood["victim"]["n"], bench_floods.SLOWEST_KEPT)
    assert slowest[0]["ms"] == flood["victim"]["max_ms"] and all(r["sent_s"] >= 0 for r in slowest)
    # ... and where their time went, by the service's Server-Timing header
    assert {"resolve", "route", "queue", "adapter", "prefill", "total", "front"} <= set(slowest[0]["phases"])
    assert slowest[0]["phases"]["front"] >= 0 and slowest[0]["phases"]["ttft"] <= slowest[0]["phases"]["total"]
    assert set(flood["victim"]["phases_p50_p99_max_ms"]) == set(slowest[0]["phases"])
    assert {"proxy", "ingress"} <= set(flood["memory"])
    assert flood["engine"]["gc_collections"] >= 0 and flood["engine"]["gc_longest_pause_ms_so_far"] > 0
    assert flood["engine"]["replica_loop_lags_over_100ms"] >= 0 and flood["engine"]["replica_loop_longest_lag_ms_so_far"] > 0
    # the victim's adapter is resident from the unloaded probes: nothing loads or is drained
    assert flood["engine"]["slot_loads"] == flood["engine"]["slot_preemptions"] == 0
    assert flood["engine"]["host_pin_seconds"] == flood["engine"]["host_unpinned_images"] == 0  # a CPU engine
    assert result["provenance"]["argv"][1:3] == ["--floods", "big_header"]


def test_py_spy_option_without_py_spy_exits_before_any_set_up(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_floods.shutil, "which", lambda name: None)
    monkeypatch.setattr(bench_floods.sys, "executable", str(tmp_path / "python"))  # no py-spy beside it
    monkeypatch.setattr(bench_floods, "setup_service", lambda *a, **k: pytest.fail("set-up ran"))
    with pytest.raises(SystemExit, match="--py-spy needs py-spy"):
        bench_floods.main(["--floods", "big_header", "--py-spy", str(tmp_path / "spy")])
