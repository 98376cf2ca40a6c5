"""Multi-program alignment (kernels/moe/align_multi.py): bitwise equal to the torch path and to a
Python model; in the Triton interpreter on CPU (subprocess), at 4096/16384 rows on the GPU."""
import pytest
import torch

from kernels.moe.align_multi import KeySpace, multi_fits
from tests.kernels.align_multi_cases import FIELDS, case_names
from tests.kernels.interp import run_interpreter_cases


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.align_multi_cases")


@pytest.mark.parametrize("name", case_names())
def test_multi_alignment_matches_torch_and_python(interp_results, name):
    res = interp_results[name]
    assert res["vs_python"] == [True] * 4, f"{name}: {dict(zip(FIELDS, res['vs_python']))} vs the Python model"
    assert res["vs_torch"] == [True] * 4, f"{name}: {dict(zip(FIELDS, res['vs_torch']))} vs the torch path"
    assert res["dtypes"] == ["torch.int32"] * 4


def test_multi_fits_bounds_the_scratch():
    assert multi_fits(16384, KeySpace(128, 64, True, True))  # 64 slots x 128 experts, expert-major
    assert not multi_fits(0, KeySpace(128, 16, True, False))
    assert not multi_fits(4096, KeySpace(500, 100000, True, False))  # keys beyond the tiles: torch path
    assert not multi_fits(256 * 256 + 1, KeySpace(8, 1, False, False))  # too many chunks


def _random_routing(rows: int, num_experts: int, top_k: int, num_slots: int, seed: int):
    """Top-k of random experts; slots uniform in [-1, S) with a skew: a quarter on slot 0."""
    gen = torch.Generator().manual_seed(seed)
    t = rows // top_k
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(t)])
    slots = torch.randint(-1, num_slots, (t,), generator=gen)
    slots[: t // 4] = 0
    return ids.to(torch.int32), slots.to(torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [4096, 16384])
@pytest.mark.parametrize("mode,num_slots,bs", [("none", 1, 64), ("slots", 16, 16), ("major", 16, 16),
                                               ("slots", 64, 16), ("major", 64, 32)])
def test_multi_alignment_on_gpu_matches_torch_path(rows, mode, num_slots, bs):
    from kernels import moe_align_virtual
    ids, slots = _random_routing(rows, 128, 8, num_slots, seed=rows + num_slots)
    slots = None if mode == "none" else slots
    major = mode == "major"
    want = moe_align_virtual(ids, slots, 128, bs, num_slots, expert_major=major)  # CPU: torch path
    cuda_ids, cuda_slots = ids.cuda(), None if slots is None else slots.cuda()
    got = moe_align_virtual(cuda_ids, cuda_slots, 128, bs, num_slots, expert_major=major)
    for field in FIELDS:
        assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), field
    graph = torch.cuda.CUDAGraph()  # no host sync: it captures, and a replay gives the same layout
    with torch.cuda.graph(graph):
        captured = moe_align_virtual(cuda_ids, cuda_slots, 128, bs, num_slots, expert_major=major)
    captured.sorted_ids.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    for field in FIELDS:
        assert torch.equal(getattr(captured, field).cpu(), getattr(want, field)), field
