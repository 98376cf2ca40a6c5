"""The `moeplex-adapters` CLI on both backends: JSON output, exit codes, env defaults."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_store.cli import main


def _run(capsys, store, *argv):
    extra = ["--store", store.uri]
    if getattr(store, "endpoint_url", None):
        extra += ["--endpoint-url", store.endpoint_url, "--region", "us-east-1"]
    code = main([*argv, *extra, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_cli_round_trip(store, adapter, base_model, capsys):
    code, up, _ = _run(capsys, store, "upload", str(adapter), "--tenant", "acme", "--name", "ad",
                       "--base-model", str(base_model))
    assert code == 0 and up["name"] == "ad" and up["manifest"]["rank"] == 4
    assert store.resolve("acme", "ad").version == up["version"]
    code, listed, _ = _run(capsys, store, "list", "--tenant", "acme")
    assert code == 0 and [(a["name"], a["version"]) for a in listed] == [("ad", up["version"])]
    code, shown, _ = _run(capsys, store, "show", "ad", "--tenant", "acme")
    assert code == 0 and shown["versions"] == [up["version"]] and shown["manifest"] == up["manifest"]

    assert _run(capsys, store, "show", "acme/ad", "--tenant", "beta")[0] == 4
    assert _run(capsys, store, "share", "ad", "--tenant", "acme")[0] == 0
    code, listed, _ = _run(capsys, store, "list", "--tenant", "beta")
    assert [(a["tenant"], a["name"], a["shared"]) for a in listed] == [("acme", "ad", True)]
    assert _run(capsys, store, "show", "acme/ad", "--tenant", "beta")[0] == 0

    assert _run(capsys, store, "delete", "ad", "--tenant", "acme", "--version", up["version"])[0] == 0
    code, body, err = _run(capsys, store, "show", "ad", "--tenant", "acme")
    assert code == 4 and body["error"]["code"] == "not_found" and "not found" in err


@pytest.mark.parametrize("argv_tail,code,error", [
    (["--name", "../x"], 3, "invalid_name"),
    (["--name", "ad", "--max-rank", "2"], 3, "rank_too_high"),
])
def test_cli_refusals(store, adapter, base_model, capsys, argv_tail, code, error):
    got, body, err = _run(capsys, store, "upload", str(adapter), "--tenant", "acme",
                          "--base-model", str(base_model), *argv_tail)
    assert (got, body["error"]["code"]) == (code, error) and err.startswith("error: ")
    assert store.list_adapters("acme") == []


def test_console_script_with_env(adapter, base_model, tmp_path):
    script = Path(sys.executable).with_name("moeplex-adapters")
    env = {**os.environ, "MOEPLEX_STORE": f"file://{tmp_path}/store", "MOEPLEX_BASE_MODEL": str(base_model)}
    done = subprocess.run([str(script), "upload", str(adapter), "--tenant", "acme", "--name", "ad"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("stored acme/ad@")
    done = subprocess.run([str(script), "list", "--tenant", "acme"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[1].split()[0] == "ad"
    # Without $MOEPLEX_STORE the service's default store is read: absent in a fresh home.
    fresh_home = {**{k: v for k, v in env.items() if k != "MOEPLEX_STORE"}, "HOME": str(tmp_path / "home")}
    done = subprocess.run([str(script), "list", "--tenant", "acme"], capture_output=True, text=True, timeout=120,
                          env=fresh_home)
    assert done.returncode == 5 and "default store" in done.stderr and "MOEPLEX_STORE" in done.stderr
