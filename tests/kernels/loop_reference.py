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
                r, d = int(lora.ranks[s]), x.shape[1]
                a = [lora.gate_up_a.view(s, h, r, d)[e].double() for h in (0, 1)]  # gate's, up's
                b = [lora.gate_up_b.view(s, h, inter, r)[e].double() for h in (0, 1)]
                gate = gate + (xe @ a[0].T) @ b[0].T
                up = up + (xe @ a[1].T) @ b[1].T
            h = gate / (1.0 + torch.exp(-gate)) * up
            y = h @ w_down[e].double().T
            if s >= 0:
                da, db = lora.down_a.view(s, 0, r, inter)[e], lora.down_b.view(s, 0, x.shape[1], r)[e]
                y = y + (h @ da.double().T) @ db.double().T
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
        a, b = lora.a.view(s, 0, r, x.shape[1])[0], lora.b.view(s, 0, out.shape[1], r)[0]
        res[t] += b.double() @ (a.double() @ x[t].double())
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


def make_group(gen, num_slots, n_in, sections, ranks, dtype, pad=0.0, heap=False):
    """(parts, group): a projection's DenseLoRAWeights for each section (ranks[h] its slots' ranks,
    `pad` past them), and the q/k/v-like DenseLoRAGroup of them, as padded stacks or, with heap, as
    the adapter heap lays them out (group_in_heap)."""
    from kernels import DenseLoRAGroup
    parts = [make_dense_lora(gen, num_slots, n_in, n, ranks[h], dtype, pad=pad) for h, n in enumerate(sections)]
    if heap:
        return parts, group_in_heap(parts, sections)
    return parts, DenseLoRAGroup(torch.cat([q.a.padded for q in parts], 1), torch.cat([q.b.padded for q in parts], 1),
                                 torch.stack([q.ranks for q in parts]), sections)


def rel_err(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| in fp64 (NaN never passes a <= check)."""
    got, want = got.double(), want.double()
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want).clamp_min(1e-30))


def _heap(blocks: list[list[Tensor]], dtype) -> tuple[Tensor, Tensor]:
    """One flat NaN-filled buffer holding blocks[row][slot] (slots in reverse order, each at a
    multiple of OFFSET_UNIT with at least a unit of NaN around it) and the offsets [rows, S]
    where each starts, in OFFSET_UNITs."""
    from kernels.weights import OFFSET_UNIT as unit
    num_rows, num_slots = len(blocks), len(blocks[0])
    total = sum((b.numel() // unit + 2) * unit for row in blocks for b in row) + unit
    storage = torch.full((total,), float("nan"), dtype=dtype)
    offsets = torch.zeros(num_rows, num_slots, dtype=torch.int64)
    at = unit
    for s in reversed(range(num_slots)):
        for row in range(num_rows):
            block = blocks[row][s]
            storage[at:at + block.numel()] = block.reshape(-1)
            offsets[row, s] = at // unit
            at += (block.numel() // unit + 2) * unit
    return storage, offsets


def share_outer(lora: MoELoRAWeights, slots: tuple[int, ...]) -> MoELoRAWeights:
    """The same padded slots, with slots `slots` made shared-outer: every expert's gate/up A and
    down B replaced by expert 0's."""
    ga, gb, da, db = (f.padded.clone() for f in (lora.gate_up_a, lora.gate_up_b, lora.down_a, lora.down_b))
    for s in slots:
        ga[s] = ga[s, :1]
        db[s] = db[s, :1]
    return MoELoRAWeights(ga, gb, da, db, lora.ranks)


def moe_lora_in_heap(lora: MoELoRAWeights, shared: tuple[int, ...] = (), rank_unit: int = 16) -> MoELoRAWeights:
    """The same adapters laid out as the engine's adapter heap lays them: each slot's experts as a
    padded slot at its rank rounded up to rank_unit (16, or 8 with the factors' RANK_UNIT_8 bit;
    A [E, r16, cols], B [E, rows, r16]: ranked
    factors), anywhere in one buffer, with NaN between and around the slots and in each slot's
    rows and columns past its rank (a read outside a slot's ranks shows). Slots in `shared`
    (made by share_outer) hold gate/up A and down B once, expert 0's, their rank negated in
    those factors' tables (SHAREABLE): a read at another expert's place would meet NaN."""
    from kernels.weights import OFFSET_UNIT, RANK_UNIT_8, RANKED_COLS, RANKED_ROWS, SHAREABLE, Factor
    num_slots, e, two_r, d = lora.gate_up_a.shape
    big_r, inter = two_r // 2, lora.down_a.shape[3]
    ranks = [int(r) for r in lora.ranks]
    r16 = [-(-r // rank_unit) * rank_unit for r in ranks]
    unit = RANK_UNIT_8 if rank_unit == 8 else 0
    ga, gb, da, db = (f.padded for f in (lora.gate_up_a, lora.gate_up_b, lora.down_a, lora.down_b))
    ga = [ga[s, :1] if s in shared else ga[s] for s in range(num_slots)]
    db = [db[s, :1] if s in shared else db[s] for s in range(num_slots)]

    def ranked(x: Tensor, dim: int, s: int) -> Tensor:
        """x's first ranks[s] entries along dim, NaN up to r16[s]."""
        shape = list(x.shape)
        shape[dim] = r16[s]
        out = torch.full(shape, float("nan"), dtype=x.dtype)
        out.narrow(dim, 0, ranks[s]).copy_(x.narrow(dim, 0, ranks[s]))
        return out

    blocks = [[torch.stack([ranked(ga[s][:, :big_r], 1, s), ranked(ga[s][:, big_r:], 1, s)], 1)
               for s in range(num_slots)],  # [E or 1, 2, r16, D]: gate's rows, then up's, per expert
              [ranked(gb[s], 2, s) for s in range(num_slots)],
              [ranked(da[s], 1, s) for s in range(num_slots)],
              [ranked(db[s], 2, s) for s in range(num_slots)]]
    storage, offsets = _heap(blocks, gb.dtype)
    up_a = offsets[0] + torch.tensor(r16) * d // OFFSET_UNIT  # up's A: r16 rows into each expert's block
    gate_up_a = torch.stack([offsets[0], up_a])
    shapes = [(num_slots, e, 2 * big_r, d), (num_slots, e, 2 * inter, big_r), (num_slots, e, big_r, inter),
              (num_slots, e, d, big_r)]
    signed = torch.tensor([-r if s in shared else r for s, r in enumerate(ranks)], dtype=torch.int32)
    return MoELoRAWeights(
        Factor(storage, gate_up_a, 2 * d, d, 1, 0, shapes[0], offset_unit=16, ranked=RANKED_ROWS | SHAREABLE | unit,
               ranks=signed),
        Factor(storage, offsets[1:2], 2 * inter, 1, 1, inter, shapes[1], offset_unit=16, ranked=RANKED_COLS | unit,
               ranks=lora.ranks),
        Factor(storage, offsets[2:3], inter, inter, 1, 0, shapes[2], offset_unit=16, ranked=RANKED_ROWS | unit,
               ranks=lora.ranks),
        Factor(storage, offsets[3:4], d, 1, 1, d, shapes[3], offset_unit=16, ranked=RANKED_COLS | SHAREABLE | unit,
               ranks=signed),
        lora.ranks, shared_halves=bool(shared))


def factor_to(f, device):
    """A Factor (of a heap or a padded stack) moved to `device`, the same layout."""
    from kernels.weights import Factor
    return Factor(f.data.to(device), f.offsets.to(device), f.expert_stride, f.row_stride, f.col_stride,
                  f.split_rows, f.shape, offset_unit=f.offset_unit, ranked=f.ranked,
                  ranks=None if f.ranks is None else f.ranks.to(device))


def moe_lora_to(lora: MoELoRAWeights, device) -> MoELoRAWeights:
    """moe_lora_in_heap's pools (or padded stacks) moved to `device`, the same layout."""
    moved = [factor_to(f, device) for f in (lora.gate_up_a, lora.gate_up_b, lora.down_a, lora.down_b)]
    return MoELoRAWeights(*moved, lora.ranks.to(device), lora.shared_halves)


def group_to(group, device):
    """group_in_heap's group (or a padded one) moved to `device`, the same layout."""
    from kernels import DenseLoRAGroup
    return DenseLoRAGroup(factor_to(group.a, device), factor_to(group.b, device), group.ranks.to(device),
                          group.sections)


def group_in_heap(parts: list[DenseLoRAWeights], sections: tuple[int, ...]):
    """A q/k/v-like group of the padded projections `parts` in the heap layout: each
    projection's A [r_h, IN] on its own, one B transposed [max_h r_h, N] per slot, whose
    columns past a projection's rank hold NaN (never read), NaN around everything."""
    from kernels import DenseLoRAGroup
    from kernels.weights import Factor
    num_slots, big_r, n_in = parts[0].a.shape[0], parts[0].max_rank, parts[0].in_features
    ranks = [[int(r) for r in p.ranks] for p in parts]
    n = sum(sections)
    a_blocks = [[p.a.padded[s, :ranks[h][s]] for s in range(num_slots)] for h, p in enumerate(parts)]
    b_blocks = []
    for s in range(num_slots):
        r_g = max(r[s] for r in ranks)
        b = torch.full((r_g, n), float("nan"), dtype=parts[0].a.dtype)
        for h, p in enumerate(parts):
            b[:ranks[h][s], sum(sections[:h]):sum(sections[:h + 1])] = p.b.padded[s, :, :ranks[h][s]].T
        b_blocks.append(b)
    storage, offsets = _heap([*a_blocks, b_blocks], parts[0].a.dtype)
    heads = len(parts)
    a = Factor(storage, offsets[:heads], 0, n_in, 1, 0, (num_slots, 1, heads * big_r, n_in), offset_unit=16)
    b = Factor(storage, offsets[heads:], 0, 1, n, 0, (num_slots, 1, n, big_r), offset_unit=16)
    return DenseLoRAGroup(a, b, torch.stack([p.ranks for p in parts]), sections)
