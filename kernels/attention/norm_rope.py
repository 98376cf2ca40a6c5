"""RMSNorm, residual add + RMSNorm, and per-head qk-norm + rotary with the KV-cache write, each
one Triton launch.

Why the KV write rides with the rotary: as two indexed torch writes (k, v) it cost 2 x ~4 us a
layer on the H200 at decode, tiny grids of a few percent occupancy, while the rotary's launch
already holds k; taking them in cost the step 0.37 ms at 48 layers and batch 64 (17.87 -> 17.50
ms, benchmarks/RESULTS.md, engine).

T = tokens, D = hidden, H = query heads, G = KV heads, Dh = head dim.
Numerics follow the torch modules of engine/models/layers.py (and transformers): statistics
in fp32, the normalised value cast to x's dtype before the weight multiply; rotary cos/sin
computed in fp32, cast to x's dtype, then each product and the sum rounded to x's dtype.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from kernels.checks import FLOAT_DTYPES
from kernels.dispatch import use_triton
from kernels.errors import expect


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, num_cols, stride_x, stride_r, stride_o, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_cols
    dtype = out_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # residual += x in x's dtype (torch adds in fp32 and rounds once)
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(dtype)
        tl.store(res_ptr + row * stride_r + offs, h, mask=mask)
        h = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / num_cols + eps)
    # normalised value rounded to the dtype first, then times the weight (rounded again)
    normed = (h * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(dtype), mask=mask)


def _check_norm(x: Tensor, weight: Tensor) -> None:
    expect(x.dim() == 2, f"x must be [T, D], got {tuple(x.shape)}")
    expect(x.dtype in FLOAT_DTYPES, f"x must be fp32/fp16/bf16, got {x.dtype}")
    expect(tuple(weight.shape) == (x.shape[1],), f"weight must be [D={x.shape[1]}], got {tuple(weight.shape)}")
    expect(weight.dtype == x.dtype, f"weight dtype {weight.dtype} must match x's {x.dtype}")
    expect(weight.device == x.device, f"weight must live on {x.device}, got {weight.device}")


def _launch_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> Tensor:
    expect(x.stride(1) == 1, "x needs a unit column stride")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows, cols = x.shape
    if rows == 0:
        return out
    res = x if residual is None else residual
    _rms_norm_kernel[(rows,)](x, res, weight, out, cols, x.stride(0), res.stride(0), out.stride(0), eps,
                              HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(cols),
                              enable_fp_fusion=False)
    return out


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Torch twin of `rms_norm` (the RMSNorm module's own code)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of each row in one launch.

    Semantics:
        weight * (x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)).to(x.dtype)
    Args:
        x: [..., D] fp32/fp16/bf16 (leading dims are flattened into rows).
        weight: [D], x's dtype.
    Returns:
        [..., D] in x.dtype, a new tensor.
    """
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x  # [T, D]
    _check_norm(rows, weight)
    return _launch_norm(rows, None, weight, eps).view(x.shape)


def fused_add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Torch twin of `fused_add_rms_norm`."""
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Residual add, then RMSNorm of the sum, in one launch.

    Semantics:
        residual += x   (in place, in x's dtype)
        return rms_norm(residual, weight, eps)
    Args:
        x: [T, D] fp32/fp16/bf16 (a sublayer's output).
        residual: [T, D], x's dtype and device; updated in place.
        weight: [D], x's dtype.
    Returns:
        [T, D] in x.dtype, a new tensor.
    """
    if not use_triton(x):
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    _check_norm(x, weight)
    expect(residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device,
           f"residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
           f"({tuple(residual.shape)}, {residual.dtype}, {residual.device})")
    expect(residual.stride(1) == 1, "residual needs a unit column stride")
    return _launch_norm(x, residual, weight, eps)


@triton.jit
def _norm_rope(x1, x2, is_q, q_ptr, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr, tok, cols, eps, HALF: tl.constexpr,
               HAS_NORM: tl.constexpr, PRECISE_TRIG: tl.constexpr):
    """Rows [BLOCK_H, BLOCK_HALF] of heads, their halves x1 and x2 (fp32): per-head norm (with q's
    or k's weight by is_q) then rotary at the token's position; fp32 values rounded to q's dtype."""
    dtype = q_ptr.dtype.element_ty
    if HAS_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        col_mask = cols < HALF
        wq1 = tl.load(qw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        wq2 = tl.load(qw_ptr + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)
        wk1 = tl.load(kw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        wk2 = tl.load(kw_ptr + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)
        # the weight of each row's tensor (q or k)
        w1 = tl.where(is_q[:, None], wq1[None, :], wk1[None, :])
        w2 = tl.where(is_q[:, None], wq2[None, :], wk2[None, :])
        # normalised value rounded to the dtype, then times the weight, rounded again
        x1 = (w1 * (x1 * inv_rms[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * inv_rms[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # angle of frequency i at this token's position, in fp32
    freqs = tl.load(pos_ptr + tok).to(tl.float32) * tl.load(inv_freq_ptr + cols, mask=cols < HALF, other=0.0)
    if PRECISE_TRIG:
        cos, sin = libdevice.cos(freqs), libdevice.sin(freqs)
    else:
        cos, sin = tl.cos(freqs), tl.sin(freqs)
    cos = cos.to(dtype).to(tl.float32)[None, :]
    sin = sin.to(dtype).to(tl.float32)[None, :]
    # x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype
    out1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    return out1, out2


@triton.jit
def _qkv_rope_write_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr, slot_map_ptr, kc_ptr, vc_ptr,
                           num_q_heads, num_kv_heads, block_rows, stride_qt, stride_qh, stride_kt, stride_kh,
                           stride_vt, stride_vh, stride_cb, stride_cr, stride_cg, eps, HALF: tl.constexpr,
                           HAS_NORM: tl.constexpr, PRECISE_TRIG: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_HALF: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    # heads [0, H) are q's, [H, H + G) k's, [H + G, H + 2G) v's
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    is_q = heads < num_q_heads
    is_v = heads >= num_q_heads + num_kv_heads
    mask = (heads < num_q_heads + 2 * num_kv_heads)[:, None] & (cols < HALF)[None, :]
    dtype = q_ptr.dtype.element_ty
    kv_head = tl.where(is_v, heads - num_q_heads - num_kv_heads, heads - num_q_heads)
    q_rows = q_ptr + tok * stride_qt + heads * stride_qh
    k_rows = k_ptr + tok * stride_kt + kv_head * stride_kh
    v_rows = v_ptr + tok * stride_vt + kv_head * stride_vh
    lo_ptrs = tl.where(is_q, q_rows, tl.where(is_v, v_rows, k_rows))[:, None] + cols[None, :]
    x1 = tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    out1, out2 = _norm_rope(x1, x2, is_q, q_ptr, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr, tok, cols, eps, HALF,
                            HAS_NORM, PRECISE_TRIG)
    # v is stored as loaded: no norm, no rotary
    out1 = tl.where(is_v[:, None], x1, out1)
    out2 = tl.where(is_v[:, None], x2, out2)
    # q in place; k and v into the cache at the token's slot (block slot // S, row slot % S)
    slot = tl.load(slot_map_ptr + tok).to(tl.int64)
    cache_rows = (slot // block_rows) * stride_cb + (slot % block_rows) * stride_cr + kv_head * stride_cg
    dest = tl.where(is_q, q_rows, tl.where(is_v, vc_ptr + cache_rows, kc_ptr + cache_rows))[:, None] + cols[None, :]
    tl.store(dest, out1.to(dtype), mask=mask)
    tl.store(dest + HALF, out2.to(dtype), mask=mask)


def _check_rope(positions: Tensor, inv_freq: Tensor, q: Tensor, k: Tensor,
                q_weight: Tensor | None, k_weight: Tensor | None) -> None:
    expect(q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2],
           f"q must be [T, H, Dh] and k [T, G, Dh], got {tuple(q.shape)} and {tuple(k.shape)}")
    t, _, dh = q.shape
    expect(q.dtype in FLOAT_DTYPES and k.dtype == q.dtype, f"q and k must share fp32/fp16/bf16, got {q.dtype}, {k.dtype}")
    expect(k.device == q.device, f"k must live on {q.device}, got {k.device}")
    expect(dh % 2 == 0 and q.stride(2) == 1 and k.stride(2) == 1, "Dh must be even with a unit stride")
    expect(tuple(positions.shape) == (t,) and not positions.is_floating_point() and positions.device == q.device,
           f"positions must be [T={t}] integer on {q.device}, got {tuple(positions.shape)} {positions.dtype}")
    expect(tuple(inv_freq.shape) == (dh // 2,) and inv_freq.dtype == torch.float32 and inv_freq.device == q.device,
           f"inv_freq must be [Dh/2={dh // 2}] float32 on {q.device}, got {tuple(inv_freq.shape)} {inv_freq.dtype}")
    expect((q_weight is None) == (k_weight is None), "give both q_weight and k_weight, or neither")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        expect(w is None or (tuple(w.shape) == (dh,) and w.dtype == q.dtype and w.device == q.device),
               f"{name} must be [Dh={dh}] {q.dtype} on {q.device}")


def rotary_ref(positions: Tensor, inv_freq: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Neox-style rotary of q [T, H, Dh] and k [T, G, Dh] (the Rotary module's own code); new tensors."""
    freqs = positions[:, None].float() * inv_freq.to(q.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype)[:, None], emb.sin().to(q.dtype)[:, None]
    half = q.shape[-1] // 2

    def rotate_half(x: Tensor) -> Tensor:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def qk_norm_rope_ref_(positions: Tensor, inv_freq: Tensor, q: Tensor, k: Tensor, q_weight: Tensor | None = None,
                      k_weight: Tensor | None = None, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm (optional) then neox rotary of q and k (qkv_rope_write_'s first half), in
    place; the modules' own code."""
    q_in, k_in = q, k
    if q_weight is not None:
        q_in, k_in = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    q_out, k_out = rotary_ref(positions, inv_freq, q_in, k_in)
    return q.copy_(q_out), k.copy_(k_out)


def _check_cache(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    t, g, dh = k.shape
    expect(tuple(v.shape) == (t, g, dh) and v.dtype == q.dtype and v.device == q.device and v.stride(2) == 1,
           f"v must be [T={t}, G={g}, Dh={dh}] {q.dtype} on {q.device} with a unit stride, got {tuple(v.shape)} {v.dtype}")
    expect(k_cache.dim() == 4 and tuple(k_cache.shape[2:]) == (g, dh) and k_cache.shape == v_cache.shape,
           f"k_cache and v_cache must be [N, S, G={g}, Dh={dh}], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    expect(k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1,
           "k_cache and v_cache need the same strides, with a unit stride over Dh")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        expect(c.dtype == q.dtype and c.device == q.device, f"{name} must be {q.dtype} on {q.device}, got {c.dtype} on {c.device}")
    expect(tuple(slot_mapping.shape) == (t,) and not slot_mapping.is_floating_point() and slot_mapping.device == q.device,
           f"slot_mapping must be [T={t}] integer on {q.device}, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")


def qkv_rope_write_ref_(positions: Tensor, inv_freq: Tensor, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor,
                        v_cache: Tensor, slot_mapping: Tensor, q_weight: Tensor | None = None,
                        k_weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Torch twin of `qkv_rope_write_`."""
    q_new, k_new = qk_norm_rope_ref_(positions, inv_freq, q.clone(), k.clone(), q_weight, k_weight, eps)
    block, row = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
    k_cache[block, row] = k_new
    v_cache[block, row] = v
    return q.copy_(q_new)


def qkv_rope_write_(positions: Tensor, inv_freq: Tensor, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor,
                    v_cache: Tensor, slot_mapping: Tensor, q_weight: Tensor | None = None,
                    k_weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Per-head RMSNorm (optional) and neox rotary of q and k, then k and v into the paged KV
    cache, in one launch.

    Semantics:
        if q_weight is not None:  q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)  (over Dh)
        freqs = positions[:, None].float() * inv_freq;  emb = cat(freqs, freqs)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)   (per token, broadcast over heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        with rotate_half(x) = cat(-x[..., Dh/2:], x[..., :Dh/2]); the new q overwrites q;
        k_cache[slot // S, slot % S], v_cache[slot // S, slot % S] = k[t], v[t] with slot =
        slot_mapping[t]; k and v themselves are left as they were.
    Args:
        positions: [T] int32/int64, each token's position.
        inv_freq: [Dh/2] float32, theta ** (-2i / Dh) (the default rope; no scaling).
        q: [T, H, Dh] fp32/fp16/bf16, unit stride over Dh; k, v: [T, G, Dh], q's dtype, likewise.
        k_cache, v_cache: [N, S, G, Dh], q's dtype, the same strides, unit stride over Dh.
        slot_mapping: [T] int, each token's cache slot (block * S + row), in range.
        q_weight, k_weight: [Dh] in q's dtype, or both None for rotary only.
        eps: RMSNorm epsilon.
    Returns:
        q, updated.
    """
    if not use_triton(q):
        return qkv_rope_write_ref_(positions, inv_freq, q, k, v, k_cache, v_cache, slot_mapping, q_weight,
                                   k_weight, eps)
    _check_rope(positions, inv_freq, q, k, q_weight, k_weight)
    _check_cache(q, k, v, k_cache, v_cache, slot_mapping)
    t, h, dh = q.shape
    g = k.shape[1]
    if t == 0:
        return q
    block_h = min(8, triton.next_power_of_2(h + 2 * g))
    has_norm = q_weight is not None
    _qkv_rope_write_kernel[(t, triton.cdiv(h + 2 * g, block_h))](
        q, k, v, q_weight if has_norm else q, k_weight if has_norm else k, positions, inv_freq, slot_mapping,
        k_cache, v_cache, h, g, k_cache.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), eps,
        HALF=dh // 2, HAS_NORM=has_norm, PRECISE_TRIG=q.is_cuda, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(dh // 2),
        enable_fp_fusion=False)  # no mul+add -> fma: torch rounds each product first
    return q
