"""LoRAManager slot copies on a side stream (CUDA path), with a stand-in for the slot pools."""
import threading

import torch

from engine.lora.adapter import LoRAAdapter
from engine.lora.manager import LoRAManager


class RecordingPools:
    """One slot, a non-None stream (so copies go through the loader threads), writes recorded.
    The first adapter's write waits (up to 1 s) for the second's, to invite an overtake."""

    num_slots, stream, dtype, device = 1, object(), torch.float32, torch.device("cpu")

    def __init__(self):
        self.order: list[str] = []
        self.second_written = threading.Event()

    def write(self, slot: int, adapter: LoRAAdapter):
        if adapter.name == "first":
            self.second_written.wait(timeout=1.0)
        self.order.append(adapter.name)
        if adapter.name == "second":
            self.second_written.set()
        return None  # no CUDA event: the copy counts as done when the write returns

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        return []


def test_copies_into_a_reused_slot_land_in_reservation_order():
    """A slot released while its copy is still queued and re-reserved for another adapter must
    end up holding the second adapter: the copies into it may not overtake each other."""
    pools = RecordingPools()
    manager = LoRAManager(pools, spec=None, max_rank=4, host_capacity=2)
    for name in ("first", "second"):
        manager.host[name] = LoRAAdapter(name)  # already in the host tier
    try:
        assert manager.reserve("first", "unused") == 0
        first_copy = manager.slot_events[0]
        manager.release(0)  # its request was aborted before the copy ran
        assert manager.reserve("second", "unused") == 0
        second_copy = manager.slot_events[0]
        first_copy.result(timeout=10)
        second_copy.result(timeout=10)
        assert pools.order == ["first", "second"]
        assert manager.is_ready(0) and manager.resident() == {"second": 0}
    finally:
        manager.shutdown()


class FailingPools(RecordingPools):
    """Writes of the adapter named "bad" fail, as a CUDA copy error would."""

    def write(self, slot: int, adapter: LoRAAdapter):
        if adapter.name == "bad":
            raise RuntimeError("copy failed")
        return super().write(slot, adapter)


def test_failed_copy_fails_every_holder_of_the_slot():
    """Two requests share an adapter whose slot copy fails: both fail (neither runs on the
    half-written slot), and the slot is usable again once both let it go."""
    import pytest

    from engine.errors import AdapterLoadError

    manager = LoRAManager(FailingPools(), spec=None, max_rank=4, host_capacity=2)
    manager.host["bad"] = LoRAAdapter("bad")
    manager.host["good"] = LoRAAdapter("good")
    try:
        first, second = manager.reserve("bad", "unused"), manager.reserve("bad", "unused")
        assert first == second == 0
        manager.slot_events[0].exception(timeout=10)  # wait for the copy to fail
        for _ in range(2):  # each holder asks in turn
            with pytest.raises(AdapterLoadError, match="copy"):
                manager.is_ready(0)
        manager.release(0)
        manager.release(0)
        assert manager.reserve("good", "unused") == 0
        manager.slot_events[0].result(timeout=10)
        assert manager.is_ready(0)
    finally:
        manager.shutdown()
