"""moeplex kernels: fused MoE and LoRA over virtual experts, Triton on CUDA, torch elsewhere.

Each public op checks its arguments, then runs the Triton launcher when `use_triton` says so
(a CUDA tensor, or MOEPLEX_TRITON=1 with TRITON_INTERPRET=1 in tests) and its `*_ref` twin
in plain torch otherwise.
"""
from torch import Tensor

from kernels.align import VirtualLayout, moe_align_virtual
from kernels.dispatch import use_triton
from kernels.errors import KernelInputError
from kernels.reference import fused_moe_ref, lora_linear_ref_
from kernels.weights import DenseLoRAWeights, MoELoRAWeights

__all__ = [
    "DenseLoRAWeights", "KernelInputError", "MoELoRAWeights", "VirtualLayout", "fused_moe",
    "fused_moe_ref", "lora_linear_", "lora_linear_ref_", "moe_align_virtual", "use_triton",
]



def fused_moe(hidden: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_weights: Tensor,
              topk_ids: Tensor, lora: MoELoRAWeights | None = None,
              slot_ids: Tensor | None = None) -> Tensor:
    """Mixture-of-experts MLP with per-token LoRA deltas over virtual experts.

    Semantics and Args: as `fused_moe_ref` (returns [T, D] in hidden.dtype; tokens with
    slot -1 bitwise equal to lora=None).
    """
    if use_triton(hidden):
        from kernels.moe_launch import fused_moe_triton
        return fused_moe_triton(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)
    return fused_moe_ref(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)


def lora_linear_(x: Tensor, out: Tensor, lora: DenseLoRAWeights, slot_ids: Tensor) -> Tensor:
    """out[t] += (x[t] @ a[s].T) @ b[s].T with s = slot_ids[t] (-1: untouched); returns out.

    Semantics and Args: as `lora_linear_ref_`. Dense projections run through the same
    virtual-expert kernels as the MoE layers, with one expert.
    """
    if use_triton(x):
        from kernels.moe_launch import lora_linear_triton_
        return lora_linear_triton_(x, out, lora, slot_ids)
    return lora_linear_ref_(x, out, lora, slot_ids)
