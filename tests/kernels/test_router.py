"""kernels/moe/router.py: the torch path (CPU), the Triton kernel (interpreter on CPU, real on GPU),
each against a per-row fp64 sort and against today's torch sequence.

The interpreter cases live in router_cases.py and run in a subprocess with TRITON_INTERPRET=1.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.errors import KernelInputError
from kernels.moe.router import route_topk, route_topk_ref
from tests.kernels.interp import run_interpreter_cases
from tests.kernels.router_cases import case_names, distinct_logits, grid_names, oracle, parse

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}  # max |w - want|; weights <= 1


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.router_cases", timeout=300)


@pytest.mark.parametrize("name", [n for n in case_names() if n.startswith("route-")])
def test_triton_interpreter_matches_twin_and_fp64(interp_results, name):
    res = interp_results[name]
    _, t, _, k, _, extra = parse(name)
    tol = TOL[torch.bfloat16 if "bf16out" in extra else torch.float32]
    assert res["ids_oracle"] and res["ids_twin"], res
    assert res["ids_dtype"] == "torch.int64" and res["shape"] == [t, k], res
    assert res["err_twin"] <= tol and res["err_oracle"] <= tol, res


def test_triton_interpreter_tie_rule(interp_results):
    res = interp_results["ties-fp32"]
    assert res["ids"] == res["want"], res


def test_triton_interpreter_covers_mixtral_router(interp_results):
    res = interp_results["mixtral-fp32"]
    assert res["ids_equal"] and res["err"] <= TOL[torch.float32], res


def test_triton_interpreter_rejects_bad_input(interp_results):
    assert interp_results["errors"]["raised"] == ["KernelInputError"] * 6, interp_results["errors"]


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_torch_path_matches_fp64_sort(dt):
    """route_topk on CPU (the torch twin) over the whole interpreter grid, in one test."""
    for name in grid_names():
        dtype, t, e, k, renorm, _ = parse(name)
        if dtype != {"fp32": torch.float32, "fp16": torch.float16}[dt]:
            continue
        logits = distinct_logits(t, e, dtype, torch.Generator().manual_seed(t * 1000 + e * 10 + k))
        weights, ids = route_topk(logits, k, renorm, torch.float32)
        want_w, want_ids = oracle(logits, k, renorm)
        assert torch.equal(ids, want_ids), name
        assert weights.dtype == torch.float32 and (weights.double() - want_w).abs().max() <= TOL[torch.float32], name


def test_torch_path_is_the_layer_sequence():
    """route_topk_ref is bit for bit SparseMoE.route's sequence after the router GEMM."""
    gen = torch.Generator().manual_seed(3)
    x, router = torch.randn(7, 32, generator=gen).bfloat16(), torch.randn(60, 32, generator=gen).bfloat16()
    for norm in (False, True):
        probs = torch.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, 4, dim=-1)
        if norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        mine_w, mine_ids = route_topk(F.linear(x, router), 4, norm, x.dtype)
        assert torch.equal(mine_ids, ids) and torch.equal(mine_w, weights.to(x.dtype))


def test_out_dtype_defaults_to_logits_dtype():
    weights, ids = route_topk(torch.randn(3, 8).half(), 2, True)
    assert weights.dtype == torch.float16 and ids.dtype == torch.int64


@pytest.mark.parametrize("bad", [
    lambda x: route_topk(x, 0, False), lambda x: route_topk(x, 9, False), lambda x: route_topk(x, 2.0, False),
    lambda x: route_topk(x[0], 2, False), lambda x: route_topk(x.int(), 2, False),
    lambda x: route_topk(x, 2, False, torch.int64)])
def test_torch_path_rejects_bad_input(bad):
    with pytest.raises(KernelInputError):
        bad(torch.randn(4, 8))


def _gpu_check(t: int, e: int = 128, k: int = 8, d: int = 2048, seed: int = 0) -> None:
    """bf16 hidden through a bf16 router GEMM, as SparseMoE.route sees it."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, d, device="cuda", generator=gen).bfloat16()
    router = (torch.randn(e, d, device="cuda", generator=gen) * d ** -0.5).bfloat16()
    logits = F.linear(x, router)  # [T, E] bf16: exact ties occur
    for renorm in (False, True):
        weights, ids = route_topk(logits, k, renorm, torch.bfloat16)
        twin_w, _ = route_topk_ref(logits, k, renorm, torch.bfloat16)
        want_w, want_ids = oracle(logits.cpu(), k, renorm)  # (-p, expert) order: the kernel's tie rule
        assert torch.equal(ids.cpu(), want_ids)
        assert (weights.double() - twin_w.double()).abs().max() <= TOL[torch.bfloat16]
        assert (weights.double().cpu() - want_w).abs().max() <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 2048])
def test_gpu_bf16_router_real_shapes(t):
    _gpu_check(t)


@pytest.mark.gpu
def test_gpu_router_non_power_of_two_experts():
    _gpu_check(300, e=60, k=4, seed=1)


@pytest.mark.gpu
def test_gpu_router_replays_in_a_cuda_graph():
    """Captured once, replayed on new logits: same as the eager twin (no host sync)."""
    logits = torch.randn(64, 128, device="cuda").bfloat16()
    route_topk(logits, 8, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route_topk(logits, 8, True)
    fresh = distinct_logits(64, 128, torch.bfloat16, torch.Generator().manual_seed(5)).cuda()
    logits.copy_(fresh)
    graph.replay()
    twin_w, twin_ids = route_topk_ref(fresh, 8, True)
    assert torch.equal(ids, twin_ids)
    assert (weights.double() - twin_w.double()).abs().max() <= TOL[torch.bfloat16]
