"""Triton kernels on CPU: interp_cases.py runs in a subprocess with TRITON_INTERPRET=1."""
import pytest

from tests.kernels.interp_cases import case_names
from tests.kernels.interp import run_interpreter_cases


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.interp_cases")


@pytest.mark.parametrize("name", case_names())
def test_triton_matches_fp64_loop(interp_results, name):
    res = interp_results[name]
    assert res["finite"], f"{name}: non-finite output (padded rank read, or unwritten rows)"
    assert res["err"] <= res["tol"], res
    assert res["base_err"] <= res["tol"], res
    assert res["delta_err"] <= 4 * res["tol"], res
    assert res["bitwise"], f"{name}: tokens without adapter differ from the base-only run"
    assert res.get("same_with_layout", True), f"{name}: a shared dense layout changed the result"
    assert res.get("same_ungrouped", True), f"{name}: the base GEMMs' tile order changed the result"
