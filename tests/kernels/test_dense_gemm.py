"""The fused dense launch (base GEMM + every token's LoRA delta of a q/k/v-like group, one grid) on
CPU: dense_gemm_cases.py runs under TRITON_INTERPRET=1 in a subprocess."""
import pytest

from tests.kernels.dense_gemm_cases import case_names
from tests.kernels.interp import run_interpreter_cases


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.dense_gemm_cases")


@pytest.mark.parametrize("name", case_names())
def test_fused_dense_launch_matches_fp64_loop_and_leaves_tokens_without_adapter_bitwise(results, name):
    res = results[name]
    assert res["finite"], f"{name}: non-finite output (a rank's padding or an unwritten partial sum read)"
    assert res["err"] <= res["tol"], res
    assert res["base_err"] <= res["tol"], res
    assert res["delta_err"] <= 4 * res["tol"], res
    assert res["bitwise"], f"{name}: tokens without adapter differ from the launch without LoRA"
    assert res["repeatable"], f"{name}: two launches on the same input differ"
    assert res["counters_zero"], f"{name}: the launch left its counters non-zero"


def test_linear_lora_takes_the_fused_launch_only_when_on_and_the_launcher_refuses_what_it_cannot_tile(results):
    res = results["dispatch"]
    assert res["off_launches"] == [] and res["layout_when_off"], res
    # on: the LoRA call and the call without LoRA; the group of odd section ends went to cuBLAS
    assert res["on_launches"] == [True, False] and res["layout_when_on"], res
    assert res["fused_is_direct"] and res["some_without"] and res["bitwise_on"], res
    assert res["fused_err"] <= 1e-5 and res["split_err"] <= 1e-5, res
    assert res["raised"] == ["KernelInputError", "KernelInputError"], res
