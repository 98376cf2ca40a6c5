"""Adapter loads in flight: idle steps block on them (no spin), churn queues loads back to back,
and a sequence is admitted as soon as its own slot is ready."""
import asyncio
import threading

import torch

import engine.lora.manager as manager_module
from engine import AsyncLLMEngine, EngineConfig, LoRARequest, SamplingParams
from engine.block_manager import BlockManager
from engine.lora.adapter import LoRAAdapter
from engine.lora.manager import LoRAManager
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from tests.engine.helpers import PROMPTS, make_engine

PARAMS = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def _block_host_loads(manager, monkeypatch) -> threading.Event:
    """Host loads wait for the returned event (as a slow disk would)."""
    gate, real = threading.Event(), manager._load_to_host

    def slow(name, path):
        gate.wait(30)
        return real(name, path)
    monkeypatch.setattr(manager, "_load_to_host", slow)
    return gate


def _count_waits(monkeypatch) -> list[tuple[int, float]]:
    calls, real = [], manager_module.wait

    def counting(futures, timeout, return_when):
        calls.append((len(futures), timeout))
        return real(futures, timeout=timeout, return_when=return_when)
    monkeypatch.setattr(manager_module, "wait", counting)
    return calls


def test_step_with_only_loading_work_blocks_on_the_load(checkpoints, adapters, monkeypatch):
    engine = make_engine(checkpoints["qwen3_moe"], max_loras=2, max_lora_rank=16)
    gate = _block_host_loads(engine.lora_manager, monkeypatch)
    waits = _count_waits(monkeypatch)
    engine.add_request("lora", PROMPTS[0], PARAMS, LoRARequest("t/a@v1", str(adapters["qwen3_moe"]["a"])))
    for _ in range(3):
        assert engine.step() == []
    assert [n for n, _ in waits] == [1, 1, 1] and all(t > 0 for _, t in waits)  # each step waited once
    engine.add_request("base", PROMPTS[1], PARAMS)
    assert [o.request_id for o in engine.step()] == ["base"]
    assert len(waits) == 3  # a step with work to run does not wait
    gate.set()
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.finish_reason for o in outputs if o.finished and o.request_id == "lora"] == ["length"]
    engine.shutdown()


class FakeEvent:
    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


class EventPools:
    """Slot copies that complete when the test says so (a stand-in for CUDA events)."""

    num_slots, stream, device = 3, object(), None

    def __init__(self):
        self.events: dict[str, FakeEvent] = {}
        self.storage = torch.zeros(self.num_slots)  # a heap of one element per adapter

    def image_numel(self, adapter: LoRAAdapter) -> int:
        return 1

    def handed_over(self):
        return None  # no device steps to order after

    def write(self, slot: int, start: int, adapter: LoRAAdapter, after=None) -> FakeEvent:
        self.events[adapter.name] = FakeEvent()
        return self.events[adapter.name]

    def unsupported_targets(self, adapter: LoRAAdapter) -> list[str]:
        return []


def _issued(manager: LoRAManager) -> None:
    for pending in manager.slot_events:
        if pending is not None:
            pending.result(timeout=10)


def test_churn_queues_loads_back_to_back_and_admits_each_when_ready():
    pools = EventPools()
    manager = LoRAManager(pools, spec=None, max_rank=4, host_capacity=8)
    names = ["t1/a", "t2/b", "t3/c", "t4/d"]
    for name in names:
        manager.host[name] = LoRAAdapter(name)
    sched = Scheduler(8, 64, BlockManager(64, 4), manager)
    seqs = [Sequence(k, f"r{k}", [1, 2, 3], PARAMS, LoRARequest(n, "/x"), n.split("/")[0])
            for k, n in enumerate(names)]
    for s in seqs:
        sched.add(s)
    try:
        assert sched.schedule().scheduled == []
        _issued(manager)
        assert sorted(pools.events) == names[:3]  # every free slot started loading in one pass
        pools.events["t2/b"].done = True
        assert [s for s, _ in sched.schedule().scheduled] == [seqs[1]]  # b's slot ready, a/c still loading
        sched.finish(seqs[1], "stop")
        assert sched.schedule().scheduled == []
        _issued(manager)
        assert "t4/d" in pools.events and manager.resident()["t4/d"] == seqs[3].lora_slot
    finally:
        manager.shutdown()


def test_async_engine_serves_and_aborts_while_a_load_is_stuck(checkpoints, adapters, monkeypatch):
    eng = AsyncLLMEngine(EngineConfig(model=checkpoints["qwen3_moe"], max_loras=2, max_lora_rank=16,
                                      block_size=4, max_model_len=64, max_num_seqs=8))
    gate = _block_host_loads(eng.engine.lora_manager, monkeypatch)
    lora = LoRARequest("t/a@v1", str(adapters["qwen3_moe"]["a"]))

    async def drain(stream):
        return [out async for out in stream]

    async def main():
        stuck = asyncio.ensure_future(drain(eng.generate(PROMPTS[0], PARAMS, request_id="stuck", lora=lora)))
        base = await drain(eng.generate(PROMPTS[1], PARAMS, request_id="base"))
        eng.abort("stuck")
        return base, await stuck
    try:
        base, stuck = asyncio.run(main())
        assert base[-1].finish_reason == "length" and base[-1].num_output_tokens == 3
        assert [o.finish_reason for o in stuck] == ["abort"]
    finally:
        gate.set()
        eng.shutdown()
