"""The ingress's FastAPI app: its body and docs guards and the handlers that turn every error
into OpenAI's error JSON. `deployments.ingress.Ingress` adds the routes."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_store.errors import AdapterStoreError
from engine.errors import EngineError

from deployments.errors import (APIError, AuthenticationError, NotFoundError, request_validation_error,
                                to_api_error)
from deployments.http_guards import BodyLimitMiddleware, BodyTooLarge, DocsSwitch, RequestCounter

logger = logging.getLogger("ray.serve")
api = FastAPI(title="moeplex", description="OpenAI-compatible multi-tenant LoRA serving")


def _ingress_attr(name: str, default):
    """An attribute of this replica's Ingress (`default` before it exists)."""
    try:
        return getattr(serve.get_replica_context().servable_object, name)
    except Exception:  # noqa: BLE001 - no replica context: not serving yet
        return default


api.add_middleware(BodyLimitMiddleware, limit=lambda: _ingress_attr("max_body_bytes", None))
api.add_middleware(DocsSwitch, enabled=lambda: _ingress_attr("api_docs", False))
# outermost of these: it counts what the body guard refuses too
api.add_middleware(RequestCounter, count=lambda: _ingress_attr("count_request", None))


@api.exception_handler(BodyTooLarge)
async def _body_too_large(_request: Request, exc: BodyTooLarge):
    return exc.api_error.response()


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError):
    return exc.response()


@api.exception_handler(AdapterStoreError)
@api.exception_handler(EngineError)
async def _typed_error(_request: Request, exc: Exception):
    api_error = to_api_error(exc)
    if api_error.status_code >= 500:
        logger.error("request failed: %s: %s", type(exc).__name__, exc)
    return api_error.response()


@api.exception_handler(Exception)
async def _unexpected_error(_request: Request, exc: Exception):
    # OpenAI's error JSON rather than Starlette's plain text; the server log keeps the traceback.
    return to_api_error(exc).response()


# the routes a client may be looking for when it asks for one this server lacks
_SERVED = "/v1/completions, /v1/chat/completions, /v1/models, /v1/adapters, /tokenize and /detokenize"


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    cls = {404: NotFoundError, 401: AuthenticationError}.get(exc.status_code, APIError)
    message, code = str(exc.detail), "http_error"
    if exc.status_code == 404 and exc.detail == "Not Found":  # the router's: no route has this path
        # OpenAI answers an unknown URL so; an SDK's embeddings or responses call lands here
        message, code = (f"Invalid URL ({request.method} {request.url.path}): this server serves {_SERVED}",
                         "unknown_url")
    elif exc.status_code == 405:
        message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
    error = cls(message, code=code)
    error.status_code = exc.status_code
    response = error.response()
    response.headers.update(exc.headers or {})  # a 405's Allow
    return response


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    # FastAPI checks the body before the route asks who sends it: a caller without a valid key
    # hears that first (401/403), as from OpenAI and vLLM, not what is wrong with its body
    auth = _ingress_attr("_auth", None)
    if auth is not None:
        try:
            auth.tenant_of(request.headers)
        except APIError as refused:
            return refused.response()
    return request_validation_error(list(exc.errors()), request.headers.get("content-type")).response()
