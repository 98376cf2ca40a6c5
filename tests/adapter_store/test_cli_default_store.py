"""`moeplex-adapters` without --store uses the service's store, and never creates one by reading."""
import pytest

from adapter_store.cli import main
from adapter_store.local import LocalStore


@pytest.fixture
def home(monkeypatch, tmp_path):
    """A fresh home directory and no $MOEPLEX_STORE: the default store is under it."""
    monkeypatch.delenv("MOEPLEX_STORE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_cli_without_store_uses_the_services_default_store(home, adapter, base_model, capsys):
    assert main(["upload", str(adapter), "--tenant", "acme", "--name", "ad",
                 "--base-model", str(base_model)]) == 0
    assert LocalStore(home / ".cache/moeplex/adapter-store").resolve("acme", "ad").name == "ad"
    capsys.readouterr()
    assert main(["list", "--tenant", "acme"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "ad"


def test_cli_store_env_wins_over_the_default(home, monkeypatch, tmp_path, adapter, base_model):
    monkeypatch.setenv("MOEPLEX_STORE", f"file://{tmp_path}/from-env")
    assert main(["upload", str(adapter), "--tenant", "acme", "--name", "ad",
                 "--base-model", str(base_model)]) == 0
    assert LocalStore(tmp_path / "from-env").resolve("acme", "ad").name == "ad"
    assert not (home / ".cache").exists()


@pytest.mark.parametrize("argv", [["list"], ["show", "ad"], ["delete", "ad"], ["share", "ad"]])
def test_reading_a_missing_store_dir_fails_without_creating_it(home, monkeypatch, tmp_path, capsys, argv):
    monkeypatch.chdir(tmp_path)
    code = main([*argv, "--tenant", "acme", "--store", "adapters/prod"])
    err = capsys.readouterr().err
    assert code == 5
    assert err == ("error: store directory 'adapters/prod' (--store) does not exist; for S3 write "
                   "s3://adapters/prod; check the path, or `upload` an adapter there to create it\n")
    assert not (tmp_path / "adapters").exists()


def test_a_missing_default_store_says_how_it_comes_to_exist(home, capsys):
    assert main(["gc", "--json"]) == 5
    captured = capsys.readouterr()
    assert "store_not_found" in captured.out and "does not exist yet" in captured.err
    assert not home.exists()


def test_upload_creates_a_missing_store_dir(home, monkeypatch, tmp_path, adapter, base_model):
    monkeypatch.chdir(tmp_path)
    assert main(["upload", str(adapter), "--tenant", "acme", "--name", "ad", "--base-model",
                 str(base_model), "--store", "adapters/prod"]) == 0
    assert LocalStore(tmp_path / "adapters/prod").resolve("acme", "ad").name == "ad"
