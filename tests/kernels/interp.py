"""Runs a module's Triton interpreter cases in a subprocess (TRITON_INTERPRET must be set
before triton loads) and collects the JSON line each case prints, by case name."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_interpreter_cases(module: str, timeout: int = 600) -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOEPLEX_TRITON": "1"}
    proc = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["name"]: row for row in rows}
