"""RMSNorm, residual add + RMSNorm, and per-head qk-norm + rotary, each one Triton launch.

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
def _qk_norm_rope_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr, num_q_heads, num_heads,
                         stride_qt, stride_qh, stride_kt, stride_kh, eps, HALF: tl.constexpr,
                         HAS_NORM: tl.constexpr, PRECISE_TRIG: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    # heads [0, H) are q's, [H, H + G) are k's
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    is_q = heads < num_q_heads
    mask = (heads < num_heads)[:, None] & (cols < HALF)[None, :]
    dtype = q_ptr.dtype.element_ty
    # each head's row start, in q or in k
    q_rows = q_ptr + tok * stride_qt + heads * stride_qh
    k_rows = k_ptr + tok * stride_kt + (heads - num_q_heads) * stride_kh
    lo_ptrs = tl.where(is_q, q_rows, k_rows)[:, None] + cols[None, :]  # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
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
    tl.store(lo_ptrs, out1.to(dtype), mask=mask)
    tl.store(lo_ptrs + HALF, out2.to(dtype), mask=mask)


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
    """Torch twin of `qk_norm_rope_`."""
    q_in, k_in = q, k
    if q_weight is not None:
        q_in, k_in = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    q_out, k_out = rotary_ref(positions, inv_freq, q_in, k_in)
    return q.copy_(q_out), k.copy_(k_out)


def qk_norm_rope_(positions: Tensor, inv_freq: Tensor, q: Tensor, k: Tensor, q_weight: Tensor | None = None,
                  k_weight: Tensor | None = None, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm (optional) then neox rotary of q and k, in place, in one launch.

    Semantics:
        if q_weight is not None:  q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)  (over Dh)
        freqs = positions[:, None].float() * inv_freq;  emb = cat(freqs, freqs)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)   (per token, broadcast over heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        with rotate_half(x) = cat(-x[..., Dh/2:], x[..., :Dh/2]); the results overwrite q and k.
    Args:
        positions: [T] int32/int64, each token's position.
        inv_freq: [Dh/2] float32, theta ** (-2i / Dh) (the default rope; no scaling).
        q: [T, H, Dh] fp32/fp16/bf16, unit stride over Dh; k: [T, G, Dh], q's dtype.
        q_weight, k_weight: [Dh] in q's dtype, or both None for rotary only.
        eps: RMSNorm epsilon.
    Returns:
        (q, k), the same tensors, updated.
    """
    if not use_triton(q):
        return qk_norm_rope_ref_(positions, inv_freq, q, k, q_weight, k_weight, eps)
    _check_rope(positions, inv_freq, q, k, q_weight, k_weight)
    t, h, dh = q.shape
    g = k.shape[1]
    if t == 0:
        return q, k
    block_h = min(8, triton.next_power_of_2(h + g))
    has_norm = q_weight is not None
    _qk_norm_rope_kernel[(t, triton.cdiv(h + g, block_h))](
        q, k, q_weight if has_norm else q, k_weight if has_norm else k, positions, inv_freq, h, h + g,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), eps, HALF=dh // 2, HAS_NORM=has_norm,
        PRECISE_TRIG=q.is_cuda, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(dh // 2),
        enable_fp_fusion=False)  # no mul+add -> fma: torch rounds each product first
    return q, k
