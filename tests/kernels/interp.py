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


def print_cases(names: list[str], run) -> None:
    """The `main` of a cases module: refuses to run without the interpreter, then prints one JSON
    line per case name, {"name": ..., **run(name)}."""
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("MOEPLEX_TRITON") != "1":
        sys.exit("set TRITON_INTERPRET=1 and MOEPLEX_TRITON=1 to run the Triton interpreter cases")
    for name in names:
        print(json.dumps({"name": name, **run(name)}), flush=True)


def errors_raised(calls, error: type[Exception]) -> list[str]:
    """For each call: the name of `error` if it raised that, else "nothing"."""
    raised = []
    for call in calls:
        try:
            call()
            raised.append("nothing")
        except error:
            raised.append(error.__name__)
    return raised
