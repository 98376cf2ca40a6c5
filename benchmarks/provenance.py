"""Where a benchmark number came from: commit, command line, versions, card, host, date.

Every benchmark embeds `provenance(sys.argv)` under "provenance" in its JSON, so a result
file can be traced back to the code and the machine that produced it.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git binary, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict:
    """{"commit": sha or None, "dirty": bool or None}: None where git cannot tell.

    MOEPLEX_COMMIT, when set, names the commit instead: the lent GPU machine receives a copy
    of the working tree whose .git is not the submitter's, so its own answer is stale there
    (benchmarks/gpu.sh's callers set it)."""
    if os.environ.get("MOEPLEX_COMMIT"):
        return {"commit": os.environ["MOEPLEX_COMMIT"], "dirty": None}
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cuda_info() -> dict:
    """Card name, CUDA runtime and driver versions; empty when there is no CUDA device."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    info = {"card": torch.cuda.get_device_name(0), "cuda_runtime": torch.version.cuda,
            "device_count": torch.cuda.device_count()}
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = None
    return info


def switches() -> dict:
    """The MOEPLEX_* environment variables a run saw (MOEPLEX_COMMIT aside, which names the commit):
    kernel paths such as MOEPLEX_ROWS_INTO or MOEPLEX_PDL are read from the environment at import, so
    the same commit measures different code with and without them."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOEPLEX_") and k != "MOEPLEX_COMMIT"}


def provenance(argv: list[str]) -> dict:
    """The provenance record of a benchmark run started with command line `argv`."""
    return {
        **git_state(),
        "argv": list(argv),
        "env": switches(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "ray": _version("ray"),
        **cuda_info(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(results: dict, out: str | None, stem: str) -> Path:
    """Write `results` as JSON to `out`, or by default to benchmarks/results/{stem}_{time}.json;
    print and return the path."""
    path = Path(out or f"benchmarks/results/{stem}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return path
