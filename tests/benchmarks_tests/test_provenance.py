"""benchmarks/provenance.py: the record every benchmark JSON embeds (CPU)."""
import datetime
import json
import platform
import subprocess
from pathlib import Path

from benchmarks import provenance as prov

REPO = Path(__file__).resolve().parents[2]


def test_provenance_names_commit_argv_versions_host_and_utc_date():
    record = prov.provenance(["bench.py", "--requests", "8"])
    json.dumps(record)  # it goes into the result file as is
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert record["commit"] == head.stdout.strip()
    assert isinstance(record["dirty"], bool)
    assert record["argv"] == ["bench.py", "--requests", "8"]
    assert record["python"] == platform.python_version()
    import torch
    assert record["torch"] == torch.__version__.split("+")[0] or record["torch"] == torch.__version__
    assert record["hostname"] == platform.node()
    date = datetime.datetime.fromisoformat(record["date_utc"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 3600


def test_provenance_records_the_kernel_switches_from_the_environment_but_not_the_commit(monkeypatch):
    monkeypatch.setenv("MOEPLEX_ROWS_INTO", "1")
    monkeypatch.setenv("MOEPLEX_COMMIT", "abc123")
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    record = prov.provenance([])
    assert record["env"]["MOEPLEX_ROWS_INTO"] == "1"
    assert "MOEPLEX_COMMIT" not in record["env"] and "UNRELATED_SETTING" not in record["env"]
    assert record["commit"] == "abc123"


def test_dirty_flag_follows_tracked_changes(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("one\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    monkeypatch.setattr(prov, "_REPO", tmp_path)
    assert prov.git_state()["dirty"] is False
    (tmp_path / "a.txt").write_text("two\n")
    assert prov.git_state()["dirty"] is True


def test_no_git_gives_none_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(prov, "_REPO", tmp_path)  # not a repository
    assert prov.git_state() == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all
    assert prov.provenance([])["commit"] is None


def test_no_cuda_means_no_card_fields():
    import torch
    if torch.cuda.is_available():
        assert prov.cuda_info()["card"] == torch.cuda.get_device_name(0)
    else:
        assert prov.cuda_info() == {}
