"""Runs a module's Triton interpreter cases in a subprocess (TRITON_INTERPRET must be set
before triton loads) and collects the JSON line each case prints, by case name."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# the interpreter is one core's work a process: as many as this process may run on (at most 4)
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SHARDS = max(1, min(4, _CPUS))


def run_processes(commands: list[tuple[list[str], dict]], timeout: int, cwd=None) -> list[str]:
    """Runs the (argv, env) commands at once, each writing to files of its own (a pipe left unread
    while another process is waited on could fill and stall it); returns their stdouts once all
    have exited with 0. One deadline for all; on a failure or the deadline, the others are killed."""
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for i, (argv, env) in enumerate(commands):
                with open(f"{tmp}/{i}.out", "w") as out, open(f"{tmp}/{i}.err", "w") as err:
                    procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err))
            for i, proc in enumerate(procs):
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                assert proc.returncode == 0, Path(f"{tmp}/{i}.err").read_text()[-4000:]
            return [Path(f"{tmp}/{i}.out").read_text() for i in range(len(procs))]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def run_interpreter_cases(module: str, timeout: int = 600, shards: int = SHARDS) -> dict[str, dict]:
    """Every case of `module`, its case list dealt round-robin to `shards` processes at once (the test
    process only waits meanwhile: on CI's two cores, two shards take about half the time of one)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOEPLEX_TRITON": "1", "OMP_NUM_THREADS": "1"}
    outs = run_processes([([sys.executable, "-m", module], {**env, "MOEPLEX_CASE_SHARD": f"{shard}/{shards}"})
                          for shard in range(shards)], timeout, cwd=REPO)
    rows = [json.loads(line) for out in outs for line in out.splitlines() if line.startswith("{")]
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
