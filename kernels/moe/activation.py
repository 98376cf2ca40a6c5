"""SiLU(gate) * up over the gate_up GEMM's output rows."""
import triton
import triton.language as tl
from torch import Tensor

from kernels.checks import expect


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, num_cols, stride_xm, stride_om, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_cols
    # gate is columns [0, I), up is columns [I, 2I) of the same row
    gate = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xm + num_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_om + offs, act.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: Tensor, out: Tensor) -> Tensor:
    """out = silu(gate_up[:, :I]) * gate_up[:, I:], computed in fp32.

    Args:
        gate_up: [M, 2I], unit column stride.
        out: [M, I], unit column stride, written in full.
    """
    rows, two_i = gate_up.shape
    expect(tuple(out.shape) == (rows, two_i // 2), f"out must be [M, I] = {(rows, two_i // 2)}, got {tuple(out.shape)}")
    expect(gate_up.stride(1) == 1 and out.stride(1) == 1, "silu_mul needs unit column strides")
    if rows == 0:
        return out
    block = min(1024, triton.next_power_of_2(two_i // 2))
    _silu_mul_kernel[(rows, triton.cdiv(two_i // 2, block))](
        gate_up, out, two_i // 2, gate_up.stride(0), out.stride(0), BLOCK=block)
    return out
