"""A newcomer's first hour, scripted: the README's commands against `serve run` in a subprocess.

The README's tools as a user runs them (the tiny-model generator, the adapter CLI, `serve run`,
plain HTTP as curl sends it, the `openai` client), with the calls vLLM and Ray Serve LLM users
bring. `serve run` takes a Serve config file here only to bind a port the OS picked (the
README's `make serve` binds 8000); the store is shared with the CLI through MOEPLEX_STORE, as
the README says.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.deployments.fake_cluster import free_port, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(*argv: str, env: dict) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """(base url, environment, work dir) of a `serve run` started the README's way."""
    work = tmp_path_factory.mktemp("newcomer")
    env = {**os.environ, "MOEPLEX_STORE": str(work / "store"), "MOEPLEX_BASE_MODEL": str(work / "tiny"),
           "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    _run(sys.executable, "-m", "engine.tiny_model", str(work / "tiny"), "--adapter",
         str(work / "tiny-lora"), env=env)
    port = free_port()
    config = {"http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "moeplex", "route_prefix": "/",
                                "import_path": "deployments.app:build_app",
                                "args": {"device": "cpu", "cache_dir": str(work / "cache"),
                                         "ingress_replicas": 1, "allow_lora_path_uploads": True}}]}
    (work / "serve.yaml").write_text(json.dumps(config))  # YAML is a superset of JSON
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "serve"), "run", str(work / "serve.yaml")], env=env, cwd=os.getcwd(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, (work / "serve.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout_s=300, period_s=2, what="serve run to answer /ready")
        yield url, env, work
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: Serve and its Ray instance stop
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def _openai(url: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                         default_headers={"X-Tenant-Id": tenant})


def test_cli_upload_reaches_the_running_service(newcomer):
    url, env, work = newcomer
    _run(str(BIN / "moeplex-adapters"), "upload", str(work / "tiny-lora"), "--tenant", "acme",
         "--name", "support-bot", env=env)
    listed = json.loads(_run(str(BIN / "moeplex-adapters"), "list", "--tenant", "acme", "--json", env=env))
    assert [a["name"] for a in listed] == ["support-bot"]

    def served():  # the resolve cache may remember "not found" for adapter_resolve_ttl_s
        try:
            return _openai(url, "acme").completions.create(model="support-bot", prompt="Hello",
                                                           max_tokens=4)
        except openai.NotFoundError:
            return None
    done = wait_for(served, timeout_s=30, period_s=1, what="the CLI's adapter served")
    assert done.usage.completion_tokens >= 1


def test_curl_upload_then_openai_stream_then_the_cli_sees_it(newcomer):
    url, env, work = newcomer
    files = [("files", (f, (work / "tiny-lora" / f).read_bytes()))
             for f in ("adapter_config.json", "adapter_model.safetensors")]
    upload = httpx.post(f"{url}/v1/adapters", data={"name": "my-style"}, files=files,
                        headers={"X-Tenant-Id": "alice"}, timeout=60)
    assert upload.status_code == 201, upload.text
    chunks = _openai(url, "alice").completions.create(model="my-style", prompt="Hello",
                                                      max_tokens=8, stream=True)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 1
    listed = json.loads(_run(str(BIN / "moeplex-adapters"), "list", "--tenant", "alice", "--json", env=env))
    assert "my-style" in [a["name"] for a in listed]


def test_models_lists_the_base_and_ray_serve_llm_style_names_work(newcomer):
    url, _env, work = newcomer
    client = _openai(url, "bob")
    base = client.models.list().data[0].id
    files = [("files", (f, (work / "tiny-lora" / f).read_bytes()))
             for f in ("adapter_config.json", "adapter_model.safetensors")]
    assert httpx.post(f"{url}/v1/adapters", data={"name": "sql"}, files=files,
                      headers={"X-Tenant-Id": "bob"}, timeout=60).status_code == 201
    assert "sql" in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(model=f"{base}:sql", max_tokens=4,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert client.completions.create(model=base, prompt="Hello", max_tokens=4).usage.completion_tokens >= 1


def test_vllm_style_load_and_unload_of_an_adapter_by_path(newcomer):
    url, _env, work = newcomer
    headers = {"X-Tenant-Id": "carol"}
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", headers=headers, timeout=60,
                        json={"lora_name": "by-path", "lora_path": str(work / "tiny-lora")})
    assert loaded.status_code == 200, loaded.text
    client = _openai(url, "carol")
    assert client.completions.create(model="by-path", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", headers=headers, timeout=60,
                          json={"lora_name": "by-path"})
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="by-path", prompt="Hi", max_tokens=3)


def test_metrics_scrape_on_the_api_port(newcomer):
    url, _env, _work = newcomer
    _openai(url, "dave").completions.create(model=_openai(url, "dave").models.list().data[0].id,
                                            prompt="Hi", max_tokens=2)
    page = httpx.get(f"{url}/metrics", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert "vllm:num_requests_waiting" in page.text and "vllm:lora_requests_info{" in page.text
