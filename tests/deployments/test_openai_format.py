"""vLLM's `return_token_ids` extension: token ids on every choice, streamed and whole (units)."""
import asyncio
import json

import pytest

from deployments.openai_format import CHAT, COMPLETION, ResponseBuilder, sse_events
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
        return [line async for line in sse_events(builder, _aiter(ITEMS), include_usage=True)]

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
