"""Typed errors the engine raises at its callers."""


class EngineError(RuntimeError):
    """The engine cannot do what was asked (bad checkpoint, unsupported config, internal failure)."""


class InvalidRequestError(EngineError, ValueError):
    """A request carries values the engine cannot serve; the message says what to fix, and
    `param`, where one field is at fault, names it as the OpenAI API does (e.g. "top_p")."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # across the engine core's process boundary with its param
        return type(self), (str(self), self.param)


class AdapterLoadError(EngineError):
    """A LoRA adapter could not be read or does not fit the base model; fails only its request."""
