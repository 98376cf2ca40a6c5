"""The padded slot layout of SlotPools (lora_layout="slots"): every slot a whole image at max rank
on every target, slot s in row s of the storage [S, slot_numel], each pool a strided view.

Its factors are expert-major and rank-contiguous, which the decode kernels read fastest; the
heap (engine.lora.slots) lays each adapter's experts out the same way at the adapter's rank
rounded up to 16, and measured as fast (H200, 48 layers, 16 rank-16 adapters, batch 64: a decode
step of 20.95 against 21.07 ms; RESULTS.md). Rank-major heap factors had taken 23.9 against 21.3.

S = slots, R = max rank, E = experts, D = hidden, I = expert intermediate.
"""
import math

from torch import Tensor

import kernels
from engine.lora.adapter import LoRAAdapter


def slot_shapes(plan: list, r: int) -> list[tuple[tuple, tuple[int, ...]]]:
    """(key, per-slot shape) of every pool tensor, in row order. A layer's q/k/v keep their A's
    side by side, then their B's, so the three are one group view (one launch for all three)."""
    shapes = []
    for p, (kind, key, dims) in enumerate(plan):
        if kind == "moe":
            e, i, d = dims
            shapes += [((p, name), shape) for name, shape in
                       (("gate_up_a", (e, 2 * r, d)), ("gate_up_b", (e, 2 * i, r)),
                        ("down_a", (e, r, i)), ("down_b", (e, d, r)))]
        elif key[1] == "q_proj":  # q, k, v: plan entries p, p + 1, p + 2
            shapes += [((p + h, "a"), (r, plan[p + h][2][1])) for h in range(3)]
            shapes += [((p + h, "b"), (plan[p + h][2][0], r)) for h in range(3)]
        elif key[1] == "o_proj":
            out_f, in_f = dims
            shapes += [((p, "a"), (r, in_f)), ((p, "b"), (out_f, r))]
    return shapes


def slot_numel(plan: list, r: int) -> int:
    return sum(math.prod(shape) for _, shape in slot_shapes(plan, r))


def carve(plan: list, rows: Tensor, ranks: Tensor, r: int) -> tuple[dict, dict, dict]:
    """Pools over `rows` [S', slot_numel] and `ranks` [P, S'] (the device pools, or a host image):
    o by (layer, name) and every dense projection by key (for packing), MoE by layer, q/k/v
    groups by layer."""
    views, starts, offset = {}, {}, 0
    for key, shape in slot_shapes(plan, r):
        n = math.prod(shape)
        views[key] = rows[:, offset:offset + n].view(rows.shape[0], *shape)  # slot stride = row
        starts[key] = offset
        offset += n
    dense, moe, groups = {}, {}, {}
    for p, (kind, key, dims) in enumerate(plan):
        if kind == "dense":
            dense[key] = kernels.DenseLoRAWeights(views[(p, "a")], views[(p, "b")], ranks[p])
        else:
            moe[key] = kernels.MoELoRAWeights(*(views[(p, n)] for n in ("gate_up_a", "gate_up_b", "down_a", "down_b")),
                                              ranks[p])
        if kind == "dense" and key[1] == "q_proj":
            sections = tuple(plan[p + h][2][0] for h in range(3))
            a0, b0, in_f = starts[(p, "a")], starts[(p, "b")], dims[1]
            a = rows[:, a0:a0 + 3 * r * in_f].view(rows.shape[0], 3 * r, in_f)
            b = rows[:, b0:b0 + sum(sections) * r].view(rows.shape[0], sum(sections), r)
            groups[key[0]] = kernels.DenseLoRAGroup(a, b, ranks[p:p + 3], sections)
    return dense, moe, groups


def fill(dense: dict, moe: dict, adapter: LoRAAdapter, r: int) -> None:
    """Copy the adapter's factors into slot 0 of freshly zeroed pools (a host image)."""
    for key, f in adapter.dense.items():
        pool = dense[key]
        pool.a.padded[0, :f.rank].copy_(f.a)
        pool.b.padded[0, :, :f.rank].copy_(f.b)
        pool.ranks[0] = f.rank
    for layer, pool in moe.items():
        inter, ranks = pool.down_a.shape[3], [0]
        for module, a_row, b_rows in (("gate", 0, slice(0, inter)), ("up", r, slice(inter, 2 * inter))):
            f = adapter.moe.get((layer, module))
            if f is not None:
                pool.gate_up_a.padded[0, :, a_row:a_row + f.rank].copy_(f.a)
                pool.gate_up_b.padded[0, :, b_rows, :f.rank].copy_(f.b)
                ranks.append(f.rank)
        f = adapter.moe.get((layer, "down"))
        if f is not None:
            pool.down_a.padded[0, :, :f.rank].copy_(f.a)
            pool.down_b.padded[0, :, :, :f.rank].copy_(f.b)
            ranks.append(f.rank)
        pool.ranks[0] = max(ranks)
