"""Triton kernels on CPU: interp_cases.py runs in a subprocess with TRITON_INTERPRET=1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.interp_cases import case_names

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOEPLEX_TRITON": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.interp_cases"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["name"]: row for row in rows}


@pytest.mark.parametrize("name", case_names())
def test_triton_matches_fp64_loop(interp_results, name):
    res = interp_results[name]
    assert res["finite"], f"{name}: non-finite output (padded rank read, or unwritten rows)"
    assert res["err"] <= res["tol"], res
    assert res["base_err"] <= res["tol"], res
    assert res["delta_err"] <= 4 * res["tol"], res
    assert res["bitwise"], f"{name}: tokens without adapter differ from the base-only run"
    assert res.get("same_with_layout", True), f"{name}: a shared dense layout changed the result"
