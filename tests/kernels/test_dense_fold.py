"""kernels/moe/dense_fold.py and its consumers (kernels/attention/norm_rope.py): q/k/v's LoRA expand
folded into the norm, rotary and KV-cache write, o's into the residual add and norm.

References are independent of the fold: the group's delta from x, A and B (lora_group_ref_), then
the torch twins of the consumers and a plain indexed cache write. The interpreter cases run this
file as `python -m tests.kernels.test_dense_fold` in a subprocess with TRITON_INTERPRET=1 and
MOEPLEX_TRITON=1; it prints one JSON per case.
"""
import json
import zlib

import pytest
import torch

from kernels.errors import KernelInputError
from kernels.attention.norm_rope import (fused_add_rms_norm, fused_add_rms_norm_ref, qk_norm_rope_ref_,
                                         qkv_rope_write_, qkv_rope_write_ref_)
from kernels.reference import lora_group_ref_
from tests.kernels.interp import errors_raised, run_interpreter_cases
from tests.kernels.loop_reference import group_in_heap, make_dense_lora, make_slot_ids, rel_err

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}  # relative to the reference's norm
NUM_SLOTS = 4
# per projection and slot: mixed ranks, and slot 3 leaves k alone (rank 0)
QKV_RANKS = [[1, 8, 16, 4], [8, 16, 1, 0], [16, 4, 8, 2]]
O_RANKS = [[16, 1, 4, 8]]


def _group(parts, sections, layout: str):
    from kernels import DenseLoRAGroup
    if layout == "heap":
        return group_in_heap(parts, sections)
    return DenseLoRAGroup(torch.cat([p.a.padded for p in parts], 1), torch.cat([p.b.padded for p in parts], 1),
                          torch.stack([p.ranks for p in parts]), sections)


def _lora_case(gen, dt, t, n_in, sections, ranks, layout, spread, device):
    """(x, group, slot_ids): a group of random projections (NaN in their padding) and slots of a spread."""
    dtype = DTYPES[dt]
    parts = [make_dense_lora(gen, NUM_SLOTS, n_in, n, ranks[h], dtype, pad=float("nan")) for h, n in enumerate(sections)]
    group = _group(parts, sections, layout)
    if device != "cpu":
        from tests.kernels.loop_reference import group_to
        group = group_to(group, device)
    x = torch.randn(t, n_in, generator=gen).to(device, dtype)
    slots = make_slot_ids(spread, t, NUM_SLOTS, gen)
    slots[0], slots[1], slots[2] = 3, -1, 1
    return x, group, slots.to(device)


def _fold(x, group, slots):
    from kernels.moe.dense_fold import dense_fold_shrink
    from kernels.moe.dense_launch import dense_layout
    return dense_fold_shrink(x, group, slots, dense_layout(slots, NUM_SLOTS))


def qkv_case(dt: str, t: int, h: int, g: int, dh: int, norm: bool, layout: str, spread: str = "uniform",
             device: str = "cpu") -> dict:
    """qkv_rope_write_ with and without the fold against the delta-then-twins reference."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dt}{t}{h}{g}{dh}{norm}{layout}{spread}".encode()) % 1000)
    dtype = DTYPES[dt]
    sections = (h * dh, g * dh, g * dh)
    x, group, slots = _lora_case(gen, dt, t, 300 if device == "cpu" else 2048, sections, QKV_RANKS, layout, spread, device)
    qkv = (torch.randn(t, sum(sections), generator=gen) * 2).to(device, dtype)
    positions = torch.randint(0, 4096, (t,), generator=gen).to(device)
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float) / dh))).to(device)
    weights = [(1 + 0.1 * torch.randn(dh, generator=gen)).to(device, dtype) for _ in range(2)] if norm else [None, None]
    blocks, rows = t // 2 + 3, 4  # every token its own cache slot, the rest of the cache NaN
    slot_mapping = torch.randperm(blocks * rows, generator=gen)[:t].to(device)

    def run(with_lora: bool, op):
        buf = qkv.clone()
        q, k, v = buf[:, :h * dh].view(t, h, dh), buf[:, h * dh:(h + g) * dh].view(t, g, dh), buf[:, (h + g) * dh:].view(t, g, dh)
        cache = torch.full((blocks, 2, rows, g, dh), float("nan"), dtype=dtype, device=device)
        fold = _fold(x, group, slots) if with_lora else None
        op(positions, inv_freq, q, k, v, cache[:, 0], cache[:, 1], slot_mapping, *weights, 1e-6, fold)
        return q, cache, buf

    q, cache, buf = run(True, qkv_rope_write_)
    q_base, cache_base, _ = run(False, qkv_rope_write_)
    twin_q, twin_cache, _ = run(True, qkv_rope_write_ref_)
    # the independent reference: delta from x, A and B; the twins of norm + rotary; an indexed write
    want = lora_group_ref_(x.float(), qkv.float().clone(), _float_group(group), slots)
    wq, wk = want[:, :h * dh].view(t, h, dh), want[:, h * dh:(h + g) * dh].view(t, g, dh)
    wq, wk = qk_norm_rope_ref_(positions, inv_freq, wq.clone(), wk.clone(), *[None if w is None else w.float() for w in weights], 1e-6)
    want_cache = torch.full((blocks, 2, rows, g, dh), float("nan"), dtype=torch.float32, device=device)
    want_cache[slot_mapping // rows, 0, slot_mapping % rows] = wk
    want_cache[slot_mapping // rows, 1, slot_mapping % rows] = want[:, (h + g) * dh:].view(t, g, dh)
    written = ~torch.isnan(want_cache)
    none = slots < 0
    return {"err": max(rel_err(q, wq), rel_err(cache[written], want_cache[written])),
            "twin_err": max(rel_err(q, twin_q), rel_err(cache[written], twin_cache[written])),
            "unwritten_left": bool(torch.isnan(cache[~written]).all()),
            "kv_left": torch.equal(buf[:, h * dh:], qkv[:, h * dh:]),
            "bitwise": bool(torch.equal(q[none], q_base[none])
                            and torch.equal(cache[slot_mapping[none] // rows, :, slot_mapping[none] % rows],
                                            cache_base[slot_mapping[none] // rows, :, slot_mapping[none] % rows])),
            "finite": bool(torch.isfinite(q).all() and torch.isfinite(cache[written]).all())}


def _float_group(group):
    """The group in fp32 (the reference's precision), same layout."""
    from kernels import DenseLoRAGroup
    from kernels.weights import Factor
    def up(f: Factor) -> Factor:
        return Factor(f.data.float(), f.offsets, f.expert_stride, f.row_stride, f.col_stride, f.split_rows, f.shape,
                      offset_unit=f.offset_unit, ranked=f.ranked, ranks=f.ranks)
    return DenseLoRAGroup(up(group.a), up(group.b), group.ranks, group.sections)


def add_norm_case(dt: str, t: int, d: int, layout: str, spread: str = "zipf", device: str = "cpu") -> dict:
    """fused_add_rms_norm with o's fold against o's delta from x, A and B, then the twin."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dt}{t}{d}{layout}{spread}".encode()) % 1000)
    dtype = DTYPES[dt]
    x, group, slots = _lora_case(gen, dt, t, 300 if device == "cpu" else 4096, (d,), O_RANKS, layout, spread, device)
    o_out = torch.randn(t, d, generator=gen).to(device, dtype)
    residual = torch.randn(t, d, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(d, generator=gen)).to(device, dtype)
    res, res_base, res_twin = residual.clone(), residual.clone(), residual.clone()
    o_in = o_out.clone()
    out = fused_add_rms_norm(o_in, res, weight, 1e-6, _fold(x, group, slots))
    base = fused_add_rms_norm(o_out.clone(), res_base, weight, 1e-6)
    twin = fused_add_rms_norm_ref(o_out.clone(), res_twin, weight, 1e-6, _fold(x, group, slots))
    want_x = lora_group_ref_(x.float(), o_out.float().clone(), _float_group(group), slots)
    want_res = residual.float() + want_x
    want = fused_add_rms_norm_ref(torch.zeros_like(want_res), want_res.clone(), weight.float(), 1e-6)
    none = slots < 0
    return {"err": max(rel_err(out, want), rel_err(res, want_res)), "twin_err": max(rel_err(out, twin), rel_err(res, res_twin)),
            "x_left": torch.equal(o_in, o_out), "unwritten_left": True, "kv_left": True,
            "bitwise": bool(torch.equal(out[none], base[none]) and torch.equal(res[none], res_base[none])),
            "finite": bool(torch.isfinite(out).all())}


def interp_cases() -> dict[str, tuple]:
    cases = {}
    for dt in ("fp32", "fp16"):
        for layout in ("padded", "heap"):
            cases[f"qkv-{dt}-t11h4g2dh8-norm-{layout}"] = ("qkv", dt, 11, 4, 2, 8, True, layout)
            cases[f"add_norm-{dt}-t11d48-{layout}"] = ("add_norm", dt, 11, 48, layout)
    # Dh / 2 = 6 (not a power of two), one KV head, rotary only; skewed and distinct spreads
    cases["qkv-fp32-t13h6g1dh12-rope-heap-skewed"] = ("qkv", "fp32", 13, 6, 1, 12, False, "heap", "skewed")
    cases["qkv-fp16-t9h3g3dh16-norm-padded-distinct"] = ("qkv", "fp16", 9, 3, 3, 16, True, "padded", "distinct")
    cases["add_norm-fp32-t7d40-heap-identical"] = ("add_norm", "fp32", 7, 40, "heap", "identical")
    # D = 1100: the delta staged in three chunks of NORM_FOLD_CHUNK columns, the last one partial
    cases["add_norm-fp16-t5d1100-heap"] = ("add_norm", "fp16", 5, 1100, "heap")
    return cases


def _run_case(spec: tuple) -> dict:
    return qkv_case(*spec[1:]) if spec[0] == "qkv" else add_norm_case(*spec[1:])


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.test_dense_fold")


def _assert_case(res: dict, dt: str) -> None:
    assert res["finite"], res
    assert res["err"] <= TOL[dt], res
    assert res["twin_err"] <= TOL[dt], res
    assert res["bitwise"], res  # tokens without an adapter: as a run with no fold
    assert res["unwritten_left"] and res["kv_left"], res  # no cache slot but the tokens', k and v as they were
    assert res.get("x_left", True), res


@pytest.mark.parametrize("name", sorted(interp_cases()))
def test_fold_on_interpreter_matches_delta_then_twins(interp_results, name):
    _assert_case(interp_results[name], name.split("-")[1])


def test_interpreter_refuses_a_fold_of_other_sections_and_a_mismatched_cache(interp_results):
    assert interp_results["errors"]["raised"] == ["KernelInputError"] * 3, interp_results["errors"]


def test_fold_path_only_between_the_row_path_and_its_token_cap():
    from kernels.moe.dense_fold import DENSE_FOLD_MAX_TOKENS, dense_fold_path
    from kernels.moe.dense_launch import DENSE_ROWS_MAX_TOKENS
    layout = object()
    assert not dense_fold_path(DENSE_ROWS_MAX_TOKENS, layout)
    assert dense_fold_path(DENSE_ROWS_MAX_TOKENS + 1, layout) and dense_fold_path(DENSE_FOLD_MAX_TOKENS, layout)
    assert not dense_fold_path(DENSE_FOLD_MAX_TOKENS + 1, layout)
    assert not dense_fold_path(DENSE_ROWS_MAX_TOKENS + 1, None)


def _bad_inputs() -> list[str]:
    gen = torch.Generator().manual_seed(1)
    t, h, g, dh = 11, 2, 1, 8
    x, group, slots = _lora_case(gen, "fp32", t, 40, (h * dh, g * dh, g * dh), QKV_RANKS, "padded", "uniform", "cpu")
    fold = _fold(x, group, slots)
    q, k, v = torch.randn(t, h, dh), torch.randn(t, g, dh), torch.randn(t, g, dh)
    pos, inv = torch.arange(t), torch.ones(dh // 2)
    cache = torch.zeros(8, 2, 4, g, dh)
    return errors_raised([
        lambda: fused_add_rms_norm(torch.randn(t, 32), torch.randn(t, 32), torch.ones(32), 1e-6, fold),
        lambda: qkv_rope_write_(pos, inv, torch.randn(t, h + 1, dh), k, v, cache[:, 0], cache[:, 1], pos, fold=fold),
        lambda: qkv_rope_write_(pos, inv, q, k, v, cache[:, 0], torch.zeros(8, 4, g, dh + 2), pos),
    ], KernelInputError)


if __name__ == "__main__":
    for case_name, case in interp_cases().items():
        print(json.dumps({"name": case_name, **_run_case(case)}), flush=True)
    print(json.dumps({"name": "errors", "raised": _bad_inputs()}))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded", "heap"])
@pytest.mark.parametrize("t", [9, 64, 128])
def test_gpu_bf16_qkv_fold_real_shapes(t, layout):
    _assert_case(qkv_case("bf16", t, 32, 4, 128, True, layout, "zipf", device="cuda"), "bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded", "heap"])
@pytest.mark.parametrize("t", [9, 64, 128])
def test_gpu_bf16_add_norm_fold_real_shapes(t, layout):
    _assert_case(add_norm_case("bf16", t, 2048, layout, "uniform", device="cuda"), "bf16")
