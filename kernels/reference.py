"""Plain-torch references of the kernel ops: the CPU path, and the twins of the Triton launchers.

Shape legend: T = tokens, K = top-k, E = experts, S = adapter slots, R = max rank,
D = hidden, I = expert intermediate, IN/OUT = dense projection sizes.
Math runs in fp32 and the result is cast to the input dtype once, at the end.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.checks import check_dense_args, check_moe_args
from kernels.weights import DenseLoRAGroup, DenseLoRAWeights, MoELoRAWeights


def fused_moe_ref(hidden: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_weights: Tensor,
                  topk_ids: Tensor, lora: MoELoRAWeights | None = None,
                  slot_ids: Tensor | None = None) -> Tensor:
    """Mixture-of-experts MLP with per-token LoRA deltas, in plain torch.

    Semantics:
        g, u = x @ Wgu[e, :I].T + dg, x @ Wgu[e, I:].T + du     (dg, du: slot s's gate/up LoRA)
        y_k = (silu(g) * u) @ Wd[e].T + (silu(g) * u) @ Ad[s,e].T @ Bd[s,e].T
        out[t] = sum_k topk_weights[t, k] * y_k      with e = topk_ids[t, k], s = slot_ids[t]
        dg = (x @ Agu[s,e,:R].T) @ Bgu[s,e,:I].T, du = (x @ Agu[s,e,R:].T) @ Bgu[s,e,I:].T;
        a token with s = -1 (or lora=None) gets no delta, bitwise equal to a run without LoRA.

    Args:
        hidden: [T, D] fp32/fp16/bf16.
        w_gate_up: [E, 2I, D], rows [0, I) gate, [I, 2I) up; same dtype as hidden.
        w_down: [E, D, I]; same dtype as hidden.
        topk_weights: [T, K] float (renormalised or not, as the model family wants).
        topk_ids: [T, K] integer expert ids in [0, E).
        lora: MoELoRAWeights of S slots, or None.
        slot_ids: [T] int32 slot of each token, -1 for none; required when lora is given.
    Returns:
        [T, D] in hidden.dtype.
    """
    check_moe_args(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)
    num_tokens, top_k = topk_ids.shape
    inter = w_down.shape[2]
    out = torch.zeros(num_tokens, top_k, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    x_all = hidden.float()  # [T, D]
    ranks = _ranks(lora) if lora is not None else []  # one host read, not one per (expert, slot)
    for e in torch.unique(topk_ids).tolist():
        tok, kk = torch.nonzero(topk_ids == e, as_tuple=True)  # routed rows of expert e
        # The base GEMMs run over all T rows, a shape that does not depend on routing: BLAS
        # picks its blocking by shape, so a row's bits would otherwise follow how many rows
        # share its expert, which other tokens' adapters change (rule 3 on CPU).
        gu = (x_all @ w_gate_up[e].float().T)[tok]  # [n, 2I]
        x = x_all[tok]  # [n, D]
        pairs = _slot_groups(slot_ids, tok) if lora is not None else []
        for s, rows in pairs:
            r = ranks[s]
            for h, cols in enumerate((slice(0, inter), slice(inter, 2 * inter))):  # gate, up
                a = lora.gate_up_a.view(s, h, r, hidden.shape[1])[e].float()  # [r, D]
                b = lora.gate_up_b.view(s, h, inter, r)[e].float()  # [I, r]
                gu[rows, cols] += (x[rows] @ a.T) @ b.T
        act = F.silu(gu[:, :inter]) * gu[:, inter:]  # [n, I]
        act_all = torch.zeros(num_tokens, inter, dtype=torch.float32, device=hidden.device)
        act_all[tok] = act
        y = (act_all @ w_down[e].float().T)[tok]  # [n, D]
        for s, rows in pairs:
            r = ranks[s]
            a, b = lora.down_a.view(s, 0, r, inter)[e].float(), lora.down_b.view(s, 0, hidden.shape[1], r)[e].float()
            y[rows] += (act[rows] @ a.T) @ b.T
        out[tok, kk] = y * topk_weights[tok, kk].float()[:, None]
    return out.sum(dim=1).to(hidden.dtype)


def _ranks(lora: MoELoRAWeights | DenseLoRAWeights) -> list[int]:
    """Each slot's rank (a host read): the rows of A and columns of B that hold its adapter."""
    return [min(r, lora.max_rank) for r in lora.ranks.tolist()]


def _slot_groups(slot_ids: Tensor, tok: Tensor) -> list[tuple[int, Tensor]]:
    """(slot, row indices into tok) for each adapter slot present among tokens tok."""
    slots = slot_ids[tok]
    return [(s, torch.nonzero(slots == s, as_tuple=True)[0])
            for s in torch.unique(slots).tolist() if s >= 0]


def lora_linear_ref_(x: Tensor, out: Tensor, lora: DenseLoRAWeights, slot_ids: Tensor) -> Tensor:
    """Adds each token's LoRA delta of a dense projection to out, in place.

    Semantics:
        out[t] += (x[t] @ a[s].T) @ b[s].T   with s = slot_ids[t]; rows with s = -1 untouched.

    Args:
        x: [T, IN] fp32/fp16/bf16.
        out: [T, OUT] base output of the projection, same dtype as x; updated in place.
        lora: DenseLoRAWeights of S slots (a [S, R, IN], b [S, OUT, R], as stacks or Factors).
        slot_ids: [T] int32, -1 for no adapter.
    Returns:
        out.
    """
    check_dense_args(x, out, lora, slot_ids)
    all_rows, ranks = torch.arange(x.shape[0], device=x.device), _ranks(lora)
    for s, rows in _slot_groups(slot_ids, all_rows):
        r = ranks[s]
        a, b = lora.a.view(s, 0, r, lora.in_features)[0], lora.b.view(s, 0, lora.out_features, r)[0]
        delta = (x[rows].float() @ a.float().T) @ b.float().T
        out[rows] = (out[rows].float() + delta).to(out.dtype)
    return out


def lora_group_ref_(x: Tensor, out: Tensor, lora: DenseLoRAGroup, slot_ids: Tensor) -> Tensor:
    """Adds each token's LoRA deltas of a group of projections to their columns of out, in place.

    Semantics:
        out[t, off_h:off_h + N_h] += (x[t] @ a_h[s].T) @ b_h[s].T for each projection h, s = slot_ids[t];
        rows with s = -1 untouched (see DenseLoRAGroup for the layout of a and b).
    Args:
        x: [T, IN] fp32/fp16/bf16; out: [T, N] with N = sum(lora.sections), same dtype.
        lora: DenseLoRAGroup of S slots; slot_ids: [T] int32, -1 for no adapter.
    Returns:
        out.
    """
    for h in range(lora.num_projections):
        lora_linear_ref_(x, out[:, lora.offset(h):lora.offset(h + 1)], lora.dense(h), slot_ids)
    return out
