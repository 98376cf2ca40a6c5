"""OpenAI response bodies and SSE chunks built from the replica's stream items."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from deployments.schemas import Usage

COMPLETION, CHAT = "text_completion", "chat.completion"


class ResponseBuilder:
    """Turns replica items into OpenAI completion / chat completion JSON for one request."""

    def __init__(self, kind: str, request_id: str, model: str):
        self.kind, self.request_id, self.model = kind, request_id, model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: str | None, first: bool = False) -> dict:
        if self.kind == COMPLETION:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head(COMPLETION), "choices": [choice]}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        if finish_reason is not None and not text:
            delta = {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict:
        obj = COMPLETION if self.kind == COMPLETION else "chat.completion.chunk"
        return {**self._head(obj), "choices": [], "usage": usage.model_dump()}

    def full(self, text: str, finish_reason: str, usage: Usage) -> dict:
        if self.kind == COMPLETION:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(self.kind), "choices": [choice], "usage": usage.model_dump()}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def sse_events(builder: ResponseBuilder, items: AsyncIterator[dict],
                     include_usage: bool) -> AsyncIterator[str]:
    """SSE lines for a stream of replica items; an error item becomes an error event."""
    first = True
    async for item in items:
        if "error" in item:
            yield sse({"error": {k: v for k, v in item["error"].items() if k != "status"}})
            break
        finish = item.get("finish_reason")
        if item["text"] or finish is not None or first:
            yield sse(builder.chunk(item["text"], finish, first=first))
            first = False
        if finish is not None:
            if include_usage:
                usage = Usage.of(item["prompt_tokens"], item["completion_tokens"])
                yield sse(builder.usage_chunk(usage))
            break
    yield sse("[DONE]")
