"""kernels/attention/norm_rope.py: Triton (interpreter on CPU, real on GPU) vs the torch twins and fp64 loops.

The interpreter cases run this file as `python -m tests.kernels.test_norm_rope` in a subprocess
with TRITON_INTERPRET=1 and MOEPLEX_TRITON=1 (set before triton loads); it prints one JSON per case.
The torch twins themselves are checked against transformers' Qwen3-MoE RMSNorm and rotary.
"""

import pytest
import torch

from kernels.errors import KernelInputError
from kernels.attention.norm_rope import (fused_add_rms_norm, fused_add_rms_norm_ref, qk_norm_rope_ref_, qkv_rope_write_,
                                         qkv_rope_write_ref_, rms_norm, rms_norm_ref, rotary_ref)
from tests.kernels.interp import errors_raised, print_cases, run_interpreter_cases

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 2e-6, "fp16": 1e-3, "bf16": 8e-3}  # max |triton - twin| / max |twin| (one ulp at most)
NORM_SHAPES = [(1, 32), (5, 48), (3, 40)]  # (T, D): D not a power of two in two of them
ROPE_SHAPES = [(1, 4, 2, 8), (6, 6, 1, 12), (5, 4, 4, 16)]  # (T, H, G, Dh): Dh/2 = 6 is not a power of two


def inv_freq_of(dh: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float) / dh))


def norm_loop_fp64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm row by row in float64: the independent oracle."""
    rows = []
    for row in x.double():
        rows.append(weight.double() * row / torch.sqrt((row * row).sum() / row.numel() + eps))
    return torch.stack(rows)


def rope_loop_fp64(positions: torch.Tensor, inv_freq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rotates each pair (i, i + Dh/2) of every head by angle position * inv_freq[i], in float64."""
    out, half = x.double().clone(), x.shape[-1] // 2
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            ang = float(pos) * float(inv_freq[i])  # the angle as fp32 computes it
            c, s = torch.tensor(ang, dtype=torch.float32).double().cos(), torch.tensor(ang, dtype=torch.float32).double().sin()
            a, b = x[t, :, i].double(), x[t, :, i + half].double()
            out[t, :, i], out[t, :, i + half] = a * c - b * s, b * c + a * s
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def norm_case(dt: str, t: int, d: int, fused: bool, strided: bool, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(t * 100 + d)
    dtype = DTYPES[dt]
    wide = torch.randn(t, d + 7, generator=gen).to(device, dtype)
    x = wide[:, 3:3 + d] if strided else wide[:, :d].contiguous()
    weight = (1 + 0.1 * torch.randn(d, generator=gen)).to(device, dtype)
    residual = torch.randn(t, d, generator=gen).to(device, dtype)
    if fused:
        mine_res, twin_res = residual.clone(), residual.clone()
        mine, twin = fused_add_rms_norm(x, mine_res, weight, 1e-6), fused_add_rms_norm_ref(x, twin_res, weight, 1e-6)
        oracle = norm_loop_fp64(x.double() + residual.double(), weight, 1e-6)
        res_err = rel(mine_res, twin_res)
    else:
        mine, twin, oracle, res_err = rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), norm_loop_fp64(x, weight, 1e-6), 0.0
    return {"err": rel(mine, twin), "oracle_err": rel(mine, oracle), "res_err": res_err,
            "finite": bool(torch.isfinite(mine).all()), "exact": float((mine == twin).float().mean())}


def rope_case(dt: str, t: int, h: int, g: int, dh: int, norm: bool, device: str = "cpu", max_pos: int = 5000) -> dict:
    """qkv_rope_write_ against its twin (and fp64 loops): q in place, k and v in the cache."""
    gen = torch.Generator().manual_seed(t * 1000 + h * 10 + dh)
    dtype = DTYPES[dt]
    # q, k and v as views of one fused qkv projection output, as a model would hold them
    qkv = torch.randn(t, (h + 2 * g) * dh, generator=gen).to(device, dtype)
    q, k = qkv[:, :h * dh].view(t, h, dh), qkv[:, h * dh:(h + g) * dh].view(t, g, dh)
    v = qkv[:, (h + g) * dh:].view(t, g, dh)
    positions = torch.randint(0, max_pos, (t,), generator=gen).to(device)
    positions[0] = 0
    weights = [(1 + 0.1 * torch.randn(dh, generator=gen)).to(device, dtype) for _ in range(2)] if norm else [None, None]
    inv_freq = inv_freq_of(dh).to(device)
    # every token its own slot of a block-major cache [N, 2, S, G, Dh] (k and v views), the rest NaN
    blocks, rows = t // 2 + 3, 4
    slots = torch.randperm(blocks * rows, generator=gen)[:t].to(device)
    cache, twin_cache = (torch.full((blocks, 2, rows, g, dh), float("nan"), dtype=dtype, device=device) for _ in range(2))
    q_in, k_in, kv_before = q.clone(), k.clone(), qkv[:, h * dh:].clone()
    twin_q = qkv_rope_write_ref_(positions, inv_freq, q.clone(), k, v, twin_cache[:, 0], twin_cache[:, 1], slots,
                                 *weights, 1e-6)
    mine_q = qkv_rope_write_(positions, inv_freq, q, k, v, cache[:, 0], cache[:, 1], slots, *weights, 1e-6)
    mine_k, twin_k = cache[slots // rows, 0, slots % rows], twin_cache[slots // rows, 0, slots % rows]
    written = torch.zeros(blocks, rows, dtype=torch.bool, device=device)
    written[slots // rows, slots % rows] = True
    row = {"err": max(rel(mine_q, twin_q), rel(mine_k, twin_k)), "inplace": mine_q.data_ptr() == qkv.data_ptr(),
           "finite": bool(torch.isfinite(mine_q).all() and torch.isfinite(mine_k).all()),
           "exact": float(torch.cat([(mine_q == twin_q).flatten(), (mine_k == twin_k).flatten()]).float().mean()),
           "v_untouched": torch.equal(qkv[:, h * dh:], kv_before)
           and torch.equal(cache[slots // rows, 1, slots % rows], v)
           and bool(torch.isnan(cache.transpose(1, 2)[~written]).all())}
    if device == "cpu" and dt == "fp32":
        normed = [norm_loop_fp64(x.reshape(-1, dh), w, 1e-6).view(x.shape) if norm else x
                  for x, w in ((q_in, weights[0]), (k_in, weights[1]))]
        row["oracle_err"] = max(rel(mine_q, rope_loop_fp64(positions.cpu(), inv_freq.cpu(), normed[0])),
                                rel(mine_k, rope_loop_fp64(positions.cpu(), inv_freq.cpu(), normed[1])))
    return row


def interp_cases() -> dict[str, tuple]:
    cases = {}
    for dt in ("fp32", "fp16"):
        for t, d in NORM_SHAPES:
            for fused in (False, True):
                cases[f"{'add_norm' if fused else 'norm'}-{dt}-t{t}d{d}"] = ("norm", dt, t, d, fused, False)
        for t, h, g, dh in ROPE_SHAPES:
            for norm in (False, True):
                cases[f"{'qk_norm_rope' if norm else 'rope'}-{dt}-t{t}h{h}g{g}dh{dh}"] = ("rope", dt, t, h, g, dh, norm)
    cases["add_norm-fp32-t4d32-strided"] = ("norm", "fp32", 4, 32, True, True)
    cases["norm-fp16-t3d48-strided"] = ("norm", "fp16", 3, 48, False, True)
    return cases


def _run_interp_case(spec: tuple) -> dict:
    return norm_case(*spec[1:]) if spec[0] == "norm" else rope_case(*spec[1:])


@pytest.fixture(scope="module")
def interp_results() -> dict[str, dict]:
    return run_interpreter_cases("tests.kernels.test_norm_rope")


@pytest.mark.parametrize("name", sorted(interp_cases()))
def test_triton_interpreter_matches_twin_and_fp64(interp_results, name):
    res = interp_results[name]
    dt = name.split("-")[1]
    assert res["finite"], res
    assert res["err"] <= TOL[dt], res
    assert res.get("res_err", 0.0) == 0.0, res  # the in-place residual add is exact in every dtype
    if dt == "fp16":
        assert res["exact"] >= 0.98, res  # same rounding steps as torch: nearly all elements bitwise equal
    if "oracle_err" in res:
        assert res["oracle_err"] <= (1e-5 if dt == "fp32" else 2e-3), res
    if name.startswith(("rope", "qk_norm")):
        # q rotated in place; k and v left as they were, v copied into the cache, no other slot written
        assert res["inplace"] and res["v_untouched"], res


def test_interpreter_rejects_bad_input(interp_results):
    assert interp_results["errors"]["raised"] == ["KernelInputError"] * 5, interp_results["errors"]


def test_interpreter_norm_flattens_leading_dims(interp_results):
    res = interp_results["leading_dims"]
    assert res["shape_ok"] and res["err"] <= TOL["fp16"], res


def test_twins_match_transformers_qwen3_moe():
    """The torch twins are the modules' own code: check them against transformers' Qwen3-MoE."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 3, 16, generator=gen).to(dtype)
        hf_norm = hf.Qwen3MoeRMSNorm(16, eps=1e-6).to(dtype)
        hf_norm.weight.data = (1 + 0.1 * torch.randn(16, generator=gen)).to(dtype)
        assert torch.equal(rms_norm_ref(x, hf_norm.weight, 1e-6), hf_norm(x))
        positions = torch.tensor([0, 1, 7, 300, 4095])
        inv_freq = inv_freq_of(16, 1e6)
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        k = torch.randn(5, 2, 16, generator=gen).to(dtype)
        # transformers takes [B, heads, T, Dh] and cos/sin [B, T, Dh]
        hf_q, hf_k = hf.apply_rotary_pos_emb(x.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             emb.cos().to(dtype)[None], emb.sin().to(dtype)[None])
        mine_q, mine_k = rotary_ref(positions, inv_freq, x, k)
        assert torch.equal(mine_q, hf_q[0].transpose(0, 1)) and torch.equal(mine_k, hf_k[0].transpose(0, 1))


def _leading_dims_case() -> dict:
    """rms_norm over [T, H, Dh] (a per-head norm) equals the twin."""
    x, weight = torch.randn(3, 4, 16, dtype=torch.float16), torch.rand(16, dtype=torch.float16) + 0.5
    mine, twin = rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6)
    return {"shape_ok": mine.shape == x.shape, "err": rel(mine, twin)}


def _bad_inputs() -> list[str]:
    x, w = torch.randn(3, 8), torch.ones(8)
    q, k, pos, inv = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.arange(2), inv_freq_of(8)
    cache = torch.zeros(3, 2, 4, 2, 8)
    kc, vc = cache[:, 0], cache[:, 1]
    calls = [lambda: rms_norm(x, torch.ones(7), 1e-6),
             lambda: fused_add_rms_norm(x, torch.randn(3, 8).half(), w, 1e-6),
             lambda: qkv_rope_write_(pos.float(), inv, q, k, k.clone(), kc, vc, pos),
             lambda: qkv_rope_write_(pos, inv, q, k, k.clone(), kc, vc, pos, torch.ones(8), None),
             lambda: qkv_rope_write_(pos, inv, q, k, k.clone(), kc, torch.zeros(3, 4, 2, 6), pos)]
    return errors_raised(calls, KernelInputError)


if __name__ == "__main__":
    _cases = interp_cases()
    _special = {"errors": lambda: {"raised": _bad_inputs()}, "leading_dims": _leading_dims_case}
    print_cases(list(_cases) + list(_special),
                lambda name: _special[name]() if name in _special else _run_interp_case(_cases[name]))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 300])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_bf16_norm_real_shapes(t, fused):
    res = norm_case("bf16", t, 2048, fused, strided=False, device="cuda")
    assert res["finite"] and res["res_err"] == 0.0, res
    assert res["err"] <= TOL["bf16"] and res["exact"] >= 0.99, res
    assert res["oracle_err"] <= 1e-2, res


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 300])
@pytest.mark.parametrize("norm", [False, True])
def test_gpu_bf16_qkv_rope_write_real_shapes(t, norm):
    res = rope_case("bf16", t, 32, 4, 128, norm, device="cuda", max_pos=40960)
    assert res["finite"] and res["inplace"] and res["v_untouched"], res
    assert res["err"] <= TOL["bf16"] and res["exact"] >= 0.99, res


@pytest.mark.gpu
def test_gpu_ops_replay_in_a_cuda_graph():
    """Captured once, replayed with new positions, slots and inputs: same as eager twins (no host sync)."""
    dev, dtype, t = "cuda", torch.bfloat16, 64
    x, residual = torch.randn(t, 2048, device=dev, dtype=dtype), torch.randn(t, 2048, device=dev, dtype=dtype)
    weight = torch.rand(2048, device=dev, dtype=dtype) + 0.5
    q, k, v = (torch.randn(t, n, 128, device=dev, dtype=dtype) for n in (32, 4, 4))
    qw, kw = torch.rand(128, device=dev, dtype=dtype) + 0.5, torch.rand(128, device=dev, dtype=dtype) + 0.5
    positions, inv_freq = torch.zeros(t, dtype=torch.long, device=dev), inv_freq_of(128, 1e6).to(dev)
    slots = torch.arange(t, device=dev)
    cache = torch.zeros(16, 2, 16, 4, 128, device=dev, dtype=dtype)
    inputs = [x, residual, q, k, v]
    fused_add_rms_norm(x, residual.clone(), weight, 1e-6)  # compile outside the capture
    qkv_rope_write_(positions, inv_freq, q.clone(), k, v, cache[:, 0], cache[:, 1], slots, qw, kw, 1e-6)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_add_rms_norm(x, residual, weight, 1e-6)
        qkv_rope_write_(positions, inv_freq, q, k, v, cache[:, 0], cache[:, 1], slots, qw, kw, 1e-6)
    fresh = [torch.randn_like(val) for val in inputs]
    for buf, val in zip(inputs, fresh):
        buf.copy_(val)
    positions.copy_(torch.randint(0, 40960, (t,), device=dev))
    slots.copy_(torch.randperm(256, device=dev)[:t])
    cache.zero_()
    graph.replay()
    want_res = fresh[1].clone()
    want = fused_add_rms_norm_ref(fresh[0], want_res, weight, 1e-6)
    want_q, want_k = qk_norm_rope_ref_(positions, inv_freq, fresh[2], fresh[3].clone(), qw, kw, 1e-6)
    assert torch.equal(residual, want_res)
    got_k, got_v = cache[slots // 16, 0, slots % 16], cache[slots // 16, 1, slots % 16]
    assert torch.equal(got_v, fresh[4])
    for mine, ref in ((out, want), (q, want_q), (got_k, want_k)):
        assert rel(mine, ref) <= TOL["bf16"]
