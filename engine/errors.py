"""Typed errors the engine raises at its callers."""


class EngineError(RuntimeError):
    """The engine cannot do what was asked (bad checkpoint, unsupported config, internal failure)."""


class InvalidRequestError(EngineError, ValueError):
    """A request carries values the engine cannot serve; the message says what to fix."""


class AdapterLoadError(EngineError):
    """A LoRA adapter could not be read or does not fit the base model; fails only its request."""
