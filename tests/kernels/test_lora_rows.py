"""lora_rows_ (kernels/moe/lora_rows.py): the Triton kernel in the interpreter (subprocess) and its torch
twin in process, both against the fp64 per-row loop of rows_cases.py; on the GPU, bf16 at qwen3's
sizes over tile configs, against the split path, and in a CUDA graph."""
import pytest
import torch

from kernels import KernelInputError
from kernels.moe.lora_rows import lora_rows_, lora_rows_ref_
from tests.kernels.interp import run_interpreter_cases
from tests.kernels.rows_cases import build, case_names, check


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.rows_cases")


@pytest.mark.parametrize("name", case_names())
def test_triton_rows_match_fp64(interp_results, name):
    res = interp_results[name]
    assert res["finite"], f"{name}: non-finite output (a padded rank was read)"
    assert res["touched"] > 0 and res["err"] <= res["tol"], res
    assert res["bitwise"], f"{name}: rows without an adapter (rank 0, or ids out of range) changed"
    assert res["in_place"]


@pytest.mark.parametrize("name", [n for n in case_names() if "-into" in n])
def test_triton_rows_into_rank_slices_write_only_live_slices_and_leave_c_alone(interp_results, name):
    res = interp_results[name]
    assert res["c_untouched"], f"{name}: with into, c was written"
    assert res["slices_finite"] and res["rest_unwritten"], f"{name}: a slice past a row's rank was written"
    if "r64" in name:
        assert res["slices"] == 4, res  # the pool's rank-64 rows hold four slices of 16, all written


@pytest.mark.parametrize("name", [n for n in case_names() if "-act" in n])
def test_activation_adds_the_gate_up_slices_as_the_in_place_delta_would(interp_results, name):
    res = interp_results[name]
    assert res["act_err"] <= res["tol"], res
    assert res["act_bitwise"], f"{name}: a row without slices changed against silu_mul_shrink without them"
    assert res["gate_up_untouched"]


@pytest.mark.parametrize("name", case_names())
def test_rows_ref_matches_fp64(name):
    case = build(name)
    before = case["c"].clone()
    kw = {key: case["kw"][key] for key in ("a_row_div", "splits", "scale")}
    got = lora_rows_ref_(case["a"], case["c"], case["la"], case["lb"], case["ranks"], case["slots"], case["ids"], **kw)
    res = check(case, got, before, name.split("-")[0])
    assert res["finite"] and res["bitwise"], res
    assert res["err"] <= res["tol"], res


def test_lora_rows_rejects_bad_arguments():
    case = build("fp32-gateup-uniform")
    args = [case[key] for key in ("a", "c", "la", "lb", "ranks", "slots", "ids")]
    with pytest.raises(KernelInputError, match="splits"):
        lora_rows_(*args, a_row_div=2, splits=3)
    with pytest.raises(KernelInputError, match="c must be"):
        lora_rows_(args[0], args[1][:, :40], *args[2:], a_row_div=2, splits=2)
    with pytest.raises(KernelInputError, match="a must be"):
        lora_rows_(args[0][:, :20], *args[1:], a_row_div=2, splits=2)
    with pytest.raises(KernelInputError, match="slot_ids"):
        lora_rows_(*args[:5], args[5][:3], args[6], a_row_div=2, splits=2)
    with pytest.raises(KernelInputError, match="scale"):
        lora_rows_(*args, a_row_div=2, splits=2, scale=torch.ones(3))
    from kernels.moe.lora_rows import RowPartials, row_partials
    rows, cols, big_r = args[1].shape[0], args[1].shape[1], args[2].shape[2] // 2
    good = row_partials(rows, cols, big_r, torch.device("cpu"))
    for into in (row_partials(rows, cols, 2 * big_r, torch.device("cpu")), row_partials(rows - 1, cols, big_r, torch.device("cpu")),
                 RowPartials(good.buffer.half(), good.slice_r, big_r), RowPartials(good.buffer, 32, big_r)):
        with pytest.raises(KernelInputError, match="into must be"):
            lora_rows_(*args, a_row_div=2, splits=2, into=into)


def _on_cpu(case: dict) -> dict:
    """The case's tensors on the CPU, for the fp64 loop."""
    cpu = lambda v: v.cpu() if torch.is_tensor(v) else v  # noqa: E731
    return {key: cpu(v) for key, v in case.items()} | {"kw": {key: cpu(v) for key, v in case["kw"].items()}}


GPU_CONFIGS = [{}, {"block_k": 256, "block_n": 64}, {"num_warps": 2}, {"parts": 4}, {"parts": 3, "block_n": 64}]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GPU_CONFIGS)
@pytest.mark.parametrize("proj", ["gateup", "down"])
def test_rows_bf16_at_qwen3_sizes(proj, cfg):
    case = build(f"bf16-{proj}-uniform-real", device="cuda")
    case["kw"].update(cfg)
    before = case["c"].clone()
    got = lora_rows_(case["a"], case["c"], case["la"], case["lb"], case["ranks"], case["slots"], case["ids"],
                     **case["kw"])
    res = check(_on_cpu(case), got.cpu(), before.cpu(), "bf16")
    assert res["finite"] and res["bitwise"], res
    assert res["err"] <= res["tol"], res


@pytest.mark.gpu
def test_rows_capture_in_cuda_graph():
    case = build("bf16-down-zipf-real", device="cuda")
    start = case["c"].clone()
    args = [case[key] for key in ("a", "c", "la", "lb", "ranks", "slots", "ids")]
    eager = lora_rows_(*args[:1], start.clone(), *args[2:], **case["kw"])
    graph = torch.cuda.CUDAGraph()
    lora_rows_(*args, **case["kw"])  # compile outside the capture
    case["c"].copy_(start)
    with torch.cuda.graph(graph):
        lora_rows_(*args, **case["kw"])
    case["c"].copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(case["c"], eager)
