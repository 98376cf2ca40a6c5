"""How late a replica's event loop runs a timer. Synchronous work on the loop (a file read, a
long parse, a big payload pickled), or a process short of CPU, holds every request of that
replica for as long, and shows only as a latency tail; this names it in the log and in a
histogram."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

logger = logging.getLogger("ray.serve")

PERIOD_S = 0.05  # the timer's period: the lag is how much later than this it fires
WARN_S = 0.25  # a lag this long is logged
COUNT_OVER_S = 0.1  # lags of this much or more are counted (`over`), for /ready


class LoopLag:
    def __init__(self, name: str, observe: Callable[[float], None] | None = None,
                 period_s: float = PERIOD_S, warn_s: float = WARN_S):
        """name: the deployment, for the log; observe: takes every lag sample (a histogram)."""
        self.name, self.observe = name, observe
        self.period_s, self.warn_s = period_s, warn_s
        self._task: asyncio.Task | None = None
        self.over = 0  # lags of COUNT_OVER_S or more so far
        self.longest = 0.0  # the longest lag so far (s)

    def ensure_started(self) -> None:
        """Run the timer on the running loop, unless it runs already; call from a coroutine."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.record(max(0.0, time.perf_counter() - began - self.period_s))

    def record(self, lag: float) -> None:
        if self.observe is not None:
            self.observe(lag)
        self.over += lag >= COUNT_OVER_S
        self.longest = max(self.longest, lag)
        if lag >= self.warn_s:
            logger.warning("%s: the event loop ran a %.0f ms timer %.3f s late: every request of this "
                           "replica waited as long (synchronous work on the loop, or the process short "
                           "of CPU)", self.name, self.period_s * 1000, lag)
