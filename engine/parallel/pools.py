"""SlotPools of one rank of a multi-GPU replica, and how rank 0 hands the other ranks their parts.

Rank 0 is the one place adapters are read: packing an adapter there packs every rank's part
(all ranks hold the same shapes, so rank 0's pools pack any rank's part, at the same size), keeps
its own as the adapter's image and the others in `adapter.parts`, all in the host tier. A slot
write on rank 0 queues the parts; with the next step's message rank 0 sends each rank its part's
bytes (engine.parallel.group), and that rank writes them into the same slot at the same heap
offset before the step runs. The other ranks read no files: an adapter that left the replica's
disk cache still serves from rank 0's host tier.
"""
import torch

from engine.lora.adapter import LoRAAdapter
from engine.lora.slots import SlotPools
from engine.models.spec import ModelSpec
from engine.parallel.group import RankGroup
from engine.parallel.shard import Shard
from engine.parallel.slicing import shard_adapter


class RankPools:
    """The rank's SlotPools (every other attribute is theirs) with `pack` and `write` wrapped."""

    can_move = False  # a heap compaction would have to move every rank's images alike
    # its parts are sent to the other ranks with a later step: their images are torch's pinned
    # buffers, kept alive by whoever holds them, not spans of the host tier's arena
    packs_into_arena = False

    def __init__(self, pools: SlotPools, group: RankGroup, shard: Shard, spec: ModelSpec):
        self._pools, self._group, self._shard, self._spec = pools, group, shard, spec

    def __getattr__(self, name):
        return getattr(self._pools, name)

    def pack(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Rank 0: pack the adapter's part of every rank (in place, as SlotPools.pack does)."""
        if adapter.packed is not None:
            return adapter
        whole = LoRAAdapter(adapter.name, adapter.dense, adapter.moe)
        shard = self._shard
        parts = [shard_adapter(whole, Shard(rank, shard.tp, shard.ep), self._spec) for rank in range(shard.size)]
        adapter.dense, adapter.moe = parts[0].dense, parts[0].moe
        self._pools.pack(adapter)
        adapter.parts = [self._pools.pack(part) for part in parts[1:]]
        return adapter

    def write(self, slot: int, start: int, adapter: LoRAAdapter, after=None):
        """Rank 0: write its part now (side stream on CUDA, after `after`: SlotPools.write) and
        queue the others' for the next step."""
        if adapter.packed is None:
            adapter = self.pack(adapter.renamed(adapter.name))
        self._group.queue_write(slot, start, adapter.parts)
        return self._pools.write(slot, start, adapter, after)

    def write_received(self, slot: int, start: int, image: torch.Tensor, ranks: torch.Tensor,
                       offsets: torch.Tensor):
        """Ranks 1..N-1: the part rank 0 sent, into `slot` at `start`."""
        return self._pools.write(slot, start, LoRAAdapter("", packed=image, packed_ranks=ranks, packed_offsets=offsets))
