"""FairPool: the long-input threads take tenants in turn; a cancelled call never runs."""
import asyncio
import threading
import time

import pytest

from engine.fair_pool import FairPool


def test_another_tenants_call_waits_for_one_call_of_a_flooding_tenant_not_its_whole_backlog():
    pool, order, lock = FairPool(1, "test-fair"), [], threading.Lock()

    def call(name):
        time.sleep(0.02)
        with lock:
            order.append(name)
        return name

    flood = [pool.submit("alice", call, f"alice-{i}") for i in range(6)]
    time.sleep(0.005)  # alice-0 is running
    quiet = pool.submit("bob", call, "bob-0")
    assert quiet.result(timeout=10) == "bob-0"
    assert [f.result(timeout=10) for f in flood] == [f"alice-{i}" for i in range(6)]
    assert order.index("bob-0") <= 2  # behind alice's running call and at most one more


def test_tenants_with_work_queued_take_the_threads_in_turn():
    pool, order, gate = FairPool(1, "test-fair"), [], threading.Event()
    pool.submit("first", gate.wait, 10)  # holds the thread while the queues fill
    futures = [pool.submit(key, order.append, f"{key}{i}") for key in ("a", "b", "c") for i in range(2)]
    gate.set()
    for f in futures:
        f.result(timeout=10)
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1"]


def test_a_call_cancelled_while_queued_never_runs_and_an_error_reaches_its_caller():
    pool, ran, gate = FairPool(1, "test-fair"), [], threading.Event()
    pool.submit("a", gate.wait, 10)

    async def main():
        waiting = asyncio.ensure_future(asyncio.wrap_future(pool.submit("b", ran.append, "b")))
        await asyncio.sleep(0)
        waiting.cancel()  # the client went away before its turn
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(ZeroDivisionError):
            await asyncio.wrap_future(pool.submit("c", lambda: 1 / 0))

    asyncio.run(main())
    assert ran == [] and pool.queued() == 0
