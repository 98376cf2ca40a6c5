"""Typed errors the engine raises at its callers."""


class EngineError(RuntimeError):
    """The engine cannot do what was asked (bad checkpoint, unsupported config, internal failure)."""


class EngineUnavailableError(EngineError):
    """The engine is gone (shut down, its step thread stopped, its core process exited): nothing
    about the request was wrong, and another replica, or this one once replaced, can serve it."""


class InvalidRequestError(EngineError, ValueError):
    """A request carries values the engine cannot serve; the message says what to fix, and
    `param`, where one field is at fault, names it as SamplingParams (vLLM's names) or the input
    ("prompt", "model") does; the HTTP layer renames it where the request spelt it otherwise.
    `code`, where set, is the error's code in the HTTP answer (OpenAI's error JSON)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class AdapterLoadError(EngineError):
    """A LoRA adapter could not be read or does not fit the base model; fails only its request."""
