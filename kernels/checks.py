"""Argument checks shared by the Triton launchers and the references (no device sync)."""
import torch
from torch import Tensor

from kernels.errors import expect
from kernels.weights import DenseLoRAGroup, DenseLoRAWeights, MoELoRAWeights

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_moe_args(hidden: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_weights: Tensor,
                   topk_ids: Tensor, lora: MoELoRAWeights | None, slot_ids: Tensor | None) -> None:
    expect(hidden.dim() == 2, f"hidden must be [T, D], got {tuple(hidden.shape)}")
    expect(hidden.dtype in FLOAT_DTYPES, f"hidden must be fp32/fp16/bf16, got {hidden.dtype}")
    t, d = hidden.shape
    expect(w_down.dim() == 3 and w_down.shape[1] == d,
           f"w_down must be [E, D={d}, I], got {tuple(w_down.shape)}")
    e, _, i = w_down.shape
    expect(tuple(w_gate_up.shape) == (e, 2 * i, d),
           f"w_gate_up must be [E, 2I, D] = {(e, 2 * i, d)}, got {tuple(w_gate_up.shape)}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        expect(w.dtype == hidden.dtype, f"{name} dtype {w.dtype} must match hidden's {hidden.dtype}")
        expect(w.device == hidden.device, f"{name} must live on {hidden.device}, got {w.device}")
    expect(topk_ids.dim() == 2 and topk_ids.shape[0] == t,
           f"topk_ids must be [T={t}, K], got {tuple(topk_ids.shape)}")
    expect(not topk_ids.is_floating_point(), f"topk_ids must be integer, got {topk_ids.dtype}")
    expect(tuple(topk_weights.shape) == tuple(topk_ids.shape),
           f"topk_weights must be {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
    expect(topk_weights.is_floating_point(), f"topk_weights must be float, got {topk_weights.dtype}")
    if lora is None:
        return
    expect(slot_ids is not None, "slot_ids [T] is required when lora is given")
    _check_slot_ids(slot_ids, t, hidden.device)
    expect(tuple(lora.gate_up_a.shape[1:2]) == (e,) and lora.gate_up_a.shape[3] == d,
           f"lora.gate_up_a must be [S, E={e}, 2R, D={d}], got {tuple(lora.gate_up_a.shape)}")
    expect(lora.down_a.shape[3] == i, f"lora.down_a must be [S, E, R, I={i}], got {tuple(lora.down_a.shape)}")
    for name in ("gate_up_a", "gate_up_b", "down_a", "down_b"):
        w = getattr(lora, name)
        expect(w.dtype == hidden.dtype, f"lora.{name} dtype {w.dtype} must match hidden's {hidden.dtype}")
        expect(w.device == hidden.device, f"lora.{name} must live on {hidden.device}, got {w.device}")


def check_dense_args(x: Tensor, out: Tensor, lora: DenseLoRAWeights | DenseLoRAGroup, slot_ids: Tensor) -> None:
    """x, out and slot_ids against a projection's pools, or a group's (a [S, *, IN], b [S, OUT, R])."""
    expect(x.dim() == 2, f"x must be [T, IN], got {tuple(x.shape)}")
    expect(x.dtype in FLOAT_DTYPES, f"x must be fp32/fp16/bf16, got {x.dtype}")
    t, n_in = x.shape
    n_out = lora.b.shape[2]  # Factors: [S, 1, OUT, R] and [S, 1, R, IN]
    expect(tuple(out.shape) == (t, n_out), f"out must be [T, OUT] = {(t, n_out)}, got {tuple(out.shape)}")
    expect(lora.a.shape[3] == n_in, f"lora.a must be [S, R, IN={n_in}], got {tuple(lora.a.shape)}")
    for name, w in (("out", out), ("lora.a", lora.a), ("lora.b", lora.b)):
        expect(w.dtype == x.dtype, f"{name} dtype {w.dtype} must match x's {x.dtype}")
        expect(w.device == x.device, f"{name} must live on {x.device}, got {w.device}")
    _check_slot_ids(slot_ids, t, x.device)


def _check_slot_ids(slot_ids: Tensor, num_tokens: int, device: torch.device) -> None:
    expect(tuple(slot_ids.shape) == (num_tokens,), f"slot_ids must be [T={num_tokens}], got {tuple(slot_ids.shape)}")
    expect(not slot_ids.is_floating_point(), f"slot_ids must be integer (int32), got {slot_ids.dtype}")
    expect(slot_ids.device == device, f"slot_ids must live on {device}, got {slot_ids.device}")
