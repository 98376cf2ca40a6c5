"""The engine core's loop logs a turn that stalls every stream, with what the turn did."""
import logging
import threading
import time
from multiprocessing import Pipe
from types import SimpleNamespace

from engine import core_process
from engine.lora.manager import LoRAStats


class _SlowLoadEngine:
    """Runs `turns` steps; the first loads an adapter into a slot and takes `first_step_s`."""

    def __init__(self, turns: int, first_step_s: float):
        self.turns, self.first_step_s = turns, first_step_s
        self.gc = SimpleNamespace(collections=0, seconds=0.0)
        self.num_preemptions = 0
        self.lora_manager = SimpleNamespace(stats=LoRAStats())
        self.last_step = {"num_seqs": 0, "num_tokens": 0}
        self.seqs = {}

    def has_unfinished_requests(self) -> bool:
        return self.turns > 0

    def step(self):
        if self.turns == 2:
            time.sleep(self.first_step_s)
            self.lora_manager.stats.slot_loads += 1
            self.lora_manager.stats.slot_load_seconds += self.first_step_s
        self.turns -= 1
        self.last_step = {"num_seqs": 3, "num_tokens": 3}
        return []

    def stats(self) -> dict:
        return {}


def _run(engine, caplog) -> list[str]:
    ours, theirs = Pipe()
    with caplog.at_level(logging.WARNING, logger="engine.core"):
        loop = threading.Thread(target=core_process.run_loop, args=(engine, theirs))
        loop.start()
        while engine.turns:
            time.sleep(0.01)
        ours.send(("shutdown",))
        loop.join(timeout=10)
    assert not loop.is_alive()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow turn")]


def test_a_slow_turn_is_logged_with_its_batch_and_the_slot_load_it_did(caplog):
    slow = _run(_SlowLoadEngine(turns=2, first_step_s=core_process.SLOW_TURN_S + 0.05), caplog)
    assert len(slow) == 1, slow
    assert "num_seqs 3" in slow[0] and "slot_loads +1" in slow[0] and "slot_load_seconds +0.3" in slow[0], slow[0]
    assert "host_loads" not in slow[0]  # only the counters that changed


def test_fast_turns_log_nothing(caplog):
    assert _run(_SlowLoadEngine(turns=2, first_step_s=0.0), caplog) == []
