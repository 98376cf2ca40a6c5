"""How the GPU memory left after the weights splits between the KV cache and the adapter heap.

The heap is counted in adapters of max rank on every target (`lora_slot_bytes`: the largest an
adapter can be), so the rule below guarantees that many of the largest adapters fit at once;
smaller adapters take their own bytes of it (engine.lora.slots), so more of them fit, up to the
slot count (max_loras: max_num_seqs by default, what one step can use).

The rule (`split_memory`) is arithmetic on byte counts, so it is tested on CPU with the numbers
of a real card; `plan_memory` measures the device once the weights are loaded and feeds it, and
the runner then allocates exactly what the plan says.
"""
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.errors import EngineError
from engine.models.spec import ModelSpec
from kernels.weights import r16

GIB = 1 << 30


def kv_block_bytes(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over every layer: K and V, [block_size, G, Dh] each."""
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * dtype.itemsize


def lora_slot_bytes(spec: ModelSpec, max_rank: int, dtype: torch.dtype, layout: str = "slots",
                    targets: str = "both", rank_unit: int = 16) -> int:
    """Bytes of the largest adapter image in engine.lora.slots.SlotPools (rank max_rank on every
    target): every layer's q/k/v/o as A [r, in] + B [out, r], and every MoE layer's experts as
    gate and up A [E, r, D] each + B [E, 2I, r] and down A [E, r, I] + B [E, D, r], at max_rank
    rounded up to rank_unit (16 or 8) in the adapter heap (layout "bytes": its experts' r16,
    engine.lora.slots).
    targets: "attention" or "experts" counts only those (an image of an adapter on them alone)."""
    r, d = max_rank, spec.hidden_size
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attention = r * ((d + q_out) + 2 * (d + kv_out) + (q_out + d))  # q, k and v, o
    e, i = spec.num_experts, spec.moe_intermediate_size
    r_moe = r16(r, rank_unit) if layout == "bytes" else r
    moe = e * r_moe * (2 * d + 2 * i + i + d)
    num_moe = sum(spec.is_moe_layer(layer) for layer in range(spec.num_layers))
    attention_part = spec.num_layers * attention if targets in ("attention", "both") else 0
    return (attention_part + (num_moe * moe if targets in ("experts", "both") else 0)) * dtype.itemsize


@dataclass(slots=True, frozen=True)
class MemorySettings:
    """The EngineConfig fields the split depends on, in blocks and slots."""
    gpu_memory_utilization: float
    blocks_per_seq: int  # what one max_model_len sequence needs
    max_num_seqs: int
    max_loras: int | None  # None: sized here
    num_kv_blocks: int | None  # None: sized here
    lora_memory_fraction: float | None = None  # share of the budget for slots; None: the rule


def split_memory(total: int, allocated: int, reserve: int, block_bytes: int, slot_bytes: int,
                 settings: MemorySettings) -> tuple[int, int]:
    """(num_kv_blocks, num_slots) from the budget = utilization x total - allocated - reserve.

    Why this rule: KV blocks are what let sequences run at all, and past max_num_seqs x
    max_model_len tokens they buy nothing; adapter slots decide how many tenants a step can
    serve without swapping adapters in, and past max_num_seqs a step cannot use more. So the
    KV cache first gets what max_num_seqs full-length sequences need (at least one sequence,
    at most half the budget, since adapters need room too); the slots get the rest (at least
    1, at most max_num_seqs); what the slots leave goes back to the KV cache. So a long
    max_model_len cannot starve the slots: its KV cache starts from half the budget.

    An explicit max_loras or num_kv_blocks fixes that side and the other takes the rest
    (both explicit: used as given). lora_memory_fraction, if set, gives the slots that share
    of the budget instead of the rule. max_loras=0: no slots, the KV cache takes everything.
    Raises EngineError when one sequence (and, with adapters, one slot) does not fit."""
    s = settings
    budget = int(s.gpu_memory_utilization * total) - allocated - reserve
    if s.max_loras is not None and s.num_kv_blocks is not None:
        return s.num_kv_blocks, s.max_loras
    if s.max_loras is not None:
        return _fit_kv(budget - s.max_loras * slot_bytes, block_bytes, s), s.max_loras
    if s.num_kv_blocks is not None:
        return s.num_kv_blocks, _fit_slots(budget - s.num_kv_blocks * block_bytes, slot_bytes, s)
    if s.lora_memory_fraction is not None:
        slots = max(1, min(s.max_num_seqs, int(s.lora_memory_fraction * budget) // slot_bytes))
    else:
        # at most half the budget, but one sequence even past it
        first = min(_fit_kv(budget, block_bytes, s), max(max(budget // 2, 0) // block_bytes, s.blocks_per_seq))
        slots = _fit_slots(budget - first * block_bytes, slot_bytes, s)
    return _fit_kv(budget - slots * slot_bytes, block_bytes, s), slots


def _fit_kv(spare: int, block_bytes: int, s: MemorySettings) -> int:
    fits = max(spare, 0) // block_bytes
    if fits < s.blocks_per_seq:
        raise EngineError(
            f"only {fits} KV blocks fit in GPU memory ({spare / GIB:.2f} GiB left for the KV cache), fewer "
            f"than the {s.blocks_per_seq} one max_model_len sequence needs: lower max_model_len or "
            f"max_loras, or raise gpu_memory_utilization")
    return min(fits, s.max_num_seqs * s.blocks_per_seq)


def _fit_slots(spare: int, slot_bytes: int, s: MemorySettings) -> int:
    fits = max(spare, 0) // slot_bytes
    if fits < 1:
        raise EngineError(
            f"no adapter slot ({slot_bytes / GIB:.2f} GiB) fits in GPU memory beside the KV cache "
            f"({spare / GIB:.2f} GiB left): lower max_lora_rank, max_model_len or num_kv_blocks, "
            f"or set max_loras=0 to serve the base model only")
    return min(fits, s.max_num_seqs)


def heap_bytes(budget: int, num_kv_blocks: int, block_bytes: int, images: int, slot_bytes: int,
               layout: str, num_slots: int, by_rule: bool) -> int:
    """The adapters' device bytes once `split_memory` has sized both sides: `images` whole
    max-rank images for padded slots ("slots") or where the operator sized the adapters' side
    (max_loras, lora_memory_fraction: not `by_rule`); otherwise, for the heap ("bytes"), all the
    budget the KV cache leaves, at least those images and at most what `num_slots` largest
    adapters take. The KV cache stops at max_num_seqs full-length sequences, so what lies past
    the last whole image would otherwise sit idle: on an H200 at max rank 64 (6.75 GB images)
    that was 6.5 GB beside a 47 GB heap, and smaller adapters fit in any bytes."""
    if layout != "bytes" or images == 0 or not by_rule:
        return images * slot_bytes
    return min(num_slots * slot_bytes, max(images * slot_bytes, budget - num_kv_blocks * block_bytes))


@dataclass(slots=True, frozen=True)
class MemoryPlan:
    """What the runner allocated, for the start-up log and the engine's stats."""
    num_kv_blocks: int
    num_slots: int
    block_size: int
    kv_block_bytes: int
    slot_bytes: int  # the largest adapter image
    lora_rank: int
    weights_bytes: int
    reserve_bytes: int
    heap_bytes: int  # the adapters' device memory
    lora_layout: str = "bytes"  # EngineConfig.lora_layout

    @property
    def kv_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def kv_bytes(self) -> int:
        return self.num_kv_blocks * self.kv_block_bytes

    def summary(self) -> str:
        return (f"weights {self.weights_bytes / GIB:.2f} GiB, KV cache {self.num_kv_blocks} blocks "
                f"({self.kv_tokens} tokens, {self.kv_bytes / GIB:.2f} GiB), {self._adapters()}, "
                f"reserve {self.reserve_bytes / GIB:.2f} GiB")

    def _adapters(self) -> str:
        if self.lora_layout == "slots":
            return f"adapter slots {self.num_slots} x {self.slot_bytes / GIB:.3f} GiB at rank {self.lora_rank}"
        return (f"adapter heap {self.heap_bytes / GIB:.3f} GiB (= {self.heap_bytes / max(self.slot_bytes, 1):.1f} "
                f"adapters of rank {self.lora_rank} on every target, more of smaller ones) over {self.num_slots} slots")


def plan_memory(config: EngineConfig, spec: ModelSpec, weights_bytes: int, reserve: int) -> MemoryPlan:
    """The plan for this engine, after its weights are loaded. On CUDA both sides come from
    `split_memory` over the card; on CPU the config fixes the slots and the KV cache is what
    max_num_seqs sequences need, up to 2 GiB (at least one sequence)."""
    c, device, dtype = config, config.torch_device, config.torch_dtype
    block = kv_block_bytes(spec, c.block_size, dtype)
    slot = lora_slot_bytes(spec, c.max_lora_rank, dtype, c.lora_layout, rank_unit=c.lora_rank_unit)
    per_seq = -(-c.max_model_len // c.block_size)
    if device.type != "cuda":
        blocks = c.num_kv_blocks or min(c.max_num_seqs * per_seq, max(per_seq, (2 << 30) // block))
        heap = (c.lora_heap_bytes or c.max_loras * slot) if c.max_loras else 0
        return MemoryPlan(blocks, c.max_loras, c.block_size, block, slot, c.max_lora_rank, weights_bytes, 0, heap,
                          c.lora_layout)
    settings = MemorySettings(c.gpu_memory_utilization, per_seq, c.max_num_seqs, c.max_loras,
                              c.num_kv_blocks, c.lora_memory_fraction)
    total = torch.cuda.get_device_properties(device).total_memory
    allocated = torch.cuda.memory_allocated(device)
    budget = int(c.gpu_memory_utilization * total) - allocated - reserve  # split_memory's, too
    if c.lora_heap_bytes is not None and c.max_loras != 0:  # the heap as given, the KV cache the rest
        blocks = c.num_kv_blocks or _fit_kv(budget - c.lora_heap_bytes, block, settings)
        slots = c.max_loras if c.max_loras is not None else c.max_num_seqs
        return MemoryPlan(blocks, slots, c.block_size, block, slot, c.max_lora_rank, weights_bytes, reserve,
                          c.lora_heap_bytes, c.lora_layout)
    blocks, images = split_memory(total, allocated, reserve, block, slot, settings)
    # by bytes, smaller adapters fit more than `images` of the largest: up to max_num_seqs slots
    more = max(images, c.max_num_seqs) if images and c.lora_layout == "bytes" else images
    slots = c.max_loras if c.max_loras is not None else more
    by_rule = c.max_loras is None and c.lora_memory_fraction is None
    return MemoryPlan(blocks, slots, c.block_size, block, slot, c.max_lora_rank, weights_bytes, reserve,
                      heap_bytes(budget, blocks, block, images, slot, c.lora_layout, slots, by_rule), c.lora_layout)
