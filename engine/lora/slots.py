"""Device pools of adapter slots, one per LoRA-able projection, attached to the model's modules.

Every pool is a strided view into ONE buffer `storage` [S, slot_numel]: slot s of every layer
and projection lives in the contiguous row storage[s], so loading an adapter is one copy of
its pre-packed host image (`pack`) into that row, plus one copy of its ranks.

S = slots, R = max rank, E = experts, D = hidden, I = expert intermediate, P = pools.
"""
import math

import torch
from torch import Tensor

import kernels
from engine.errors import AdapterLoadError
from engine.lora.adapter import LoRAAdapter
from engine.models.layers import SparseMoE
from engine.models.moe_lm import MoECausalLM

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# a plan entry: ("dense", (layer, name), (OUT, IN)) or ("moe", layer, (E, I, D))
PlanEntry = tuple[str, object, tuple[int, ...]]


class SlotPools:
    """Owns every layer's slot pool; `write` copies one packed adapter into one slot (side stream on CUDA)."""

    def __init__(self, model: MoECausalLM, num_slots: int, max_rank: int):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.device = model.embed_tokens.device
        self.dtype = model.embed_tokens.dtype
        self.plan: list[PlanEntry] = []
        for i, layer in enumerate(model.layers):
            for name in ATTENTION_PROJECTIONS:
                self.plan.append(("dense", (i, name), tuple(getattr(layer.self_attn, name).weight.shape)))
            if isinstance(layer.mlp, SparseMoE):
                e, two_i, d = layer.mlp.w_gate_up.shape
                self.plan.append(("moe", i, (e, two_i // 2, d)))
        self.slot_numel = sum(math.prod(shape) for _, shape in self._slot_shapes())
        self.storage = torch.zeros(num_slots, self.slot_numel, dtype=self.dtype, device=self.device)
        self.ranks = torch.zeros(len(self.plan), num_slots, dtype=torch.int32, device=self.device)  # [P, S]
        self.dense, self.moe, self.qkv = self._carve(self.storage, self.ranks)
        for i, layer in enumerate(model.layers):
            layer.self_attn.qkv_lora = self.qkv[i]  # q/k/v; their own dense pools stay for packing
            layer.self_attn.o_proj.lora = self.dense[(i, "o_proj")]
            if i in self.moe:
                layer.mlp.lora = self.moe[i]
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def slot_bytes(self) -> int:
        return self.slot_numel * self.storage.element_size()

    def _slot_shapes(self) -> list[tuple[tuple, tuple[int, ...]]]:
        """(key, per-slot shape) of every pool tensor, in storage order. A layer's q/k/v keep
        their A's side by side, then their B's, so the three are one group view (one shrink and
        one expand launch for all three)."""
        r, shapes = self.max_rank, []
        for p, (kind, key, dims) in enumerate(self.plan):
            if kind == "moe":
                e, i, d = dims
                shapes += [((p, name), shape) for name, shape in
                           (("gate_up_a", (e, 2 * r, d)), ("gate_up_b", (e, 2 * i, r)),
                            ("down_a", (e, r, i)), ("down_b", (e, d, r)))]
            elif key[1] == "q_proj":  # q, k, v: plan entries p, p + 1, p + 2
                shapes += [((p + h, "a"), (r, self.plan[p + h][2][1])) for h in range(3)]
                shapes += [((p + h, "b"), (self.plan[p + h][2][0], r)) for h in range(3)]
            elif key[1] not in ("k_proj", "v_proj"):
                out_f, in_f = dims
                shapes += [((p, "a"), (r, in_f)), ((p, "b"), (out_f, r))]
        return shapes

    def _carve(self, storage: Tensor, ranks: Tensor) -> tuple[dict, dict, dict]:
        """Pools over `storage` [S', slot_numel] and `ranks` [P, S'] (the device pools, or a host
        image): dense pools by (layer, name), MoE pools by layer, q/k/v groups by layer."""
        views, starts, offset = {}, {}, 0
        for key, shape in self._slot_shapes():
            n = math.prod(shape)
            views[key] = storage[:, offset:offset + n].view(storage.shape[0], *shape)  # slot stride = row
            starts[key] = offset
            offset += n
        dense, moe, groups = {}, {}, {}
        for p, (kind, key, dims) in enumerate(self.plan):
            if kind == "dense":
                dense[key] = kernels.DenseLoRAWeights(views[(p, "a")], views[(p, "b")], ranks[p])
            else:
                moe[key] = kernels.MoELoRAWeights(*(views[(p, n)] for n in ("gate_up_a", "gate_up_b", "down_a", "down_b")),
                                                  ranks[p])
            if kind == "dense" and key[1] == "q_proj":
                sections = tuple(self.plan[p + h][2][0] for h in range(3))
                rows, in_f = 3 * self.max_rank, dims[1]
                a0, b0 = starts[(p, "a")], starts[(p, "b")]
                a = storage[:, a0:a0 + rows * in_f].view(storage.shape[0], rows, in_f)
                b = storage[:, b0:b0 + sum(sections) * self.max_rank].view(storage.shape[0], sum(sections), self.max_rank)
                groups[key[0]] = kernels.DenseLoRAGroup(a, b, ranks[p:p + 3], sections)
        return dense, moe, groups

    @torch.no_grad()
    def pack(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Build `adapter`'s slot image once: one host buffer [slot_numel] in the device row's
        layout (zeros beyond each module's rank; pinned on CUDA) and its ranks [P] int32.
        The unpacked factors are dropped. Returns the same adapter."""
        if adapter.packed is not None:
            return adapter
        missing = self.unsupported_targets(adapter)
        if missing:
            raise AdapterLoadError(f"adapter {adapter.name!r} targets modules this engine cannot adapt: "
                                   f"{missing[:4]}")
        pin = self.device.type == "cuda"
        image = torch.zeros(1, self.slot_numel, dtype=self.dtype, pin_memory=pin)
        ranks = torch.zeros(len(self.plan), 1, dtype=torch.int32, pin_memory=pin)
        dense, moe, _ = self._carve(image, ranks)
        _fill(dense, moe, adapter, self.max_rank)
        adapter.packed, adapter.packed_ranks = image[0], ranks[:, 0]
        adapter.dense, adapter.moe = {}, {}
        return adapter

    @torch.no_grad()
    def write(self, slot: int, adapter: LoRAAdapter) -> "torch.cuda.Event | None":
        """Overwrite `slot` with the adapter's packed image (one copy, plus ranks); returns an
        event when on a side stream. An unpacked adapter (factors only) is packed into a
        temporary image for this copy and left as it is: the host tier packs once, at load."""
        image = adapter if adapter.packed is not None else self.pack(adapter.renamed(adapter.name))
        if self.stream is None:
            self._copy(slot, image)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # readers of the old slot
        with torch.cuda.stream(self.stream):
            self._copy(slot, image)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _copy(self, slot: int, adapter: LoRAAdapter) -> None:
        self.storage[slot].copy_(adapter.packed, non_blocking=True)
        self.ranks[:, slot].copy_(adapter.packed_ranks, non_blocking=True)

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        """Targets of `adapter` no pool holds (e.g. a dense MLP layer's projections)."""
        missing = [f"layer {l} {m}" for (l, m) in adapter.dense if (l, m) not in self.dense]
        return missing + [f"layer {l} {m}" for (l, m) in adapter.moe if l not in self.moe]


def _fill(dense: dict, moe: dict, adapter: LoRAAdapter, r: int) -> None:
    """Copy the adapter's factors into slot 0 of freshly zeroed pools (a host image)."""
    for key, f in adapter.dense.items():
        pool = dense[key]
        pool.a[0, :f.rank].copy_(f.a)
        pool.b[0, :, :f.rank].copy_(f.b)
        pool.ranks[0] = f.rank
    for layer, pool in moe.items():
        inter, ranks = pool.down_a.shape[3], [0]
        for module, a_row, b_rows in (("gate", 0, slice(0, inter)), ("up", r, slice(inter, 2 * inter))):
            f = adapter.moe.get((layer, module))
            if f is not None:
                pool.gate_up_a[0, :, a_row:a_row + f.rank].copy_(f.a)
                pool.gate_up_b[0, :, b_rows, :f.rank].copy_(f.b)
                ranks.append(f.rank)
        f = adapter.moe.get((layer, "down"))
        if f is not None:
            pool.down_a[0, :, :f.rank].copy_(f.a)
            pool.down_b[0, :, :, :f.rank].copy_(f.b)
            ranks.append(f.rank)
        pool.ranks[0] = max(ranks)
