"""Reading an LLMServer's item stream at the ingress: first item, errors, full responses.

Errors come back either as an `{"error": ...}` item (the replica caught them) or as a
Ray exception (the replica died); both become `APIError`s.
"""
import logging

from fastapi.responses import JSONResponse, StreamingResponse

from deployments.errors import ENGINE_RETRY_AFTER_S, APIError, ServiceUnavailableError
from deployments.openai_format import ResponseBuilder
from deployments.schemas import Usage

logger = logging.getLogger("ray.serve")


def lost_replica(exc: BaseException) -> APIError:
    return ServiceUnavailableError(
        f"the model replica serving this request went away ({type(exc).__name__}); retry",
        code="replica_unavailable", retry_after_s=ENGINE_RETRY_AFTER_S)


async def first_item(items, request_id: str) -> dict:
    try:
        first = await items.__anext__()
    except StopAsyncIteration:
        raise ServiceUnavailableError("the replica closed the stream without output; retry",
                                      code="empty_stream") from None
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray errors (actor died, unavailable)
        logger.warning("request %s: replica call failed: %s", request_id, type(exc).__name__)
        raise lost_replica(exc) from exc
    if "error" in first:
        raise error_from_item(first["error"])
    return first


def error_from_item(error: dict) -> APIError:
    exc = APIError(error["message"], code=error.get("code"), param=error.get("param"),
                   retry_after_s=error.get("retry_after_s"))
    exc.status_code, exc.error_type = error["status"], error["type"]
    return exc


async def collect(builder: ResponseBuilder, first: dict, items) -> JSONResponse:
    text, ids, logprobs, last = await read_rest(first, items)
    usage = Usage.of_item(last)
    return JSONResponse(builder.full(text, last["finish_reason"], usage, ids, logprobs, last.get("stop_reason")))


async def read_rest(first: dict, items) -> tuple[str, list[int], list | None, dict]:
    """A request's whole output from its first item on: (text, token ids, logprob entries or
    None, the last item, which carries the finish reason and the token counts)."""
    text, ids, item = [first["text"]], list(first.get("token_ids", ())), first
    logprobs = None if first.get("logprobs") is None else list(first["logprobs"])
    while item.get("finish_reason") is None:
        item = await next_item(items)
        if "error" in item:
            raise error_from_item(item["error"])
        text.append(item["text"])
        ids.extend(item.get("token_ids", ()))
        if item.get("logprobs") is not None:
            logprobs = logprobs if logprobs is not None else []
            logprobs.extend(item["logprobs"])
    return "".join(text), ids, logprobs, item


async def next_item(items) -> dict:
    """The replica stream's next item, after its first; an APIError when the stream ended early or
    the replica failed."""
    try:
        return await items.__anext__()
    except StopAsyncIteration:
        raise ServiceUnavailableError("the stream ended before the request finished; retry",
                                      code="truncated_stream") from None
    except Exception as exc:  # noqa: BLE001
        raise lost_replica(exc) from exc


class StreamEnd:
    """Lets go of a streamed response's hold, once: the tenant's places (`release`) and, when the
    response ends before its replica streams do, those streams (cancelled, so the engine stops
    decoding them). The body's own end and the response's end both call it: Starlette never
    iterates a body whose response start fails (the client gone before the first byte)."""

    def __init__(self, release, streams: list):
        self._release, self._streams, self.closed = release, streams, False

    def close(self, cancel: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if cancel:
            for items in self._streams:
                items.cancel()
        self._release()


class EndingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its StreamEnd however the response ends."""

    def __init__(self, content, end: StreamEnd, **kwargs):
        super().__init__(content, **kwargs)
        self._end = end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._end.close(cancel=True)  # a no-op after the body's own end
