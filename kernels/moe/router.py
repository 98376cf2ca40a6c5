"""MoE router: softmax over experts, top-k and optional renormalisation in one Triton launch.

T = tokens, E = experts, K = experts per token.
The torch sequence it replaces (softmax, topk's gather + sort, sum, divide, cast) is ~6 launches
a layer; in a decode step those launches cost more than the arithmetic. One program here owns
a few rows: fp32 softmax of each, then K rounds of argmax-and-mask.

Tie rule: among experts of exactly equal probability the lowest expert index is taken first
(torch.topk leaves the order of ties unspecified). Random logits have no ties; bf16 logits can.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.checks import FLOAT_DTYPES
from kernels.dispatch import use_triton
from kernels.errors import expect

MAX_EXPERTS = 1024  # a whole row stays in registers: [BLOCK_T, next_pow2(E)] fp32 per program
_TAKEN = -1.0  # written over a chosen probability (probabilities are >= 0, so never chosen again)


@triton.jit(do_not_specialize=["num_tokens"])  # one compile for every token count
def _route_topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts,
                       stride_lt, stride_le, stride_wt, stride_it,
                       TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, TAKEN: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < num_tokens
    in_e = offs_e < num_experts
    # [BLOCK_T, BLOCK_E] logits in fp32; padding columns -inf so they add exp(-inf) = 0
    ptrs = logits_ptr + rows[:, None] * stride_lt + offs_e[None, :] * stride_le
    x = tl.load(ptrs, mask=row_mask[:, None] & in_e[None, :], other=float("-inf")).to(tl.float32)
    # padding rows are all -inf: give them 0 so they stay finite (never stored)
    x = tl.where(row_mask[:, None], x, 0.0)
    num = tl.exp(x - tl.max(x, axis=1)[:, None])
    probs = num / tl.sum(num, axis=1)[:, None]
    # padding columns rank below taken ones, so K <= E never reaches them
    probs = tl.where(in_e[None, :], probs, float("-inf"))
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k in range(TOP_K):
        # largest probability of each row, lowest index on exact ties
        best, idx = tl.max(probs, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # a NaN row still yields ids in [0, E): fused_moe does not range-check them
        idx = tl.minimum(idx, num_experts - 1)
        top_w = tl.where(offs_k[None, :] == k, best[:, None], top_w)
        top_i = tl.where(offs_k[None, :] == k, idx[:, None].to(tl.int64), top_i)
        total += best
        probs = tl.where(offs_e[None, :] == idx[:, None], TAKEN, probs)
    if RENORMALIZE:
        top_w = top_w / total[:, None]
    out_mask = row_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + rows[:, None] * stride_wt + offs_k[None, :],
             top_w.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + rows[:, None] * stride_it + offs_k[None, :], top_i, mask=out_mask)


def _check_route(logits: Tensor, top_k: int, out_dtype: torch.dtype) -> None:
    expect(logits.dim() == 2, f"logits must be [T, E], got {tuple(logits.shape)}")
    expect(logits.dtype in FLOAT_DTYPES, f"logits must be fp32/fp16/bf16, got {logits.dtype}")
    num_experts = logits.shape[1]
    expect(isinstance(top_k, int) and not isinstance(top_k, bool) and 1 <= top_k <= num_experts,
           f"top_k must be an int in [1, E={num_experts}], got {top_k!r}")
    expect(out_dtype in FLOAT_DTYPES, f"out_dtype must be fp32/fp16/bf16, got {out_dtype}")


def _launch_config(num_tokens: int, num_experts: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): about one row per warp, so each row's reductions stay in a warp."""
    block_t = min(4, triton.next_power_of_2(max(num_tokens, 1)))
    return block_t, block_t


def launch_route_topk(logits: Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype,
                      block_t: int, num_warps: int) -> tuple[Tensor, Tensor]:
    """route_topk_triton with an explicit tile (benchmarks sweep it); arguments unchecked."""
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=out_dtype, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    _route_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, weights, ids, num_tokens, num_experts, logits.stride(0), logits.stride(1),
        weights.stride(0), ids.stride(0), TOP_K=top_k, RENORMALIZE=bool(renormalize), TAKEN=_TAKEN,
        BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=num_warps)
    return weights, ids


def route_topk_triton(logits: Tensor, top_k: int, renormalize: bool,
                      out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of `route_topk_ref`: one launch, no host sync (CUDA-graph capturable)."""
    out_dtype = logits.dtype if out_dtype is None else out_dtype
    _check_route(logits, top_k, out_dtype)
    expect(logits.shape[1] <= MAX_EXPERTS, f"the Triton router takes E <= {MAX_EXPERTS}, got {logits.shape[1]}")
    return launch_route_topk(logits, top_k, renormalize, out_dtype, *_launch_config(*logits.shape))


def route_topk_ref(logits: Tensor, top_k: int, renormalize: bool,
                   out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Torch twin of `route_topk` (SparseMoE.route's own sequence after the router GEMM)."""
    out_dtype = logits.dtype if out_dtype is None else out_dtype
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(out_dtype), ids


def route_topk(logits: Tensor, top_k: int, renormalize: bool,
               out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Each token's K most probable experts and their routing weights.

    Semantics:
        probs = softmax(logits.float(), dim=-1)
        weights, ids = topk(probs, top_k, dim=-1)          (descending, as sorted=True)
        if renormalize: weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(out_dtype), ids
        Mixtral's topk-of-logits then softmax-over-k is the renormalize=True case. Ties in
        probability go to the lowest expert index on the Triton path. No host sync on CUDA.
    Args:
        logits: [T, E] fp32/fp16/bf16 router logits (any strides); E <= 1024 on the Triton path.
        top_k: int in [1, E].
        renormalize: divide the K weights by their sum (a model's norm_topk_prob).
        out_dtype: dtype of the weights, fp32/fp16/bf16; None for logits.dtype.
    Returns:
        (weights [T, K] out_dtype, ids [T, K] int64).
    """
    out_dtype = logits.dtype if out_dtype is None else out_dtype
    _check_route(logits, top_k, out_dtype)
    if use_triton(logits):
        return route_topk_triton(logits, top_k, renormalize, out_dtype)
    return route_topk_ref(logits, top_k, renormalize, out_dtype)
