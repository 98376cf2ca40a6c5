"""ASGI guards of the ingress: a cap on request bodies, the API docs as the operator's choice, and
the count of the model routes' requests by the status they were answered with.

A JSON body is read whole and parsed before a route sees it, and a prompt is tokenised before its
length can be checked, so an 8 MB prompt held a worker for seconds only to be refused.
`BodyLimitMiddleware` answers 413 with OpenAI's error JSON as soon as the declared
`content-length` or the bytes received pass the cap; no route parses it. (Behind Serve's Python
proxy, the proxy and replica still receive the whole body before the app sees it: a cap on
bytes in flight belongs at the load balancer there.) Uploads have their own, larger limit
(deployments/uploads.py) and are left to it.

`map_large_allocations` keeps what big bodies cost the ingress from staying with it after;
`bound_direct_ingress_receive` keeps a body that arrives faster than the ingress reads it from
piling up there in Serve's HAProxy mode.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from deployments.errors import NotFoundError, PayloadTooLargeError

_UPLOAD_PATHS = ("/v1/adapters",)
# A JSON request holds the prompt (text or token ids, a few bytes a token, 6 for an escaped
# character), options and at most a vocabulary-sized logit_bias; this many bytes per token of
# context leave room for all of it.
BYTES_PER_CONTEXT_TOKEN = 64
MIN_BODY_BYTES = 4 << 20


def default_max_body_bytes(max_model_len: int) -> int:
    return max(MIN_BODY_BYTES, BYTES_PER_CONTEXT_TOKEN * max_model_len)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LARGE_ALLOCATION_BYTES = 128 << 10


def map_large_allocations(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Have glibc give allocations of `threshold` bytes or more their own mapping, unmapped
    when freed; False where the C library has no mallopt (not glibc).

    A request body reaches the ingress as chunks of tens to hundreds of KiB. By default glibc
    raises its mapping threshold after the first large free, so later chunks come from the
    heap, whose freed pages stay with the process: three 700 MiB chunked uploads left the
    ingresses 1.85 GB larger ten seconds after, 0.5 GB with this setting, 2 MB behind Serve's
    HAProxy mode (benchmarks/RESULTS.md, "Floods").
    The ingress only moves bytes; the engine replica keeps the default, as a fixed threshold
    made its CPU tensor ops page-fault (tiny-model steps 25-85% slower).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


# Body messages a request may have received ahead of the app: uvicorn hands over at most one
# socket read (64-256 KiB) a message, so a few MB a request.
RECEIVE_AHEAD_MESSAGES = 16


def bound_direct_ingress_receive(maxsize: int = RECEIVE_AHEAD_MESSAGES) -> bool:
    """Bound the queue through which Serve's HAProxy mode feeds a request's ASGI messages to
    this replica's app; True if applied.

    Serve (2.60) reads every message of a request from its HTTP server into an unbounded
    asyncio.Queue as fast as the client sends it, to see a disconnect while the app runs, so
    uvicorn's flow control never pauses the socket: three 700 MiB chunked uploads put +1.1 GB
    into the ingress at the peak (benchmarks/RESULTS.md, "Floods"). With the queue bounded, its
    reader waits for the app, uvicorn pauses reading past its high-water mark and TCP slows
    the client. A disconnect is still seen once the app has read the body (it reads them all,
    or answers, or its limit answers 413, which ends the request and its reader).

    Applied only where the app runs on Serve's own event loop (the ingress's default,
    RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0), where the reader awaits `queue.put`;
    across two loops Serve hands messages over with put_nowait, which a full queue would refuse.
    """
    if os.environ.get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1") != "0":
        return False
    try:
        from ray.serve._private.direct_ingress_http_util import ASGIDIReceiveProxy
    except ImportError:
        return False
    if not isinstance(getattr(ASGIDIReceiveProxy, "queue", None), property) or "_queue" not in (
            ASGIDIReceiveProxy.__init__.__code__.co_names):
        return False  # not the class this was written against: leave Serve as it is

    def bounded_queue(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=maxsize)
        return self._queue

    ASGIDIReceiveProxy.queue = property(bounded_queue)
    return True


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the cap. An HTTPException, so FastAPI's body
    reading lets it through (it turns other errors into a 400) to the app's handler for it."""

    def __init__(self, size: int, limit: int):
        super().__init__(413, f"request body of {size} bytes or more is over this server's limit "
                              f"of {limit} bytes; send a shorter prompt")
        self.api_error = PayloadTooLargeError(self.detail, code="request_too_large")


class BodyLimitMiddleware:
    """Refuse HTTP bodies over `limit()` bytes (None: no cap) on every path but uploads."""

    def __init__(self, app, limit: Callable[[], int | None]):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        limit = self.limit() if scope["type"] == "http" else None
        if limit is None or _route_path(scope).startswith(_UPLOAD_PATHS):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = BodyTooLarge(int(declared), limit).api_error.response()
            return await response(scope, receive, send)
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(received, limit)
            return message

        await self.app(scope, bounded_receive, send)


DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


class DocsSwitch:
    """404 (OpenAI's error JSON) for FastAPI's docs pages and schema unless `enabled()`: the
    schema lists every route and field, which an operator may not want public."""

    def __init__(self, app, enabled: Callable[[], bool]):
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and _route_path(scope).startswith(DOCS_PATHS)
                and not self.enabled()):
            response = NotFoundError(f"{scope['path']} is turned off here (api_docs=false)",
                                     code="not_found").response()
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


# the routes moeplex_requests counts, by their label
COUNTED_ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat",
                  "/tokenize": "tokenize", "/detokenize": "detokenize"}
CLIENT_LEFT = 499  # the status counted for a request whose client left before any answer (nginx's)


class RequestCounter:
    """Counts every request to COUNTED_ROUTES by tenant, route and the status it was answered
    with, whoever answered: the route, an auth refusal (tenant "-"), FastAPI's body validation, a
    limit, the body guard. `count(headers, route, status)`: the ingress's counter, or None before
    the ingress exists. A stream is counted when it ends, with the status it started with (its
    errors are SSE events)."""

    def __init__(self, app, count: Callable[[], Callable | None]):
        self.app = app
        self.count = count

    async def __call__(self, scope, receive, send):
        route = COUNTED_ROUTES.get(_route_path(scope)) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        status = CLIENT_LEFT

        async def noting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception:  # not CancelledError: the client left, counted as CLIENT_LEFT
            status = 500 if status == CLIENT_LEFT else status  # Starlette's outermost handler answers it
            raise
        finally:
            count = self.count()
            if count is not None:
                count(Headers(scope=scope), route, status)


def _route_path(scope) -> str:
    """The path below the app's mount point: Serve puts its route prefix in `root_path`, and
    Starlette keeps it in `path` too."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
