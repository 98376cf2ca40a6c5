"""SlotPools of one rank of a multi-GPU replica: adapters cut to the rank's part before packing,
and, on rank 0, every slot write repeated by the other ranks before rank 0's next step."""
from engine.lora.adapter import LoRAAdapter
from engine.lora.slots import SlotPools
from engine.models.spec import ModelSpec
from engine.parallel.group import RankGroup
from engine.parallel.slicing import shard_adapter


class RankPools:
    """The rank's SlotPools (every other attribute is theirs) with `pack` and `write` wrapped."""

    def __init__(self, pools: SlotPools, group: RankGroup, spec: ModelSpec):
        self._pools, self._group, self._spec = pools, group, spec
        self._shard = group.shard()

    def __getattr__(self, name):
        return getattr(self._pools, name)

    def pack(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Pack this rank's part of the adapter (in place, as SlotPools.pack does)."""
        if adapter.packed is None:
            part = shard_adapter(adapter, self._shard, self._spec)
            adapter.dense, adapter.moe = part.dense, part.moe
        return self._pools.pack(adapter)

    def write(self, slot: int, start: int, adapter: LoRAAdapter):
        if self._group.rank == 0:
            self._group.queue_write(slot, start, adapter.name, adapter.path)
        if adapter.packed is None:
            self.pack(adapter)
        return self._pools.write(slot, start, adapter)
