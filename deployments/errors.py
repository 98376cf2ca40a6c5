"""Errors of the HTTP edge, rendered as OpenAI's error JSON.

`APIError` carries the status, OpenAI `type` and `code`; `to_api_error` maps the typed
errors of the engine and the adapter store onto it, so one exception handler answers
every route the same way:

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "..."}}
"""
from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from deployments.request_rules import FieldError


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error fields; the message says what to fix."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, code: str | None = None, param: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s  # a 429 or 503 worth retrying: when (clients' SDKs read it)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers or None)


class BadRequestError(APIError):
    status_code = 400


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(APIError):
    status_code = 404
    error_type = "not_found_error"


class RequestTimeoutError(APIError):
    status_code = 408


class PayloadTooLargeError(APIError):
    status_code = 413


class UnprocessableError(APIError):
    status_code = 422


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"


class InternalError(APIError):
    status_code = 500
    error_type = "server_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"


# Retry-After of a request whose engine replica went away: Serve's health check finds the replica
# within seconds (LLMServer's health_check_period_s) and routes elsewhere or to its replacement
ENGINE_RETRY_AFTER_S = 2
# Retry-After of a request the adapter store failed: its calls give up within seconds (S3Store's
# timeouts), so a retry soon after finds it answering again or fails as fast
STORE_RETRY_AFTER_S = 5

# Store limit codes that mean "the upload is too big" (413); other limits are counts (429).
_SIZE_LIMIT_CODES = ("adapter_too_large", "too_large", "max_adapter_bytes", "size")


def to_api_error(exc: BaseException) -> APIError:
    """The APIError a typed engine or store exception stands for (500 for anything else)."""
    if isinstance(exc, APIError):
        return exc
    mapped = _map_store_error(exc) or _map_engine_error(exc)
    if mapped is not None:
        return mapped
    return InternalError("internal error; the request id in the server log tells the operator "
                         "where to look", code="internal_error")


def _code_of(exc: BaseException, default: str) -> str:
    code = getattr(exc, "code", None)
    return str(code) if code else default


def _map_store_error(exc: BaseException) -> APIError | None:
    try:
        from adapter_store import errors as store_errors
    except ImportError:  # the store package is optional for the HTTP layer's own tests
        return None
    message = str(exc)
    if isinstance(exc, store_errors.AdapterNotFoundError):
        # a completion's adapter, gone from the store between the ingress resolving it and a
        # model replica fetching it: the ingress's 404 for a model it cannot find, not the
        # store's wording (its keys, the operator's CLI)
        return NotFoundError("the adapter named in `model` was deleted or replaced while this request "
                             "was on its way; GET /v1/models lists the models you can use",
                             code="model_not_found", param="model")
    if isinstance(exc, store_errors.LimitExceededError):
        code = _code_of(exc, "limit_exceeded")
        if "rank" in code:  # the adapter's content, not the upload's size: this server cannot take it
            return UnprocessableError(message, code=code)
        cls = PayloadTooLargeError if any(key in code for key in _SIZE_LIMIT_CODES) else RateLimitError
        return cls(message, code=code)
    if isinstance(exc, store_errors.InvalidNameError):
        return BadRequestError(message, code=_code_of(exc, "invalid_name"), param="name")
    if isinstance(exc, store_errors.ValidationError):
        return UnprocessableError(message, code=_code_of(exc, "invalid_adapter"))
    if isinstance(exc, store_errors.StoreUnavailableError):
        # the store's own message names its bucket, paths and what the operator should check:
        # the server log keeps it (a 5xx is logged where it is answered), the tenant gets the kind
        kind = _code_of(exc, "unreachable")
        return ServiceUnavailableError(f"the adapter store is unavailable to this server ({kind}); retry in a few "
                                       "seconds; if it persists, the operator finds the cause in the server log",
                                       code="store_unavailable", retry_after_s=STORE_RETRY_AFTER_S)
    if isinstance(exc, store_errors.AdapterStoreError):
        return InternalError(message, code=_code_of(exc, "store_error"))
    return None


def _map_engine_error(exc: BaseException) -> APIError | None:
    from engine.errors import (AdapterFilesError, AdapterLoadError, EngineError, EngineUnavailableError,
                               InvalidRequestError)

    if isinstance(exc, InvalidRequestError):
        return BadRequestError(str(exc), code=exc.code or "invalid_request", param=exc.param)
    if isinstance(exc, AdapterFilesError):  # this node's copy, not the adapter: it is fetched again
        return ServiceUnavailableError("the model replica could not read the adapter's files; retry",
                                       code="adapter_files_unavailable", param="model",
                                       retry_after_s=ENGINE_RETRY_AFTER_S)
    if isinstance(exc, AdapterLoadError):
        return UnprocessableError(str(exc), code="adapter_load_failed", param="model")
    if isinstance(exc, EngineUnavailableError):  # Serve replaces the replica; another may serve it now
        return ServiceUnavailableError(f"{exc}; retry", code="engine_unavailable",
                                       retry_after_s=ENGINE_RETRY_AFTER_S)
    if isinstance(exc, EngineError):
        return InternalError(str(exc), code="engine_error")
    return None


# Pydantic puts these before a validator's own message; a client needs only the message.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def request_validation_error(errors: list[dict], content_type: str | None = None) -> BadRequestError:
    """The 400 for FastAPI's first request validation error: what is wrong and where, in the
    request's own terms (`messages[0].content`), never pydantic's prefixes or JSON offsets.
    content_type: the request's header, for a JSON body sent under another type (FastAPI then
    hands the route the raw bytes, which pydantic reports as "not an object")."""
    first = errors[0] if errors else {}
    kind, loc = first.get("type"), tuple(first.get("loc", ()))
    if kind == "json_invalid":  # FastAPI puts the offset where a field's name would go
        reason = (first.get("ctx") or {}).get("error") or "cannot be parsed"
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return BadRequestError(f"the request body is not valid JSON: {reason}{at}",
                               code="invalid_json")
    where = _field_path(loc[1:] if loc[:1] == ("body",) else loc)
    if not where and kind == "missing":
        return BadRequestError("the request body is empty; send a JSON object",
                               code="invalid_request_body")
    if not where and kind == "model_attributes_type":
        # without the header FastAPI parses the body as JSON: only a header of another type is at fault
        media = (content_type or "").split(";")[0].strip().lower()
        if content_type and media != "application/json" and not media.endswith("+json"):
            return BadRequestError(f"the request body must be sent as JSON, with the header "
                                   f"Content-Type: application/json (got {content_type!r})",
                                   code="invalid_content_type")
        return BadRequestError("the request body must be a JSON object",
                               code="invalid_request_body")
    message = str(first.get("msg") or "invalid request")
    for prefix in _PYDANTIC_PREFIXES:
        message = message.removeprefix(prefix)
    cause = (first.get("ctx") or {}).get("error")
    if not where:  # a model validator's error: a FieldError names its field, its message too
        return BadRequestError(message, code="invalid_request_body",
                               param=cause.field if isinstance(cause, FieldError) else None)
    if isinstance(cause, FieldError) and cause.field:  # a nested object's validator (messages[0]) names its field
        where = f"{where}.{cause.field}"
    return BadRequestError(f"{where}: {message}", code="invalid_request_body", param=where)


# Where a field takes one of several types, pydantic names the branch it tried in the error's
# location ("prompt", "list[int]", 1): a client's field has no such part
_UNION_BRANCHES = re.compile(r"^(str|int|float|bool|none|bytes)$|[\[\]-]")


def _field_path(loc: tuple) -> str:
    """("messages", 0, "content") -> "messages[0].content"; ("prompt", "list[int]", 1) -> "prompt[1]"."""
    path = ""
    for part in loc:
        if isinstance(part, str) and _UNION_BRANCHES.search(part):
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path
