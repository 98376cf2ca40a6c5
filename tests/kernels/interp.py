"""Runs a module's Triton interpreter cases in a subprocess (TRITON_INTERPRET must be set
before triton loads) and collects the JSON line each case prints, by case name."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


SHARDS = max(1, min(4, os.cpu_count() or 1))  # the interpreter is one core's work a process


def run_interpreter_cases(module: str, timeout: int = 600, shards: int = SHARDS) -> dict[str, dict]:
    """Every case of `module`, its case list dealt round-robin to `shards` processes at once (the test
    process only waits meanwhile: on CI's two cores, two shards take about half the time of one)."""
    procs = []
    for shard in range(shards):
        env = {**os.environ, "TRITON_INTERPRET": "1", "MOEPLEX_TRITON": "1", "OMP_NUM_THREADS": "1",
               "MOEPLEX_CASE_SHARD": f"{shard}/{shards}"}
        procs.append(subprocess.Popen([sys.executable, "-m", module], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    rows = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-4000:]
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finally:
        for proc in procs:  # a failed or timed-out shard takes the others down with it
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return {row["name"]: row for row in rows}


def print_cases(names: list[str], run) -> None:
    """The `main` of a cases module: refuses to run without the interpreter, then prints one JSON
    line per case name, {"name": ..., **run(name)}; with MOEPLEX_CASE_SHARD=i/n, only every n-th
    case from the i-th (run_interpreter_cases' shards)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("MOEPLEX_TRITON") != "1":
        sys.exit("set TRITON_INTERPRET=1 and MOEPLEX_TRITON=1 to run the Triton interpreter cases")
    shard, shards = (int(v) for v in os.environ.get("MOEPLEX_CASE_SHARD", "0/1").split("/"))
    for name in names[shard::shards]:
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
