"""moeplex kernels: fused MoE and LoRA over virtual experts, Triton on CUDA, torch elsewhere.

Packages by role: `kernels.moe` (routing, alignment, the grouped GEMM of base, shrink and expand,
the row path, the launchers, and the ops below) and `kernels.attention` (paged decode and prefill
attention, fused norms and rotary). Shared here: argument checks, errors, the weight pools, the
torch references and the Triton-or-torch switch. This module only re-exports.
"""
from kernels.dispatch import use_triton
from kernels.errors import KernelInputError
from kernels.moe.align import VirtualLayout, moe_align_virtual
from kernels.moe.ops import dense_lora_layout, fused_moe, linear_lora, lora_group_linear_, lora_linear_
from kernels.reference import fused_moe_ref, lora_group_ref_, lora_linear_ref_
from kernels.weights import DenseLoRAGroup, DenseLoRAWeights, MoELoRAWeights

__all__ = [
    "DenseLoRAGroup", "DenseLoRAWeights", "KernelInputError", "MoELoRAWeights", "VirtualLayout", "dense_lora_layout",
    "fused_moe", "fused_moe_ref", "linear_lora", "lora_group_linear_", "lora_group_ref_", "lora_linear_", "lora_linear_ref_",
    "moe_align_virtual", "use_triton",
]
