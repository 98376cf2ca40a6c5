"""The environment `serve run` gives the Ray instance it starts (deployments.app.set_ray_env_defaults)."""
import os

import pytest

from deployments import app

HAPROXY_KEYS = {"RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"}


@pytest.fixture
def clean_env(monkeypatch):
    for key in [*app.RAY_ENV_DEFAULTS, *HAPROXY_KEYS, "RAY_SERVE_HAPROXY_BINARY_PATH"]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_haproxy_mode_is_the_default_where_its_binary_is_installed(clean_env):
    clean_env.setattr(app, "haproxy_installed", lambda: True)
    app.set_ray_env_defaults()
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "1"
    # haproxy's reloads (autoscaling) must not cut a stream after Ray's 120 s
    assert int(os.environ["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"]) >= 3600


def test_without_a_haproxy_binary_serve_keeps_its_python_proxy(clean_env):
    clean_env.setattr(app, "haproxy_installed", lambda: False)
    app.set_ray_env_defaults()
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    assert os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "1"


def test_an_operators_values_win(clean_env):
    clean_env.setattr(app, "haproxy_installed", lambda: True)
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    clean_env.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")
    app.set_ray_env_defaults()
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "0"
    assert "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S" not in os.environ
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    clean_env.setenv("RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S", "600")
    app.set_ray_env_defaults()
    assert os.environ["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"] == "600"


def test_haproxy_lookup_follows_serves_order(clean_env, tmp_path):
    binary = tmp_path / "haproxy"
    binary.write_text("#!/bin/sh\n")
    clean_env.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(binary))
    assert not app.haproxy_installed()  # not executable: Serve would refuse it too
    binary.chmod(0o755)
    assert app.haproxy_installed()
    clean_env.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path))  # a directory, searchable
    assert not app.haproxy_installed()
