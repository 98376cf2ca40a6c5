"""The public ops of kernels/moe: each checks its arguments, then runs the Triton launcher when
`use_triton` says so (a CUDA tensor, or MOEPLEX_TRITON=1 with TRITON_INTERPRET=1 in tests) and
its `*_ref` twin in plain torch otherwise. `kernels` re-exports them."""
import torch.nn.functional as F
from torch import Tensor

from kernels.checks import check_dense_args
from kernels.dispatch import use_triton
from kernels.errors import expect
from kernels.moe.align import VirtualLayout
from kernels.reference import fused_moe_ref, lora_group_ref_, lora_linear_ref_
from kernels.weights import DenseLoRAGroup, DenseLoRAWeights, MoELoRAWeights


def fused_moe(hidden: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_weights: Tensor,
              topk_ids: Tensor, lora: MoELoRAWeights | None = None,
              slot_ids: Tensor | None = None) -> Tensor:
    """Mixture-of-experts MLP with per-token LoRA deltas over virtual experts.

    Semantics:
        out[t] = sum_k topk_weights[t, k] * down_e(silu(gate_e(x) + dgate) * (up_e(x) + dup)) + ddown
        with e = topk_ids[t, k] and the deltas of slot s = slot_ids[t] (see `fused_moe_ref`);
        a token with s = -1 is bitwise equal to a call with lora=None. No host sync on CUDA.
    Args:
        hidden: [T, D] fp32/fp16/bf16.
        w_gate_up: [E, 2I, D] (rows [0, I) gate, [I, 2I) up); w_down: [E, D, I]; hidden's dtype.
        topk_weights: [T, K] float; topk_ids: [T, K] int32/int64 in [0, E) (not range-checked
            on the GPU: that would need a host sync).
        lora: MoELoRAWeights or None; slot_ids: [T] int, -1 for no adapter.
    Returns:
        [T, D] in hidden.dtype.
    """
    if use_triton(hidden):
        from kernels.moe.launch import fused_moe_triton
        return fused_moe_triton(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)
    return fused_moe_ref(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)


def lora_linear_(x: Tensor, out: Tensor, lora: DenseLoRAWeights, slot_ids: Tensor,
                 layout: VirtualLayout | None = None) -> Tensor:
    """Adds each token's LoRA delta of a dense projection to out, in place; returns out.

    Semantics:
        out[t] += (x[t] @ a[s].T) @ b[s].T with s = slot_ids[t]; rows with s = -1 untouched.
        Runs through the same virtual-expert kernels as the MoE layers, with one expert.
    Args:
        x: [T, IN] fp32/fp16/bf16; out: [T, OUT], same dtype.
        lora: DenseLoRAWeights (a [S, R, IN], b [S, OUT, R], ranks [S] int32).
        slot_ids: [T] int, -1 for no adapter.
        layout: `dense_lora_layout(slot_ids, S)`, to share one alignment between the
            projections of a step (the Triton path computes it when None; torch ignores it).
    """
    if use_triton(x):
        check_dense_args(x, out, lora, slot_ids)
        from kernels.moe.dense_launch import dense_group_triton_
        return dense_group_triton_(x, out, DenseLoRAGroup.of(lora), slot_ids, layout)
    return lora_linear_ref_(x, out, lora, slot_ids)


def lora_group_linear_(x: Tensor, out: Tensor, lora: DenseLoRAGroup, slot_ids: Tensor,
                       layout: VirtualLayout | None = None) -> Tensor:
    """Adds each token's LoRA deltas of H projections that share their input (q/k/v) to out,
    whose columns hold the projections side by side; in place; returns out.

    Semantics:
        out[t, off_h:off_h + N_h] += (x[t] @ a_h[s].T) @ b_h[s].T for each projection h, with
        s = slot_ids[t]; rows with s = -1 untouched. On Triton, for the whole group: one launch
        by token for a few tokens of padded stacks (kernels.moe.dense_launch.dense_path), else one
        shrink and one expand launch over rows by slot.
    Args:
        x: [T, IN] fp32/fp16/bf16; out: [T, N], N = sum(lora.sections), same dtype.
        lora: DenseLoRAGroup (a [S, H*R, IN], b [S, N, R], ranks [H, S] int32).
        slot_ids: [T] int, -1 for no adapter.
        layout: `dense_lora_layout(slot_ids, S)`, shared by the step's projections (as in lora_linear_).
    """
    check_dense_args(x, out, lora, slot_ids)  # the group's a [S, H*R, IN] and b [S, N, R] as one
    if use_triton(x):
        from kernels.moe.dense_launch import dense_group_triton_
        return dense_group_triton_(x, out, lora, slot_ids, layout)
    return lora_group_ref_(x, out, lora, slot_ids)


def linear_lora(x: Tensor, weight: Tensor, bias: Tensor | None, lora: "DenseLoRAGroup | DenseLoRAWeights | None",
                slot_ids: Tensor | None, layout: VirtualLayout | None = None) -> Tensor:
    """F.linear(x, weight, bias) plus each token's LoRA delta of the projection (lora_linear_'s), or
    of the group (lora_group_linear_'s, weight holding the group's rows side by side); returns the
    new output. lora or slot_ids None: the base alone.

    On the Triton path: cuBLAS, then the delta's launches; cuBLAS lets no launch in early, so
    programmatic dependent launch (kernels/pdl.py) only hides the first one's launch latency. With
    dense_launch.SIDE_STREAM (off by default) the shrink runs on a second stream beside cuBLAS
    instead (linear_group_side_). With kernels.moe.dense_gemm.ENABLED
    (off by default: slower where measured), at decode size the base GEMM, the shrink and the expand
    are one launch instead, with LoRA or without (the same base sums either way, so a token without
    an adapter stays bitwise what a call without LoRA gives)."""
    group = None
    if lora is not None and slot_ids is not None:
        group = lora if isinstance(lora, DenseLoRAGroup) else DenseLoRAGroup.of(lora)
        expect(weight.dim() == 2 and weight.shape[0] == group.b.shape[2],
               f"weight must be [OUT={group.b.shape[2]}, IN], got {tuple(weight.shape)}")
        check_dense_args(x, x.new_empty(()).expand(x.shape[0], weight.shape[0]), group, slot_ids)  # out's shape
    if use_triton(x) and x.dim() == 2 and weight.dim() == 2:
        from kernels.moe.dense_gemm import dense_lora_gemm, fused_ok
        sections = group.sections if group is not None else (weight.shape[0],)
        if fused_ok(x.shape[0], sections) and x.dtype == weight.dtype:
            return dense_lora_gemm(x, weight, bias, group, slot_ids if group is not None else None, layout)
    if group is not None and use_triton(x):
        from kernels.moe.dense_launch import linear_group_side_, side_stream_ok
        if side_stream_ok(x, group, layout):
            return linear_group_side_(x, weight, bias, group, layout)
    out = F.linear(x, weight, bias)
    if group is None:
        return out
    if use_triton(x):  # the base GEMM writes none of the delta's inputs: it may read ahead
        from kernels.moe.dense_launch import dense_group_triton_
        return dense_group_triton_(x, out, group, slot_ids, layout, pdl_early=True)
    return lora_group_ref_(x, out, group, slot_ids)


def dense_lora_layout(slot_ids: Tensor, num_slots: int, stacked: bool = False) -> VirtualLayout | None:
    """The rows-by-slot layout lora_linear_ and linear_lora take; None where nothing would read it
    (off the Triton path, or at sizes where dense LoRA runs by row without a layout: up to
    DENSE_ROWS_MAX_TOKENS tokens on the adapter heap, none by default, or
    DENSE_ROWS_MAX_TOKENS_STACKED on padded stacks (stacked: Factor.stacked), unless linear_lora's
    fused launch, whose shrink reads it, takes that size)."""
    if not use_triton(slot_ids):
        return None
    from kernels.moe import dense_gemm
    from kernels.moe.dense_launch import MAX_GROUP_ROWS_PROJECTIONS, dense_layout, dense_path
    fused = dense_gemm.ENABLED and slot_ids.shape[0] <= dense_gemm.FUSED_MAX_TOKENS
    if not fused and dense_path(slot_ids.shape[0], MAX_GROUP_ROWS_PROJECTIONS, stacked) == "rows":  # every q/k/v and o group
        return None
    return dense_layout(slot_ids, num_slots)
