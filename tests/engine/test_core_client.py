"""EngineCoreClient (engine core in a process of its own) and the per-step hand-over of outputs."""
import asyncio
import os
import signal

import pytest

from engine import (AdapterLoadError, EngineConfig, EngineCoreClient, EngineError, EngineUnavailableError,
                    InvalidRequestError, LLMEngine, LoRARequest, RequestOutput, SamplingParams)
from engine.streams import OutputStreams, read_batches

PROMPTS = ["The quick brown fox", "Tenants upload adapters", "Hello world! How are you?"]


def _config(checkpoint, **overrides) -> EngineConfig:
    values = dict(model=checkpoint, max_loras=2, max_lora_rank=16, block_size=4, max_model_len=64,
                  max_num_seqs=8)
    return EngineConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def core(checkpoints):
    client = EngineCoreClient(_config(checkpoints["qwen3_moe"]))
    yield client
    client.shutdown()


async def _collect(client, prompt, params, rid, lora=None):
    ids, batches, last = [], 0, None
    async for batch in client.generate_batches(prompt, params, request_id=rid, lora=lora):
        batches += 1
        for out in batch:
            ids += out.token_ids_delta
            last = out
    return ids, batches, last


def test_core_process_streams_the_same_greedy_tokens_as_the_engine_in_process(core, checkpoints, adapters):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    lora = LoRARequest("tenant-b/ad@v1", str(adapters["qwen3_moe"]["b"]))
    loras = [None, lora, None]

    async def main():
        return await asyncio.gather(*(_collect(core, p, params, f"g{i}", loras[i])
                                      for i, p in enumerate(PROMPTS)))
    streamed = asyncio.run(main())
    expected = LLMEngine(_config(checkpoints["qwen3_moe"])).generate(PROMPTS, params, loras)
    for (ids, _, last), ref in zip(streamed, expected):
        assert ids == ref["token_ids"]
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 12


def test_the_core_freezes_its_start_up_heap_out_of_the_garbage_collectors_walks(core):
    """The core process's imports and model (torch, Triton, the engine: hundreds of thousands of
    objects) are frozen before it serves, so full collections walk only serving's objects."""
    import gc
    assert core.gc_frozen_objects > 50_000
    assert gc.get_freeze_count() == 0  # frozen in the core's process, not in this one


def test_bad_requests_are_refused_in_the_callers_process_and_the_core_keeps_serving(core, tmp_path):
    params = SamplingParams(max_tokens=3, temperature=0)

    async def main():
        with pytest.raises(InvalidRequestError, match="empty") as empty:
            await _collect(core, [], params, "empty")
        with pytest.raises(InvalidRequestError, match="outside the vocabulary") as vocab:
            await _collect(core, [10 ** 9], params, "vocab")
        assert empty.value.param == vocab.value.param == "prompt"
        with pytest.raises(AdapterLoadError):
            await _collect(core, PROMPTS[0], params, "bad-adapter", LoRARequest("t/x", str(tmp_path / "none")))
        return await _collect(core, PROMPTS[1], params, "after")
    ids, _, last = asyncio.run(main())
    assert last.finished and 1 <= len(ids) <= 3
    core.check_health()


def test_closing_a_stream_aborts_its_request_in_the_core(core):
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main():
        stream = core.generate_batches(PROMPTS[0], params, request_id="closed-early")
        first = await stream.__anext__()
        await stream.aclose()
        for _ in range(200):  # the core's stats arrive every ~0.2 s
            if core.stats()["running"] == 0 and core.stats()["waiting"] == 0:
                return first
            await asyncio.sleep(0.05)
        raise AssertionError(f"the aborted request still runs: {core.stats()}")
    first = asyncio.run(main())
    assert first and not first[-1].finished


def test_a_core_that_fails_to_start_raises_its_error_at_construction(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "not-a-model"}')
    with pytest.raises(EngineError, match="failed to start"):
        EngineCoreClient(EngineConfig(model=tmp_path, max_loras=0))


def test_a_killed_core_ends_open_streams_as_unavailable_fails_health_and_calls_on_core_exit(checkpoints):
    client = EngineCoreClient(_config(checkpoints["qwen3_moe"], max_loras=0))
    exits = []
    client.on_core_exit = lambda: exits.append(True)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main():
        stream = client.generate_batches(PROMPTS[0], params, request_id="doomed")
        await stream.__anext__()
        os.kill(client._proc.pid, signal.SIGKILL)
        with pytest.raises(EngineUnavailableError, match="stopped"):
            while True:  # outputs already queued come first; the guard turns a hang into a failure
                await asyncio.wait_for(stream.__anext__(), timeout=30)
        with pytest.raises(EngineUnavailableError, match="exited"):
            await _collect(client, PROMPTS[1], params, "late")
    try:
        asyncio.run(main())
        with pytest.raises(EngineUnavailableError, match="exited"):
            client.check_health()
        client._reader.join(timeout=30)  # it calls on_core_exit after ending the streams
        assert exits == [True]
    finally:
        client.shutdown()


_ORPHAN = """
import os, subprocess, sys, time
# the grandchild keeps a pipe to this test open, so only the watchdog can end it
child = subprocess.Popen([sys.executable, "-c", "import os, time\\n"
                          "from engine.core_process import watch_parent\\n"
                          "watch_parent(os.getppid(), 0.05)\\n"
                          "time.sleep(120)"], stdout=sys.stdout)
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read()
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_core_shut_down_by_its_client_does_not_call_on_core_exit(checkpoints):
    client = EngineCoreClient(_config(checkpoints["qwen3_moe"], max_loras=0))
    exits = []
    client.on_core_exit = lambda: exits.append(True)
    client.shutdown()
    client._reader.join(timeout=30)
    assert not client._reader.is_alive() and exits == []


def test_a_core_whose_replica_process_was_killed_exits_by_itself():
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        core_pid = int(parent.stdout.readline())
        time.sleep(0.5)
        assert not _gone(core_pid), "the watched process ended while its parent lived"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while not _gone(core_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(core_pid), "the orphaned process kept running"
    finally:
        parent.kill()
        parent.stdout.close()


def test_outputs_that_arrive_together_are_read_as_one_list_up_to_the_finished_one():
    async def main():
        streams = OutputStreams()
        queue = streams.open("r")
        exits = []
        outs = [RequestOutput("r", token_ids_delta=[i]) for i in range(4)]
        outs.append(RequestOutput("r", token_ids_delta=[4], finished=True, finish_reason="length"))
        streams.deliver(outs + [RequestOutput("other", token_ids_delta=[9])])
        await asyncio.sleep(0)  # the hand-over runs on this loop
        batches = [b async for b in read_batches(queue, exits.append)]
        return batches, exits
    batches, exits = asyncio.run(main())
    assert [[t for o in b for t in o.token_ids_delta] for b in batches] == [[0, 1, 2, 3, 4]]
    assert exits == [True]


def test_an_error_output_is_raised_after_the_outputs_before_it_and_counts_as_finished():
    async def main():
        streams = OutputStreams()
        queue = streams.open("r")
        exits, seen = [], []
        streams.deliver([RequestOutput("r", token_ids_delta=[1]),
                         RequestOutput("r", finished=True, error=EngineError("boom"))])
        await asyncio.sleep(0)
        with pytest.raises(EngineError, match="boom"):
            async for batch in read_batches(queue, exits.append):
                seen.append(batch)
        return seen, exits
    seen, exits = asyncio.run(main())
    assert [[o.token_ids_delta for o in b] for b in seen] == [[[1]]]
    assert exits == [True]


def test_a_request_id_in_use_is_refused():
    async def main():
        streams = OutputStreams()
        streams.open("same")
        with pytest.raises(InvalidRequestError, match="already in use"):
            streams.open("same")
    asyncio.run(main())


def test_with_a_min_interval_outputs_gather_and_the_last_one_is_not_held_back():
    async def main():
        streams = OutputStreams()
        stream = streams.open("r")
        reader = read_batches(stream, lambda finished: None, min_interval_s=3600.0)
        streams.deliver([RequestOutput("r", token_ids_delta=[0])])
        first = await asyncio.wait_for(reader.__anext__(), timeout=30)
        streams.deliver([RequestOutput("r", token_ids_delta=[1])])
        streams.deliver([RequestOutput("r", token_ids_delta=[2])])
        pending = asyncio.ensure_future(reader.__anext__())
        await asyncio.sleep(0.05)
        held = not pending.done()  # within the interval, not finished: still gathering
        streams.deliver([RequestOutput("r", token_ids_delta=[3], finished=True, finish_reason="length")])
        # an hour-long interval: only the final output can end this wait
        second = await asyncio.wait_for(pending, timeout=30)
        return first, held, second
    first, held, second = asyncio.run(main())
    assert [o.token_ids_delta for o in first] == [[0]]
    assert held
    assert [t for o in second for t in o.token_ids_delta] == [1, 2, 3] and second[-1].finished
