"""AsyncLLMEngine: streaming deltas, concurrency across tenants, abort, adapter errors."""
import asyncio

import pytest

from engine import (AdapterLoadError, AsyncLLMEngine, EngineConfig, EngineError, InvalidRequestError, LoRARequest,
                    SamplingParams)
from tests.engine.helpers import PROMPTS, make_engine


@pytest.fixture(scope="module")
def async_engine(checkpoints):
    eng = AsyncLLMEngine(EngineConfig(model=checkpoints["qwen3_moe"], max_loras=2, max_lora_rank=16,
                                      block_size=4, max_model_len=64, max_num_seqs=8))
    yield eng
    eng.shutdown()


async def collect(eng, prompt, params, rid, lora=None):
    text, ids, last = "", [], None
    async for out in eng.generate(prompt, params, request_id=rid, lora=lora):
        text += out.text_delta
        ids += out.token_ids_delta
        last = out
    return text, ids, last


def test_concurrent_streams_match_the_sync_engine(async_engine, checkpoints, adapters):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    lora = LoRARequest("tenant-b/ad@v1", str(adapters["qwen3_moe"]["b"]))

    async def main():
        return await asyncio.gather(*(collect(async_engine, p, params, f"c{i}", lora if i == 1 else None)
                                      for i, p in enumerate(PROMPTS)))
    results = asyncio.run(main())
    sync = make_engine(checkpoints["qwen3_moe"], max_loras=2).generate(PROMPTS, params, [None, lora, None])
    tok = async_engine.tokenizer
    for (text, ids, last), expected in zip(results, sync):
        assert ids == expected["token_ids"]
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 10
    assert async_engine.stats()["lora_slot_loads"] >= 1


def test_abort_and_bad_requests(async_engine, tmp_path):
    async def main():
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        stream = async_engine.generate(PROMPTS[0], params, request_id="to-abort")
        first = await stream.__anext__()
        async_engine.abort("to-abort")
        rest = [out async for out in stream]
        assert not first.finished and rest[-1].finish_reason == "abort"
        with pytest.raises(InvalidRequestError):
            await collect(async_engine, [], params, "empty")
        with pytest.raises(AdapterLoadError):
            await collect(async_engine, PROMPTS[1], params, "bad", LoRARequest("t/x", str(tmp_path / "none")))
        text, ids, last = await collect(async_engine, "Hello", SamplingParams(max_tokens=3), "after")
        assert last.finished and len(ids) >= 1
    asyncio.run(main())
    stats = async_engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_shutdown_ends_open_streams_with_an_error(checkpoints):
    """A stream still open when the engine shuts down ends with EngineError instead of waiting
    forever for outputs no thread will produce; later requests are refused."""
    eng = AsyncLLMEngine(EngineConfig(model=checkpoints["qwen3_moe"], max_loras=0, block_size=4,
                                      max_model_len=64, max_num_seqs=2))

    async def main():
        stream = eng.generate(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        first = await stream.__anext__()
        await asyncio.to_thread(eng.shutdown)
        with pytest.raises(EngineError, match="shut down"):
            while True:  # outputs already queued come first; the guard turns a hang into a failure
                await asyncio.wait_for(stream.__anext__(), timeout=30)
        with pytest.raises(EngineError, match="shut down"):
            await collect(eng, PROMPTS[1], SamplingParams(max_tokens=2), "late")
        return first
    assert not asyncio.run(main()).finished


def test_long_inputs_are_prepared_on_at_most_long_input_threads_at_once():
    import threading
    import time

    from engine.frontend import LONG_INPUT_THREADS, off_loop

    lock, running, most = threading.Lock(), [0], [0]

    def prepare(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i

    async def main():
        return await asyncio.gather(*(off_loop(prepare, i) for i in range(4 * LONG_INPUT_THREADS + 2)))

    assert asyncio.run(main()) == list(range(4 * LONG_INPUT_THREADS + 2))
    assert most[0] == LONG_INPUT_THREADS


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_a_long_prompt_of_token_ids_is_checked_off_the_event_loop_as_long_text_is(async_engine, monkeypatch,
                                                                                  long):
    """Ids cost their check in proportion to their number (ints, range), as text costs its
    encoding: past INLINE_CHECK_IDS ids (INLINE_TOKENIZE_CHARS characters) either is made into a
    Sequence on the long-input threads."""
    import threading

    from engine.frontend import INLINE_CHECK_IDS

    threads, make = [], async_engine.inputs.make_sequence

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return make(*args, **kwargs)
    monkeypatch.setattr(async_engine.inputs, "make_sequence", recording)
    ids = [5] * (INLINE_CHECK_IDS + 1 if long else 2049)

    async def main():
        try:
            await collect(async_engine, ids, SamplingParams(max_tokens=1), f"ids-{long}")
        except InvalidRequestError:  # past this engine's max_model_len: refused where it was checked
            pass
    asyncio.run(main())
    assert (threads[0] is not threading.main_thread()) == long
