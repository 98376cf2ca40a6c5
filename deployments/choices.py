"""Several choices for one request (OpenAI's `n` > 1): one replica stream a choice, merged.

Each choice is a request of its own to the engine replicas (its own request id, `<id>-<i>`, and
with a `seed`, seed + i, so that seeded choices differ from each other and repeat from one call to
the next). The response numbers them by `index`; its usage counts the prompt once and every
choice's tokens. A response starts once every choice has its first token (the Server-Timing
header: choice 0's phases, and that moment as `ttft`); a stream then interleaves the choices'
chunks as they come and ends once every choice has finished.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse

from deployments.errors import APIError
from deployments.openai_format import ResponseBuilder, StreamUsage, chunk_line, error_line, sse
from deployments.replica_stream import first_item, next_item, read_rest
from deployments.schemas import Usage


def choice_payloads(payload: dict, n: int, prompts: list | None = None) -> list[dict]:
    """The replica payload of each of n choices of each prompt of a batch (None: the payload's own
    prompt or messages), choice j of prompt i at i * n + j, its seed seed + j."""
    out = []
    for p, prompt in enumerate(prompts or [None]):
        for i in range(n):
            sampling = dict(payload["sampling"])
            if sampling.get("seed") is not None:  # wrapped within torch.Generator's seeds, [-2**63, 2**64)
                seed = sampling["seed"] + i
                sampling["seed"] = seed - 2**64 if seed >= 2**64 else seed
            choice = {**payload, "request_id": f"{payload['request_id']}-{p * n + i}", "sampling": sampling}
            if prompt is not None:
                choice["prompt"] = prompt
            out.append(choice)
    return out


async def first_items(streams: list, request_id: str) -> list[dict]:
    """Every choice's first item; if one fails, the others are cancelled and its error raised."""
    try:
        return list(await asyncio.gather(*(first_item(items, request_id) for items in streams)))
    except BaseException:
        for items in streams:
            items.cancel()
        raise


async def collect_choices(builders: list[ResponseBuilder], firsts: list[dict], streams: list,
                          n: int | None = None) -> JSONResponse:
    """The whole response of every choice (the choices read side by side); if one fails, the
    others are cancelled and its error raised."""
    reads = [asyncio.ensure_future(read_rest(first, items)) for first, items in zip(firsts, streams)]
    try:
        done = await asyncio.gather(*reads)
    except BaseException:
        for read, items in zip(reads, streams):
            read.cancel()
            items.cancel()
        raise
    choices = [b.whole_choice(text, last["finish_reason"], ids, logprobs, last.get("stop_reason"))
               for b, (text, ids, logprobs, last) in zip(builders, done)]
    return JSONResponse(builders[0].whole(choices, _usage([last for *_, last in done], n)))


async def merged_events(builders: list[ResponseBuilder], firsts: list[dict], streams: list,
                        usage: StreamUsage, n: int | None = None) -> AsyncIterator[str]:
    """SSE lines of every choice's chunks in the order they come, then the usage and [DONE]; a
    choice that fails ends the stream with its error event and [DONE]."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: dict, items) -> None:
        try:
            await queue.put((index, first))
            item = first
            while item.get("finish_reason") is None and "error" not in item:
                item = await next_item(items)
                await queue.put((index, item))
        except APIError as exc:  # the stream ended early or the replica died mid-stream
            await queue.put((index, exc.body()))

    tasks = [asyncio.ensure_future(pump(i, first, items)) for i, (first, items) in enumerate(zip(firsts, streams))]
    started, last = [False] * len(builders), [None] * len(builders)
    try:
        while any(item is None for item in last):
            index, item = await queue.get()
            if "error" in item:  # the error event, then [DONE] as one choice's stream ends (sse_events)
                yield error_line(item)
                yield sse("[DONE]")
                return
            line = chunk_line(builders[index], item, not started[index], usage)
            if line is not None:
                yield line
                started[index] = True
            if item.get("finish_reason") is not None:
                last[index] = item
        if usage.include_usage:
            yield sse(builders[0].usage_chunk(_usage(last, n)))
        yield sse("[DONE]")
    finally:
        for task in tasks:
            task.cancel()
        for items, item in zip(streams, last):
            if item is None:  # the client left, or another choice failed: stop this one's decoding
                items.cancel()


def _usage(lasts: list[dict], n: int | None = None) -> Usage:
    """Each prompt once (a batch's prompts have n choices each; None: one prompt), every choice's
    completion tokens."""
    firsts = lasts[::n or len(lasts)]  # the first choice of each prompt
    return Usage.of(sum(item["prompt_tokens"] for item in firsts), sum(item["completion_tokens"] for item in lasts),
                    sum(item.get("cached_tokens", 0) for item in firsts))
