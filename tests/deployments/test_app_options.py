"""The app's options from the first command: typos named in one line, --help, --check, the
default store, `python -m deployments.auth --help` and what `make serve` installs and passes."""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_store.defaults import default_store_uri
from deployments.__main__ import main as options_main
from deployments.args import AppArgs, UnknownOptionError
from deployments.auth import hash_key
from deployments.auth import main as auth_main

REPO = Path(__file__).resolve().parents[2]
TYPO_LINE = ("unknown option 'max_lora'; did you mean 'max_loras'? "
             "(python -m deployments --help lists them)")


def _python(*argv, **env):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, **env})


def test_unknown_option_is_one_line_naming_the_nearest_option():
    with pytest.raises(UnknownOptionError) as caught:
        AppArgs.model_validate({"max_lora": "8"})
    assert str(caught.value) == TYPO_LINE


def test_every_unknown_option_is_named_with_its_own_hint():
    with pytest.raises(UnknownOptionError) as caught:
        AppArgs(devise="cpu", max_loras=2, zzz_unrelated=1)
    assert str(caught.value) == ("unknown options 'devise' (did you mean 'device'?), "
                                 "'zzz_unrelated' (python -m deployments --help lists them)")


def test_build_app_refuses_a_typo_before_ray_starts():
    import ray

    from deployments.app import build_app

    with pytest.raises(UnknownOptionError, match="did you mean 'max_loras'"):
        build_app({"max_lora": "8"})
    assert not ray.is_initialized()


def test_every_option_has_a_description():
    assert [name for name, field in AppArgs.model_fields.items() if not field.description] == []


def test_help_lists_every_option_with_type_default_and_description(capsys):
    with pytest.raises(SystemExit) as done:
        options_main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for name in AppArgs.model_fields:
        assert f"\n  {name}: " in out, name
    assert "\n  max_loras: int | None = unset  (>= 1)\n      adapters resident on the GPU at once;" in out
    assert "\n  device: Literal['auto', 'cpu', 'cuda'] = 'auto'\n" in out
    assert "\n  allow_lora_path_uploads: bool = False\n      vLLM's /v1/load_lora_adapter" in out


def test_check_refuses_a_typo_with_one_line_without_importing_ray():
    code = ("import sys; from deployments.__main__ import main; rc = main(['--check', 'max_lora=8']); "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'heavy import'; sys.exit(rc)")
    done = _python("-c", code)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {TYPO_LINE}\n"


def test_check_accepts_the_strings_serve_run_passes(capsys):
    assert options_main(["--check", "max_loras=8", "engine_warmup=false", "lora_rank_unit=8",
                         'autoscaling_config={"min_replicas": 1, "max_replicas": 2}']) == 0
    assert capsys.readouterr().out == "options ok\n"
    assert AppArgs(lora_rank_unit="8").engine_config(Path("/ckpt")).lora_rank_unit == 8
    assert options_main(["--check", "lora_rank_unit=4"]) == 2
    assert capsys.readouterr().err == "error: lora_rank_unit: Input should be 8 or 16\n"


def test_check_refuses_a_dtype_the_engine_has_no_name_for_and_takes_resources_as_json(capsys):
    """Both failed only at deploy: a dtype in the engine replica's start-up, after Serve's retries;
    replica_resources as the string serve run passes."""
    assert options_main(["--check", "dtype=float17"]) == 2
    assert capsys.readouterr().err.startswith("error: dtype: Input should be 'bfloat16', 'bf16'")
    assert options_main(["--check", "dtype=bf16", 'replica_resources={"accelerator_h200": 1}']) == 0
    assert AppArgs(replica_resources='{"accelerator_h200": 1}').replica_options(0)[
        "ray_actor_options"]["resources"] == {"accelerator_h200": 1.0}


def test_check_refuses_rank_unit_8_with_max_rank_slots(capsys):
    assert options_main(["--check", "lora_rank_unit=8", "lora_layout=slots"]) == 2
    assert "lora_rank_unit=8 needs lora_layout=bytes" in capsys.readouterr().err
    assert options_main(["--check", "lora_layout=slots"]) == 0  # the default unit follows the layout


def test_check_names_each_bad_value_by_option(capsys):
    assert options_main(["--check", "max_loras=0", "num_replicas=two", "seed"]) == 2
    assert capsys.readouterr().err == "error: 'seed' is not key=value\n"
    assert options_main(["--check", "max_loras=0", "num_replicas=two"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: max_loras: Input should be greater than or equal to 1")
    assert err[1].startswith("num_replicas: Input should be a valid integer")


@pytest.mark.parametrize("config, line", [
    ('{"min_replicas": 1, "max_replica": 2}', "autoscaling_config: unknown key 'max_replica' (did you mean "
                                              "'max_replicas'?); the keys: min_replicas, "),
    ('{"max_replicas": "two"}', "autoscaling_config: max_replicas: Input should be a valid integer"),
    ('{"min_replicas": 3, "max_replicas": 2}', "autoscaling_config: max_replicas (2) must be greater than or equal "
                                               "to min_replicas (3)"),
], ids=["typo", "type", "min_over_max"])
def test_check_refuses_what_serve_would_drop_or_refuse_only_at_deploy_in_autoscaling_config(capsys, config, line):
    """Serve ignores an unknown autoscaling key (max_replicas stays 1) and checks values only as
    the app deploys, in a traceback: here each is one line before anything starts."""
    assert options_main(["--check", f"autoscaling_config={config}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {line}") and len(err.splitlines()) == 1


@pytest.mark.parametrize("option, words", [
    ("store=s3:/bucket", "neither s3://bucket[/prefix] nor a directory"),
    ("store=S3://bucket", "write s3:// (lowercase)"),
    ("store_endpoint_url=localhost:9000", "needs its scheme: http://localhost:9000"),
    ("api_keys=/nonexistent/keys.yaml", "api_keys: cannot read API key file /nonexistent/keys.yaml"),
], ids=["s3_one_slash", "s3_upper_case", "endpoint_without_scheme", "missing_key_file"])
def test_check_refuses_store_uris_and_key_files_that_would_fail_the_deploy(capsys, option, words):
    assert options_main(["--check", option]) == 2
    assert words in capsys.readouterr().err


def test_check_refuses_a_malformed_key_file(capsys, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("tenants:\n  acme:\n    key_sha: [abc]\n")
    assert options_main(["--check", f"api_keys={keys}"]) == 2
    assert f"api_keys: API key file {keys} is malformed" in capsys.readouterr().err


def test_check_notes_replicas_that_need_more_cpus_than_this_machine_has(capsys, monkeypatch):
    monkeypatch.setattr("deployments.placement.machine_cpus", lambda: 2)
    assert options_main(["--check", "num_replicas=2"]) == 0
    out = capsys.readouterr()
    assert out.out == "options ok\n"
    assert "note: the replicas reserve 4 CPUs as they start and this machine has 2" in out.err
    assert options_main(["--check", "num_replicas=2", "ingress_replicas=2", "replica_num_cpus=0.5"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_build_app_warns_where_the_replicas_need_more_cpus_than_this_machine_has(monkeypatch, caplog):
    import ray

    from deployments.app import build_app

    monkeypatch.setattr("deployments.placement.machine_cpus", lambda: 2)
    monkeypatch.setattr("deployments.app.joins_cluster", lambda: False)
    monkeypatch.setattr("deployments.app.cluster_gpus", lambda: 0.0)
    environ = dict(os.environ)  # build_app puts Ray's defaults into it for the Ray serve run starts
    try:
        with caplog.at_level("WARNING", logger="deployments.app"):
            build_app({"num_replicas": "2", "device": "cpu"})
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert not ray.is_initialized()
    assert "the replicas reserve 4 CPUs as they start and this machine has 2" in caplog.text


def test_an_autoscaling_policy_is_not_imported_by_the_check(capsys):
    """The policy module may exist only in a replica's runtime_env: the check leaves it to Serve."""
    policy = '{"min_replicas": 1, "max_replicas": 2, "policy": {"policy_function": "not_here_module:fn"}}'
    assert options_main(["--check", f"autoscaling_config={policy}"]) == 0


@pytest.mark.parametrize("scaling, cpus", [
    ({"min_replicas": 0, "max_replicas": 2}, 0.0), ({"min_replicas": 1, "initial_replicas": 2, "max_replicas": 3}, 2.0),
], ids=["scale_from_zero", "initial_replicas"])
def test_the_cpus_at_start_follow_the_replicas_serve_starts(scaling, cpus):
    args = AppArgs(autoscaling_config=scaling, ingress_replicas=1, ingress_num_cpus=0.0)
    assert args.cpus_at_start() == cpus


def test_path_uploads_of_lora_adapters_are_off_unless_an_operator_allows_them():
    assert AppArgs().allow_lora_path_uploads is False
    assert AppArgs.model_validate({"allow_lora_path_uploads": "true"}).allow_lora_path_uploads


def test_store_defaults_to_env_then_cache_dir_like_the_cli(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEPLEX_STORE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert AppArgs().store_uri() == default_store_uri() == str(tmp_path / ".cache/moeplex/adapter-store")
    assert AppArgs(cache_dir=str(tmp_path / "c")).store_uri() == str(tmp_path / "c/adapter-store")
    monkeypatch.setenv("MOEPLEX_STORE", "s3://adapters/prod")
    assert AppArgs().store_uri() == default_store_uri() == "s3://adapters/prod"
    assert AppArgs(store="/explicit").store_uri() == "/explicit"


def test_store_from_env_travels_with_the_args_to_replicas(monkeypatch):
    monkeypatch.setenv("MOEPLEX_STORE", "s3://adapters/prod")
    args = pickle.dumps(AppArgs())
    monkeypatch.delenv("MOEPLEX_STORE")
    assert pickle.loads(args).store_uri() == "s3://adapters/prod"


def test_auth_help_is_usage_not_a_hash(capsys):
    with pytest.raises(SystemExit) as done:
        auth_main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: python -m deployments.auth")
    assert hash_key("--help") not in out
    assert auth_main(["secret"]) == 0 and capsys.readouterr().out == hash_key("secret") + "\n"


def _make_dry_run(venv: Path, *argv: str) -> list[str]:
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), f"VENV={venv}", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_serve_installs_serving_only_and_passes_args(tmp_path):
    lines = _make_dry_run(tmp_path / "venv", "serve", "ARGS=max_loras=8 device=cpu")
    installs = [line for line in lines if " pip install " in line]
    assert installs[-1].endswith("pip install -e .") and not any("[test" in line for line in installs)
    # Every install but pip's own upgrade shows pip's progress, after a line saying its size.
    assert [line for line in installs if " -q " in line] == [installs[0]]
    assert sum("MB" in line or "GB" in line for line in lines if line.startswith("echo")) >= 2
    assert lines[-2].endswith("-m deployments --check max_loras=8 device=cpu")
    assert lines[-1].endswith("serve run deployments.app:build_app max_loras=8 device=cpu")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_adds_the_extras_once_and_serve_installs_once(tmp_path):
    venv = tmp_path / "venv"
    assert any(line.endswith("pip install -e '.[test,bench]'") for line in _make_dry_run(venv, "test"))
    venv.mkdir()
    (venv / ".installed-serve").touch()
    assert not any("pip install" in line for line in _make_dry_run(venv, "serve"))
    installs = [line for line in _make_dry_run(venv, "test") if "pip install" in line]
    assert installs == [f"{venv}/bin/python -m pip install -e '.[test,bench]'"]
    (venv / ".installed-test").touch()
    assert not any("pip install" in line for line in _make_dry_run(venv, "test"))


def test_the_store_and_its_cli_accept_by_default_no_rank_the_service_cannot_serve():
    from adapter_store.cli import build_parser
    from adapter_store.validate import StoreLimits

    upload = build_parser().parse_args(["upload", "/tmp/x", "--tenant", "t", "--name", "n"])
    assert StoreLimits().max_rank == upload.max_rank == AppArgs().max_lora_rank


def test_options_the_engine_also_has_share_its_defaults():
    """One default per setting (engine.defaults): an option left unset behaves as the engine's own
    default. device (auto here, a GPU when Ray has one), max_num_batched_tokens (None: the
    engine's) and max_cpu_lora_bytes (None: the engine's, or a quarter of a smaller host's memory)
    differ on purpose."""
    import dataclasses

    from engine import EngineConfig

    engine_defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    on_purpose = {"device", "max_num_batched_tokens", "max_cpu_lora_bytes"}
    shared = sorted(set(engine_defaults) & set(AppArgs.model_fields) - on_purpose)
    assert len(shared) >= 12
    assert {n: AppArgs.model_fields[n].default for n in shared} == {n: engine_defaults[n] for n in shared}
    assert AppArgs.model_fields["max_num_batched_tokens"].default is None
    assert AppArgs.model_fields["max_cpu_lora_bytes"].default is None
