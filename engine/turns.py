"""The engine loop's turns, timed. A turn (messages taken, a step, its outputs sent) of
SLOW_TURN_S or more stalls every stream of the replica: it is counted for the stats and logged
with what it did (its batch, and the adapter-load, host page-locking, compaction and collector
counters it moved), so that a served latency tail can be matched to its cause."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("engine.core")

SLOW_TURN_S = 0.25
# LoRAStats fields a slow turn reports the change of
_LORA_COUNTERS = ("slot_loads", "host_loads", "evictions", "compactions", "bytes_compacted",
                  "slot_load_seconds", "host_load_seconds", "kv_blocks_borrowed", "kv_blocks_returned")


class TurnClock:
    def __init__(self, engine, slow_s: float = SLOW_TURN_S):
        self.engine, self.slow_s = engine, slow_s
        self.slow_turns = 0
        self.longest = 0.0  # seconds, of any busy turn
        self._began = self._stepped = 0.0
        self._before: dict[str, float] = {}

    def begin(self) -> None:
        self._began = self._stepped = time.perf_counter()
        self._before = self.counters()

    def stepping(self) -> None:
        """The turn's messages are taken; its step starts."""
        self._stepped = time.perf_counter()

    def end(self, busy: bool) -> None:
        """The turn is over; `busy`: it ran a step (an idle turn's wait is not a stall)."""
        if not busy:
            return
        took = time.perf_counter() - self._began
        self.longest = max(self.longest, took)
        if took >= self.slow_s:
            self.slow_turns += 1
            log.warning("slow turn: %.3f s (messages %.3f s, step and outputs %.3f s); %s", took,
                        self._stepped - self._began, took - (self._stepped - self._began), self.detail())

    def counters(self) -> dict[str, float]:
        """The engine's load, compaction and collector counters now (attribute reads)."""
        engine = self.engine
        counters = {"gc_collections": engine.gc.collections, "gc_seconds": engine.gc.seconds,
                    "preemptions": engine.num_preemptions}
        if engine.lora_manager is not None:
            stats = engine.lora_manager.stats
            counters.update((name, getattr(stats, name)) for name in _LORA_COUNTERS)
            arena = getattr(engine.lora_manager, "arena", None)
            if arena is not None:  # the driver's page-locking calls (engine.lora.host_arena)
                counters["host_pin_seconds"] = arena.pin_seconds
        return counters

    def detail(self) -> str:
        """The turn's last step's batch and the counters that changed since it began."""
        changed = {name: value - self._before[name] for name, value in self.counters().items()
                   if value != self._before[name]}
        parts = [f"{key} {value}" for key, value in self.engine.last_step.items()]
        parts += [f"{name} +{value:.3f}" if isinstance(value, float) else f"{name} +{value}"
                  for name, value in changed.items()]
        return ", ".join(parts)
