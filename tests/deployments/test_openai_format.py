"""Response shapes from replica items (units): vLLM's `return_token_ids` (token ids on every
choice, streamed and whole) and OpenAI's logprobs of completions and chats."""
import asyncio
import json

import pytest

from deployments.openai_format import CHAT, COMPLETION, ResponseBuilder, StreamUsage, sse_events
from deployments.replica_stream import collect
from deployments.schemas import ChatCompletionRequest, CompletionRequest

# Replica items as LLMServer.generate yields them; the middle one's tokens decode to no text
# yet (an incomplete UTF-8 sequence, or ids past a small tokenizer).
ITEMS = [
    {"text": "Hel", "num_tokens": 2, "token_ids": [11, 12]},
    {"text": "", "num_tokens": 1, "token_ids": [300]},
    {"text": "lo", "num_tokens": 2, "token_ids": [13, 14], "finish_reason": "length",
     "prompt_tokens": 4, "completion_tokens": 5},
]
ALL_IDS = [11, 12, 300, 13, 14]


async def _aiter(items):
    for item in items:
        yield item


def _stream(kind: str, return_token_ids: bool) -> list[dict]:
    async def run():
        builder = ResponseBuilder(kind, "cmpl-1", "m", return_token_ids)
        return [line async for line in sse_events(builder, _aiter(ITEMS), StreamUsage(True))]

    lines = asyncio.run(run())
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def _whole(kind: str, return_token_ids: bool) -> dict:
    async def run():
        builder = ResponseBuilder(kind, "cmpl-1", "m", return_token_ids)
        items = _aiter(ITEMS[1:])
        return await collect(builder, ITEMS[0], items)

    return json.loads(asyncio.run(run()).body)


@pytest.mark.parametrize("kind", [COMPLETION, CHAT])
def test_streamed_chunks_carry_each_items_token_ids_including_textless_ones(kind):
    chunks = [c for c in _stream(kind, True) if c["choices"]]
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[11, 12], [300], [13, 14]]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == ALL_IDS


@pytest.mark.parametrize("kind", [COMPLETION, CHAT])
def test_streamed_chunks_have_no_token_ids_unless_asked(kind):
    chunks = [c for c in _stream(kind, False) if c["choices"]]
    assert all("token_ids" not in c["choices"][0] for c in chunks)
    # without ids, a chunk with no text and no finish reason is not sent
    assert len(chunks) == 2


@pytest.mark.parametrize("kind", [COMPLETION, CHAT])
def test_whole_response_carries_all_generated_ids_when_asked(kind):
    body = _whole(kind, True)
    assert body["choices"][0]["token_ids"] == ALL_IDS
    assert body["usage"]["completion_tokens"] == len(ALL_IDS)
    assert "token_ids" not in _whole(kind, False)["choices"][0]


def test_usage_chunk_has_no_choices_so_no_token_ids():
    usage = [c for c in _stream(COMPLETION, True) if not c["choices"]]
    assert len(usage) == 1 and usage[0]["usage"]["total_tokens"] == 9


def test_return_token_ids_is_an_optional_bool_on_both_endpoints():
    completion = CompletionRequest(model="m", prompt=[1, 2], return_token_ids=True)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert completion.return_token_ids is True and chat.return_token_ids is False
    assert "return_token_ids" not in completion.sampling()
    with pytest.raises(ValueError):
        CompletionRequest(model="m", prompt="x", return_token_ids="maybe")


# ---- logprobs: the replica's entries [text, logprob, [[text, logprob], ...]] in OpenAI's shapes
LOGPROB_ITEMS = [
    {"text": "Hé", "num_tokens": 2, "token_ids": [11, 12],
     "logprobs": [["H", -0.5, [["H", -0.5], ["A", -1.5]]], ["é", -0.25, [["é", -0.25], ["e", -2.0]]]]},
    {"text": "!", "num_tokens": 1, "token_ids": [13], "logprobs": [["!", -0.75, [["!", -0.75], [".", -1.0]]]],
     "finish_reason": "length", "prompt_tokens": 4, "completion_tokens": 3},
]


def _logprob_chunks(kind: str) -> list[dict]:
    async def run():
        builder = ResponseBuilder(kind, "cmpl-1", "m")
        return [line async for line in sse_events(builder, _aiter(LOGPROB_ITEMS), StreamUsage())]
    return [json.loads(line[6:]) for line in asyncio.run(run()) if line != "data: [DONE]\n\n"]


def test_completion_logprobs_are_the_legacy_lists_with_offsets_running_across_chunks():
    chunks = [c["choices"][0]["logprobs"] for c in _logprob_chunks(COMPLETION)]
    assert chunks == [
        {"tokens": ["H", "é"], "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"H": -0.5, "A": -1.5},
                                                                                 {"é": -0.25, "e": -2.0}],
         "text_offset": [0, 1]},
        {"tokens": ["!"], "token_logprobs": [-0.75], "top_logprobs": [{"!": -0.75, ".": -1.0}], "text_offset": [2]}]


def test_chat_logprobs_carry_each_tokens_utf8_bytes_and_alternatives_whole_or_streamed():
    first = {"token": "H", "logprob": -0.5, "bytes": [72],
             "top_logprobs": [{"token": "H", "logprob": -0.5, "bytes": [72]},
                              {"token": "A", "logprob": -1.5, "bytes": [65]}]}
    streamed = [e for c in _logprob_chunks(CHAT) for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed[0] == first and streamed[1]["bytes"] == [0xC3, 0xA9] and len(streamed) == 3

    async def whole():
        builder = ResponseBuilder(CHAT, "chatcmpl-1", "m")
        return json.loads((await collect(builder, LOGPROB_ITEMS[0], _aiter(LOGPROB_ITEMS[1:]))).body)
    body = asyncio.run(whole())
    assert body["choices"][0]["logprobs"] == {"content": streamed, "refusal": None}


def _strict_json(text: str):
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are no numbers there."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("kind", [COMPLETION, CHAT])
def test_non_finite_logprobs_become_vllms_floor_so_the_body_stays_json(kind):
    """An adapter whose weights overflow gives NaN logits: the choice still parses (it was a 500
    from the JSON encoder, or a bare NaN in a stream), with -9999.0 as vLLM writes -inf."""
    nan, inf = float("nan"), float("inf")
    items = [{"text": "a", "num_tokens": 1, "token_ids": [11], "logprobs": [["a", nan, [["a", nan], ["b", -inf]]]]},
             {"text": "c", "num_tokens": 1, "token_ids": [12], "logprobs": [["c", -inf, [["c", -inf]]]],
              "finish_reason": "length", "prompt_tokens": 2, "completion_tokens": 2}]

    async def run():
        streamed = [line async for line in sse_events(ResponseBuilder(kind, "x-1", "m"), _aiter(items), StreamUsage())]
        whole = await collect(ResponseBuilder(kind, "x-2", "m"), items[0], _aiter(items[1:]))
        return streamed, whole
    streamed, whole = asyncio.run(run())
    chunks = [_strict_json(line[6:]) for line in streamed if line != "data: [DONE]\n\n"]
    body = _strict_json(whole.body)
    if kind == COMPLETION:
        assert body["choices"][0]["logprobs"]["token_logprobs"] == [-9999.0, -9999.0]
        assert body["choices"][0]["logprobs"]["top_logprobs"][0] == {"a": -9999.0, "b": -9999.0}
        assert [c["choices"][0]["logprobs"]["token_logprobs"] for c in chunks] == [[-9999.0], [-9999.0]]
    else:
        content = body["choices"][0]["logprobs"]["content"]
        assert [e["logprob"] for e in content] == [-9999.0, -9999.0]
        assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-9999.0, -9999.0]
        assert [e["logprob"] for c in chunks for e in c["choices"][0]["logprobs"]["content"]] == [-9999.0, -9999.0]


def test_items_without_logprobs_give_null_logprobs():
    assert all(chunk["choices"][0]["logprobs"] is None for chunk in _stream(COMPLETION, False) if chunk["choices"])
    assert all(chunk["choices"][0]["logprobs"] is None for chunk in _stream(CHAT, False) if chunk["choices"])


@pytest.mark.parametrize("body,message", [
    ({"logprobs": 21}, "less than or equal to 20"),
    ({"logprobs": True}, "valid integer"),
    ({"top_logprobs": 2}, "top_logprobs is the chat API's"),
])
def test_completion_logprobs_out_of_range_or_in_chats_spelling_are_refused(body, message):
    with pytest.raises(ValueError, match=message):
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", **body})


def test_chat_logprobs_become_the_engines_alternatives_count():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate(chat).sampling()["logprobs"] is None
    assert ChatCompletionRequest.model_validate({**chat, "logprobs": True}).sampling()["logprobs"] == 0
    asked = {**chat, "logprobs": True, "top_logprobs": 5}
    assert ChatCompletionRequest.model_validate(asked).sampling()["logprobs"] == 5
    assert CompletionRequest.model_validate({"model": "m", "prompt": "hi", "logprobs": 3}).sampling()["logprobs"] == 3
    with pytest.raises(ValueError, match="top_logprobs needs logprobs: true"):
        ChatCompletionRequest.model_validate({**chat, "top_logprobs": 2})


def test_completion_top_logprobs_add_the_sampled_token_when_not_among_them_and_keep_the_likelier_of_equal_texts():
    builder = ResponseBuilder(COMPLETION, "cmpl-1", "m")
    out = builder.logprobs([["z", -3.0, [["a", -0.5], ["\ufffd", -1.0], ["\ufffd", -2.0]]]])
    assert out["top_logprobs"] == [{"a": -0.5, "\ufffd": -1.0, "z": -3.0}]


@pytest.mark.parametrize("kind", [COMPLETION, CHAT])
@pytest.mark.parametrize("stop_reason", ["\n\n", 42, None], ids=["stop_string", "stop_token_id", "none"])
def test_stop_reason_is_vllms_on_the_last_chunk_and_the_whole_choice(kind, stop_reason):
    items = [dict(item) for item in ITEMS]
    items[-1].update(finish_reason="stop", stop_reason=stop_reason)

    async def run():
        streamed = [line async for line in sse_events(ResponseBuilder(kind, "cmpl-1", "m"), _aiter(items),
                                                      StreamUsage())]
        whole = await collect(ResponseBuilder(kind, "cmpl-1", "m"), items[0], _aiter(items[1:]))
        return streamed, json.loads(whole.body)

    streamed, whole = asyncio.run(run())
    chunks = [json.loads(line[6:]) for line in streamed if line != "data: [DONE]\n\n"]
    assert [c["choices"][0]["stop_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [stop_reason]
    assert whole["choices"][0]["finish_reason"] == "stop" and whole["choices"][0]["stop_reason"] == stop_reason


@pytest.mark.parametrize("kind", [COMPLETION, CHAT])
def test_continuous_usage_stats_put_the_counts_so_far_on_every_chunk(kind):
    """vLLM's stream_options.continuous_usage_stats: each chunk's usage is the prompt and the
    tokens made up to it (a textless item's tokens counted in the next chunk), then the totals."""
    items = [{**ITEMS[0], "prompt_tokens": 4}, *ITEMS[1:]]

    async def run():
        builder = ResponseBuilder(kind, "cmpl-1", "m")
        return [line async for line in sse_events(builder, _aiter(items), StreamUsage(True, continuous=True))]
    chunks = [json.loads(line[6:]) for line in asyncio.run(run()) if line != "data: [DONE]\n\n"]
    assert [c["usage"] for c in chunks] == [
        {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
        {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
        {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}},
    ]
    assert StreamUsage(False, continuous=True).of_chunk(0, items[0]) is None  # only with include_usage, as vLLM
