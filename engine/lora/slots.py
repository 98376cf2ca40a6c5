"""Device pools of adapter slots, one per LoRA-able projection, attached to the model's modules.

S = slots, R = max rank, E = experts, D = hidden, I = expert intermediate.
"""
import torch
from torch import Tensor

import kernels
from engine.lora.adapter import LoRAAdapter
from engine.models.layers import SparseMoE
from engine.models.moe_lm import MoECausalLM

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class SlotPools:
    """Owns every layer's slot pool; `write` copies one adapter into one slot (side stream on CUDA)."""

    def __init__(self, model: MoECausalLM, num_slots: int, max_rank: int):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.device = model.embed_tokens.device
        self.dtype = model.embed_tokens.dtype
        self.dense: dict[tuple[int, str], kernels.DenseLoRAWeights] = {}
        self.moe: dict[int, kernels.MoELoRAWeights] = {}
        for i, layer in enumerate(model.layers):
            for name in ATTENTION_PROJECTIONS:
                self._attach_dense(i, name, getattr(layer.self_attn, name))
            if isinstance(layer.mlp, SparseMoE):
                self.moe[i] = layer.mlp.lora = self._moe_pool(layer.mlp)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _ranks(self) -> Tensor:
        return torch.zeros(self.num_slots, dtype=torch.int32, device=self.device)

    def _attach_dense(self, layer: int, name: str, linear) -> None:
        out_f, in_f = linear.weight.shape
        pool = kernels.DenseLoRAWeights(self._zeros(self.num_slots, self.max_rank, in_f),
                                        self._zeros(self.num_slots, out_f, self.max_rank), self._ranks())
        self.dense[(layer, name)] = linear.lora = pool

    def _moe_pool(self, moe: SparseMoE) -> kernels.MoELoRAWeights:
        e, two_i, d = moe.w_gate_up.shape
        s, r, i = self.num_slots, self.max_rank, two_i // 2
        return kernels.MoELoRAWeights(self._zeros(s, e, 2 * r, d), self._zeros(s, e, two_i, r),
                                      self._zeros(s, e, r, i), self._zeros(s, e, d, r), self._ranks())

    @torch.no_grad()
    def write(self, slot: int, adapter: LoRAAdapter) -> "torch.cuda.Event | None":
        """Zero `slot` in every pool, copy the adapter in; returns an event when on a side stream."""
        if self.stream is None:
            self._write(slot, adapter)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._write(slot, adapter)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        r = self.max_rank
        for (layer, name), pool in self.dense.items():
            pool.a[slot].zero_()
            pool.b[slot].zero_()
            f = adapter.dense.get((layer, name))
            rank = 0 if f is None else f.rank
            if f is not None:
                pool.a[slot, :rank].copy_(f.a, non_blocking=True)
                pool.b[slot, :, :rank].copy_(f.b, non_blocking=True)
            pool.ranks[slot].fill_(rank)
        for layer, pool in self.moe.items():
            for t in (pool.gate_up_a, pool.gate_up_b, pool.down_a, pool.down_b):
                t[slot].zero_()
            inter = pool.down_a.shape[3]
            ranks = [0]
            for module, a_rows, b_rows in (("gate", 0, slice(0, inter)), ("up", r, slice(inter, 2 * inter))):
                f = adapter.moe.get((layer, module))
                if f is not None:
                    pool.gate_up_a[slot, :, a_rows:a_rows + f.rank].copy_(f.a, non_blocking=True)
                    pool.gate_up_b[slot, :, b_rows, :f.rank].copy_(f.b, non_blocking=True)
                    ranks.append(f.rank)
            f = adapter.moe.get((layer, "down"))
            if f is not None:
                pool.down_a[slot, :, :f.rank].copy_(f.a, non_blocking=True)
                pool.down_b[slot, :, :, :f.rank].copy_(f.b, non_blocking=True)
                ranks.append(f.rank)
            pool.ranks[slot].fill_(max(ranks))

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        """Targets of `adapter` no pool holds (e.g. a dense MLP layer's projections)."""
        missing = [f"layer {l} {m}" for (l, m) in adapter.dense if (l, m) not in self.dense]
        return missing + [f"layer {l} {m}" for (l, m) in adapter.moe if l not in self.moe]
