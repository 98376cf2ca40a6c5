"""Independent fp64 references for the kernel tests, and builders of random inputs.

Written apart from kernels/reference.py: rank-sliced A/B (padding never used), SiLU spelled
out, explicit loops.
"""
import math

import torch
from torch import Tensor

from kernels import DenseLoRAWeights, MoELoRAWeights

SPREADS = ("distinct", "uniform", "zipf", "identical", "skewed")


def moe_loop_ref(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora=None, slot_ids=None) -> Tensor:
    """fp64 loop over (expert, slot) groups of routed rows; returns [T, D] float64."""
    num_tokens, top_k = topk_ids.shape
    inter = w_down.shape[2]
    x = hidden.double()
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float64, device=hidden.device)
    slots = slot_ids.long() if slot_ids is not None else torch.full((num_tokens,), -1, device=hidden.device)
    if lora is None:
        slots = torch.full_like(slots, -1)
    ids = topk_ids.long()
    for e in range(w_down.shape[0]):
        for s in torch.unique(slots).tolist():
            tok, kk = torch.nonzero((ids == e) & (slots[:, None] == s), as_tuple=True)
            if tok.numel() == 0:
                continue
            xe = x[tok]
            gate = xe @ w_gate_up[e, :inter].double().T
            up = xe @ w_gate_up[e, inter:].double().T
            if s >= 0:
                r = int(lora.ranks[s])
                big_r = lora.gate_up_a.shape[2] // 2
                a, b = lora.gate_up_a[s, e].double(), lora.gate_up_b[s, e].double()
                gate = gate + (xe @ a[:r].T) @ b[:inter, :r].T
                up = up + (xe @ a[big_r:big_r + r].T) @ b[inter:, :r].T
            h = gate / (1.0 + torch.exp(-gate)) * up
            y = h @ w_down[e].double().T
            if s >= 0:
                y = y + (h @ lora.down_a[s, e, :r].double().T) @ lora.down_b[s, e, :, :r].double().T
            out.index_add_(0, tok, y * topk_weights[tok, kk].double()[:, None])
    return out


def dense_loop_ref(x, out, lora, slot_ids) -> Tensor:
    """fp64 out + per-token delta, token by token; returns [T, OUT] float64."""
    res = out.double().clone()
    for t in range(x.shape[0]):
        s = int(slot_ids[t])
        if s < 0:
            continue
        r = int(lora.ranks[s])
        res[t] += lora.b[s, :, :r].double() @ (lora.a[s, :r].double() @ x[t].double())
    return res


def make_slot_ids(spread: str, num_tokens: int, num_slots: int, gen: torch.Generator) -> Tensor:
    """Per-token slots for a spread of requests over adapters; about 1 in 5 tokens has none."""
    if spread == "distinct":
        slots = torch.arange(num_tokens) % num_slots
    elif spread == "uniform":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    elif spread == "zipf":
        probs = torch.tensor([1.0 / (i + 1) for i in range(num_slots)])
        slots = torch.multinomial(probs, num_tokens, replacement=True, generator=gen)
    elif spread == "identical":
        slots = torch.full((num_tokens,), num_slots - 1)
    elif spread == "skewed":
        slots = torch.where(torch.rand(num_tokens, generator=gen) < 0.8, 0,
                            torch.randint(0, num_slots, (num_tokens,), generator=gen))
    else:
        raise ValueError(f"unknown spread {spread}")
    none = torch.rand(num_tokens, generator=gen) < 0.2
    return torch.where(none, -1, slots).to(torch.int32)


def _randn(gen, *shape, std=1.0):
    """fp64 normal draws on the generator's device (CUDA generators keep big draws fast)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64, device=gen.device) * std


def make_moe(gen, t, d, inter, e, k, dtype, device="cpu"):
    """Random hidden, expert weights and routing (top-k of random logits, softmax weights)."""
    hidden = _randn(gen, t, d)
    w_gate_up = _randn(gen, e, 2 * inter, d, std=1 / math.sqrt(d))
    w_down = _randn(gen, e, d, inter, std=1 / math.sqrt(inter))
    logits = _randn(gen, t, e)
    topk_weights, topk_ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    cast = lambda z: z.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(hidden), cast(w_gate_up), cast(w_down), topk_weights.float().to(device),
            topk_ids.to(device=device, dtype=torch.int32))


def make_moe_lora(gen, s, e, d, inter, ranks, dtype, device="cpu", pad=0.0) -> MoELoRAWeights:
    """Random MoE LoRA slots with per-slot ranks; padding rows/cols filled with `pad`."""
    big_r = max(ranks)
    gua = _randn(gen, s, e, 2 * big_r, d, std=1 / math.sqrt(d))
    gub = _randn(gen, s, e, 2 * inter, big_r, std=0.5)
    da = _randn(gen, s, e, big_r, inter, std=1 / math.sqrt(inter))
    db = _randn(gen, s, e, d, big_r, std=0.5)
    for slot, r in enumerate(ranks):
        gua[slot, :, r:big_r] = pad
        gua[slot, :, big_r + r:] = pad
        gub[slot, :, :, r:] = pad
        da[slot, :, r:] = pad
        db[slot, :, :, r:] = pad
    cast = lambda z: z.to(device=device, dtype=dtype)  # noqa: E731
    rank_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    return MoELoRAWeights(cast(gua), cast(gub), cast(da), cast(db), rank_t)


def make_dense_lora(gen, s, n_in, n_out, ranks, dtype, device="cpu", pad=0.0) -> DenseLoRAWeights:
    big_r = max(ranks)
    a = _randn(gen, s, big_r, n_in, std=1 / math.sqrt(n_in))
    b = _randn(gen, s, n_out, big_r, std=0.5)
    for slot, r in enumerate(ranks):
        a[slot, r:] = pad
        b[slot, :, r:] = pad
    rank_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    return DenseLoRAWeights(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), rank_t)


def rel_err(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| in fp64 (NaN never passes a <= check)."""
    got, want = got.double(), want.double()
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want).clamp_min(1e-30))
