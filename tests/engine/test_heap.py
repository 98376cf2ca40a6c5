"""engine.heap: the garbage collector's pauses, counted as the engine's stats report them."""
import gc

from engine.heap import GCPauses, gc_pauses
from tests.engine.helpers import make_engine


def test_each_collection_is_counted_with_its_time_and_the_longest_kept():
    pauses = GCPauses()
    runs = lambda: sum(generation["collections"] for generation in gc.get_stats())  # noqa: E731
    first = runs()
    gc.callbacks.append(pauses)
    try:
        garbage = [[] for _ in range(10_000)]
        for a, b in zip(garbage, garbage[1:]):
            a.append(b)
            b.append(a)  # cycles: only the collector frees them
        del garbage, a, b
        gc.collect()
        gc.collect()
    finally:
        gc.callbacks.remove(pauses)
    assert pauses.collections == runs() - first >= 2  # the two asked for, and any automatic ones
    assert 0 < pauses.longest <= pauses.seconds


def test_engine_stats_carry_the_processs_collector_pauses(checkpoints):
    engine = make_engine(checkpoints["qwen3_moe"])
    before = engine.stats()
    gc.collect()
    after = engine.stats()
    assert engine.gc is gc_pauses()  # one tracker a process, however many engines
    assert after["gc_collections"] >= before["gc_collections"] + 1
    assert after["gc_pause_seconds"] > before["gc_pause_seconds"]
    assert after["gc_longest_pause_seconds"] >= before["gc_longest_pause_seconds"] > 0
