"""deployments/loop_lag.py: a loop held by synchronous work is measured and named in the log."""
import asyncio
import logging
import time

from deployments.loop_lag import LoopLag


async def _watch(lag: LoopLag, hold_s: float) -> None:
    lag.ensure_started()
    lag.ensure_started()  # a second call keeps the one timer
    await asyncio.sleep(0.12)
    time.sleep(hold_s)  # synchronous work on the loop, as a blocking read would be
    await asyncio.sleep(0.12)


def test_a_loop_held_by_synchronous_work_is_logged_with_how_long(caplog):
    samples = []
    lag = LoopLag("engine replica", samples.append, period_s=0.02, warn_s=0.2)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        asyncio.run(_watch(lag, 0.3))
    assert 0.25 <= max(samples) < 1.0 and len(samples) >= 5, samples
    assert lag.over == 1 and lag.longest == max(samples)  # counted for /ready
    warned = [r.getMessage() for r in caplog.records if "event loop" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("engine replica:"), warned


def test_a_free_loop_logs_nothing(caplog):
    samples = []
    lag = LoopLag("ingress", samples.append, period_s=0.02, warn_s=0.2)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        asyncio.run(_watch(lag, 0.0))
    assert samples and max(samples) < 0.2, samples
    assert lag.over == sum(s >= 0.1 for s in samples)
    assert not [r for r in caplog.records if "event loop" in r.getMessage()]
