"""OpenAI response bodies and SSE chunks built from the replica's stream items."""
from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator

from deployments.schemas import Usage
from deployments.token_bytes import shown, token_bytes
from deployments.tool_calls import ToolPlan, ToolStream, parse

COMPLETION, CHAT = "text_completion", "chat.completion"


class ResponseBuilder:
    """Turns replica items into OpenAI completion / chat completion JSON for one request.

    With `return_token_ids` (vLLM's extension) each choice also carries `token_ids`: the
    generated ids of that chunk when streaming, all of them in a whole response.
    """

    def __init__(self, kind: str, request_id: str, model: str, return_token_ids: bool = False,
                 index: int = 0, created: int | None = None, tools: ToolPlan | None = None):
        """index: the choice this builder makes (n > 1: one builder a choice, sharing `created`);
        tools: a chat request's tools (deployments/tool_calls.py): calls come back as tool_calls."""
        self.kind, self.request_id, self.model = kind, request_id, model
        self.return_token_ids, self.index = return_token_ids, index
        self.created = int(time.time()) if created is None else created
        self._text_offset = 0  # characters of the tokens' texts so far (completions' text_offset)
        self.tools = tools if kind == CHAT else None
        self._tool_stream = ToolStream(tools) if self.tools is not None else None

    def logprobs(self, entries: list | None) -> dict | None:
        """OpenAI's `logprobs` of a choice from the replica's entries, one a token:
        [token text, logprob, [[alternative text, logprob], ...]]. Completions: the legacy lists
        (tokens, token_logprobs, top_logprobs as text -> logprob, text_offset); chat: `content`,
        a list of {token, logprob, bytes, top_logprobs}. None when the request asked for none.
        A logprob that is not finite (-inf, or NaN where an adapter's weights made the logits
        overflow) is written as LOGPROB_FLOOR: JSON has no such numbers, so a client's parser
        would refuse the body."""
        if entries is None:
            return None
        entries = [(text, _finite(logprob), [(t, _finite(lp)) for t, lp in alternatives])
                   for text, logprob, alternatives in entries]
        if self.kind == COMPLETION:  # texts only, as shown: the legacy shape has no bytes
            entries = [(shown(text), logprob, [(shown(t), lp) for t, lp in alternatives])
                       for text, logprob, alternatives in entries]
            offsets = []
            for text, _, _ in entries:
                offsets.append(self._text_offset)
                self._text_offset += len(text)
            return {"tokens": [text for text, _, _ in entries],
                    "token_logprobs": [logprob for _, logprob, _ in entries],
                    "top_logprobs": [_top_by_text(text, logprob, alternatives)
                                     for text, logprob, alternatives in entries],
                    "text_offset": offsets}
        return {"content": [{**_chat_logprob(text, logprob),
                             "top_logprobs": [_chat_logprob(t, lp) for t, lp in alternatives]}
                            for text, logprob, alternatives in entries], "refusal": None}

    def _head(self, obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def _with_ids(self, choice: dict, token_ids: list[int] | None) -> dict:
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids or [])
        return choice

    def chunk(self, text: str, finish_reason: str | None, first: bool = False,
              token_ids: list[int] | None = None, logprobs: list | None = None,
              stop_reason: int | str | None = None) -> dict:
        if self.kind == COMPLETION:
            choice = {"index": self.index, "text": text, "logprobs": self.logprobs(logprobs),
                      "finish_reason": finish_reason, "stop_reason": stop_reason}
            return {**self._head(COMPLETION), "choices": [self._with_ids(choice, token_ids)]}
        calls = []
        if self._tool_stream is not None:
            text = self._tool_stream.feed(text)
            if finish_reason is not None:
                tail, calls = self._tool_stream.finish()
                text += tail
                finish_reason = _finish_with(finish_reason, calls, self.tools)
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        if finish_reason is not None and not text:
            delta = {"role": "assistant"} if first else {}
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        choice = {"index": self.index, "delta": delta, "logprobs": self.logprobs(logprobs),
                  "finish_reason": finish_reason, "stop_reason": stop_reason}
        return {**self._head("chat.completion.chunk"), "choices": [self._with_ids(choice, token_ids)]}

    def usage_chunk(self, usage: Usage) -> dict:
        obj = COMPLETION if self.kind == COMPLETION else "chat.completion.chunk"
        return {**self._head(obj), "choices": [], "usage": usage.model_dump()}

    def full(self, text: str, finish_reason: str, usage: Usage, token_ids: list[int] | None = None,
             logprobs: list | None = None, stop_reason: int | str | None = None) -> dict:
        return self.whole([self.whole_choice(text, finish_reason, token_ids, logprobs, stop_reason)], usage)

    def whole(self, choices: list[dict], usage: Usage) -> dict:
        """A whole (not streamed) response of these choices (whole_choice's)."""
        return {**self._head(self.kind), "choices": choices, "usage": usage.model_dump()}

    def whole_choice(self, text: str, finish_reason: str, token_ids: list[int] | None = None,
                     logprobs: list | None = None, stop_reason: int | str | None = None) -> dict:
        """One choice of a whole response; stop_reason is vLLM's: the stop string or stop token
        id that ended it, else None."""
        if self.kind == COMPLETION:
            choice = {"index": self.index, "text": text}
        elif self.tools is not None:
            content, calls = parse(self.tools, text)
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": self.index, "message": message}
            finish_reason = _finish_with(finish_reason, calls, self.tools)
        else:
            choice = {"index": self.index, "message": {"role": "assistant", "content": text}}
        choice.update(logprobs=self.logprobs(logprobs), finish_reason=finish_reason, stop_reason=stop_reason)
        return self._with_ids(choice, token_ids)


def _finish_with(finish_reason: str, calls: list, plan: ToolPlan) -> str:
    """A choice that made calls finishes with "tool_calls" where it stopped of itself; under a
    named tool_choice OpenAI (and vLLM) say "stop"."""
    return "tool_calls" if calls and finish_reason == "stop" and plan.mode != "named" else finish_reason


LOGPROB_FLOOR = -9999.0  # vLLM's floor for a logprob of -inf


def _finite(logprob: float | None) -> float | None:
    return logprob if logprob is None or math.isfinite(logprob) else LOGPROB_FLOOR


def _top_by_text(text: str, logprob: float | None, alternatives: list) -> dict[str, float] | None:
    """A completion token's `top_logprobs`: the alternatives by text, most likely first, and the
    sampled token too when it is not among them (OpenAI's and vLLM's up to n + 1); tokens whose
    texts are equal (parts of one character, say) keep the most likely's. None for an echoed
    prompt's first token, which has no logprob."""
    if logprob is None:
        return None
    top: dict[str, float] = {}
    for alternative, value in alternatives:
        top.setdefault(alternative, value)
    top.setdefault(text, logprob)
    return top


def _chat_logprob(text: str, logprob: float) -> dict:
    return {"token": shown(text), "logprob": logprob, "bytes": token_bytes(text)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_line(item: dict) -> str:
    """The SSE error event of a replica's error item."""
    return sse({"error": {k: v for k, v in item["error"].items() if k not in ("status", "retry_after_s")}})


class StreamUsage:
    """What a stream tells of its usage (OpenAI's stream_options): with `include_usage` a last
    chunk of the totals and `usage: null` on the others; with vLLM's `continuous_usage_stats`
    too, every chunk its choice's counts so far instead of null."""

    def __init__(self, include_usage: bool = False, continuous: bool = False):
        self.include_usage, self.continuous = include_usage, include_usage and continuous
        # by choice index: a batch's choices have prompts of their own
        self._prompt_tokens: dict[int, int] = {}
        self._completion_tokens: dict[int, int] = {}

    def of_chunk(self, index: int, item: dict) -> dict | None:
        """The usage field of a choice's chunk made from `item` (with continuous_usage_stats every
        item is counted; without, none is: the last chunk's totals come from the last item)."""
        if not self.continuous:
            return None
        if "prompt_tokens" in item:
            self._prompt_tokens[index] = item["prompt_tokens"]
        done = self._completion_tokens[index] = self._completion_tokens.get(index, 0) + item.get("num_tokens", 0)
        prompt = self._prompt_tokens.get(index, 0)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def chunk_line(builder: ResponseBuilder, item: dict, first: bool, usage: StreamUsage) -> str | None:
    """The SSE chunk of a replica item, or None when it makes none: tokens that decode to no text
    yet still make one when their ids or logprobs were asked for."""
    counts = usage.of_chunk(builder.index, item)
    finish, ids, logprobs = item.get("finish_reason"), item.get("token_ids"), item.get("logprobs")
    if not (item["text"] or finish is not None or first or (builder.return_token_ids and ids) or logprobs):
        return None
    chunk = builder.chunk(item["text"], finish, first=first, token_ids=ids, logprobs=logprobs,
                          stop_reason=item.get("stop_reason"))
    held = builder.tools is not None and chunk["choices"][0]["delta"] == {"content": ""}
    if held and finish is None and not first and not (builder.return_token_ids and ids) and not logprobs:
        return None  # text held back as a possible tool call (deployments/tool_calls.py)
    if usage.include_usage:  # OpenAI: null on every chunk but the last, which has the numbers
        chunk["usage"] = counts
    return sse(chunk)


async def sse_events(builder: ResponseBuilder, items: AsyncIterator[dict],
                     usage: StreamUsage) -> AsyncIterator[str]:
    """SSE lines for a stream of replica items; an error item becomes an error event."""
    first = True
    async for item in items:
        if "error" in item:
            yield error_line(item)
            break
        line = chunk_line(builder, item, first, usage)
        if line is not None:
            yield line
            first = False
        if item.get("finish_reason") is not None:
            if usage.include_usage:
                usage = Usage.of_item(item)
                yield sse(builder.usage_chunk(usage))
            break
    yield sse("[DONE]")
