"""engine/turns.py through the engine core's loop: a turn that stalls every stream is counted and
logged with what it did."""
import logging
import threading
import time
from multiprocessing import Pipe
from types import SimpleNamespace

from engine import core_process
from engine.lora.manager import LoRAStats
from engine.turns import SLOW_TURN_S, TurnClock


class _SlowLoadEngine:
    """Runs `steps` steps; the first loads an adapter into a slot and takes `first_step_s`."""

    def __init__(self, steps: int, first_step_s: float):
        self.steps_left, self.first_step_s = steps, first_step_s
        self.gc = SimpleNamespace(collections=0, seconds=0.0)
        self.num_preemptions = 0
        self.lora_manager = SimpleNamespace(stats=LoRAStats())
        self.last_step = {"num_seqs": 0, "num_tokens": 0}
        self.seqs = {}
        self.turns = TurnClock(self)

    def has_unfinished_requests(self) -> bool:
        return self.steps_left > 0

    def step(self):
        if self.steps_left == 2:
            time.sleep(self.first_step_s)
            self.lora_manager.stats.slot_loads += 1
            self.lora_manager.stats.slot_load_seconds += self.first_step_s
        self.steps_left -= 1
        self.last_step = {"num_seqs": 3, "num_tokens": 3}
        return []

    def stats(self) -> dict:
        return {}


def _run(engine, caplog) -> list[str]:
    ours, theirs = Pipe()
    with caplog.at_level(logging.WARNING, logger="engine.core"):  # engine/turns.py's logger
        loop = threading.Thread(target=core_process.run_loop, args=(engine, theirs))
        loop.start()
        while engine.steps_left:
            time.sleep(0.01)
        ours.send(("shutdown",))
        loop.join(timeout=10)
    assert not loop.is_alive()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow turn")]


def test_a_slow_turn_is_logged_with_its_batch_and_the_slot_load_it_did(caplog):
    engine = _SlowLoadEngine(steps=2, first_step_s=SLOW_TURN_S + 0.05)
    slow = _run(engine, caplog)
    assert len(slow) == 1 and engine.turns.slow_turns == 1 and engine.turns.longest >= SLOW_TURN_S, slow
    assert "num_seqs 3" in slow[0] and "slot_loads +1" in slow[0] and "slot_load_seconds +0.3" in slow[0], slow[0]
    assert "host_loads" not in slow[0]  # only the counters that changed


def test_fast_turns_log_nothing(caplog):
    engine = _SlowLoadEngine(steps=2, first_step_s=0.0)
    assert _run(engine, caplog) == [] and engine.turns.slow_turns == 0
