"""deployments/choices.py: n choices as n replica streams, merged; a failing choice or a client
that leaves cancels the others (units, with stand-in replica streams)."""
import asyncio
import json

import pytest

from deployments.choices import choice_payloads, collect_choices, first_items, merged_events
from deployments.errors import APIError
from deployments.openai_format import COMPLETION, ResponseBuilder, StreamUsage


class Stream:
    """A replica stream: its items, then (optionally) an exception; records cancel()."""

    def __init__(self, items, fail: Exception | None = None, hang: bool = False):
        self.items, self.fail, self.hang, self.cancelled = list(items), fail, hang, False

    def cancel(self):
        self.cancelled = True

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.sleep(3600)
        raise StopAsyncIteration


def item(text, finish=None):
    out = {"text": text, "num_tokens": 1, "token_ids": [ord(text[0])] if text else []}
    if finish:
        out.update(finish_reason=finish, prompt_tokens=4, completion_tokens=2)
    return out


def builders(n):
    return [ResponseBuilder(COMPLETION, "cmpl-1", "m", index=i, created=7) for i in range(n)]


def run(coro):
    return asyncio.run(coro)


def test_each_choice_gets_its_own_request_id_and_seed_wrapped_within_the_generators_range():
    payload = {"request_id": "cmpl-1", "prompt": "hi", "sampling": {"seed": 2**64 - 2, "temperature": 1.0}}
    out = choice_payloads(payload, 3)
    assert [p["request_id"] for p in out] == ["cmpl-1-0", "cmpl-1-1", "cmpl-1-2"]
    assert [p["sampling"]["seed"] for p in out] == [2**64 - 2, 2**64 - 1, 0]  # 2**64 wraps to 0
    assert payload["sampling"]["seed"] == 2**64 - 2  # the request's own payload is not changed
    unseeded = choice_payloads({"request_id": "r", "sampling": {"seed": None}}, 2)
    assert [p["sampling"]["seed"] for p in unseeded] == [None, None]


def test_whole_response_numbers_the_choices_and_counts_the_prompt_once():
    streams = [Stream([item("a"), item("b", "length")]), Stream([item("c"), item("d", "stop")])]

    async def whole():
        firsts = await first_items(streams, "cmpl-1")
        return json.loads((await collect_choices(builders(2), firsts, streams)).body)
    body = run(whole())
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [(0, "ab", "length"),
                                                                                        (1, "cd", "stop")]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert not any(s.cancelled for s in streams)


def test_a_choice_failing_in_a_whole_response_cancels_the_others():
    streams = [Stream([item("a")], fail=RuntimeError("replica died")), Stream([item("c")], hang=True)]

    async def whole():
        firsts = await first_items(streams, "cmpl-1")
        await collect_choices(builders(2), firsts, streams)
    with pytest.raises(APIError):
        run(whole())
    assert streams[1].cancelled


def _lines(streams, include_usage=True, stop_after=None):
    async def go():
        firsts = await first_items(streams, "cmpl-1")
        lines, out = merged_events(builders(len(streams)), firsts, streams, StreamUsage(include_usage)), []
        async for line in lines:
            out.append(line)
            if stop_after is not None and len(out) == stop_after:
                await lines.aclose()  # what a client that leaves does to the response
                break
        return out
    return run(go())


def test_a_stream_interleaves_the_choices_then_sends_the_usage_once_all_finished():
    lines = _lines([Stream([item("a"), item("b", "length")]), Stream([item("c", "stop")])])
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]\n\n"
    texts = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "ab", 1: "c"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_choice_failing_mid_stream_ends_the_stream_with_its_error_then_done_and_cancels_the_others():
    """[DONE] follows the error as it does with one choice: clients that wait for it hung."""
    streams = [Stream([item("a")], fail=RuntimeError("replica died")), Stream([item("c")], hang=True)]
    lines = _lines(streams)
    assert "error" in json.loads(lines[-2][6:]) and lines[-1] == "data: [DONE]\n\n" and streams[1].cancelled


def test_a_client_leaving_cancels_every_choice_still_decoding():
    streams = [Stream([item("a")], hang=True), Stream([item("c")], hang=True)]
    _lines(streams, stop_after=1)
    assert all(s.cancelled for s in streams)


def test_a_batch_gives_each_prompt_its_n_choices_prompt_major_with_the_same_seeds():
    payload = {"request_id": "cmpl-1", "prompt": "a", "sampling": {"seed": 5}}
    out = choice_payloads(payload, 2, ["a", [7, 8]])
    assert [(p["request_id"], p["prompt"], p["sampling"]["seed"]) for p in out] == [
        ("cmpl-1-0", "a", 5), ("cmpl-1-1", "a", 6), ("cmpl-1-2", [7, 8], 5), ("cmpl-1-3", [7, 8], 6)]


def _last(prompt_tokens, completion_tokens, cached=0):
    return {"text": "x", "num_tokens": 1, "finish_reason": "length", "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "cached_tokens": cached}


def test_a_batchs_usage_counts_each_prompt_once_and_every_choices_tokens():
    streams = [Stream([_last(10, 2, 8)]), Stream([_last(10, 3, 8)]), Stream([_last(3, 4)]), Stream([_last(3, 5)])]

    async def whole():
        firsts = await first_items(streams, "cmpl-1")
        return json.loads((await collect_choices(builders(4), firsts, streams, n=2)).body)
    assert run(whole())["usage"] == {"prompt_tokens": 13, "completion_tokens": 14, "total_tokens": 27,
                                     "prompt_tokens_details": {"cached_tokens": 8}}


class TakingTurns(Stream):
    """A stream whose items each wait a loop turn: the choices' chunks interleave."""

    async def __anext__(self):
        await asyncio.sleep(0)
        return await super().__anext__()


def test_continuous_usage_gives_each_choice_of_a_batch_its_own_prompts_count():
    first = [{**item("a"), "prompt_tokens": 10}, {**item("c"), "prompt_tokens": 3}]
    streams = [TakingTurns([first[0], item("b"), _last(10, 3)]), TakingTurns([first[1], item("d"), _last(3, 3)])]

    async def go():
        firsts = await first_items(streams, "cmpl-1")
        return [line async for line in merged_events(builders(2), firsts, streams, StreamUsage(True, True), n=1)]
    chunks = [json.loads(line[6:]) for line in run(go())[:-1]]
    assert [c["choices"][0]["index"] for c in chunks[:-1]] != [0, 0, 0, 1, 1, 1]  # they did interleave
    for chunk in chunks[:-1]:  # the last is the totals
        index, usage = chunk["choices"][0]["index"], chunk["usage"]
        assert usage["prompt_tokens"] == (10, 3)[index]
    assert chunks[-1]["usage"]["prompt_tokens"] == 13
