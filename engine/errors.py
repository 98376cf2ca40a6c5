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


class AdapterFilesError(AdapterLoadError):
    """The adapter's files could not be read (a directory gone, a file cut short or unreadable):
    the copy this engine was pointed at is at fault, not the adapter (the store checked its
    content at upload). Remembered only while the files stay as they were: whoever fetched them
    fetches them again and the next request loads the new copy. `path`: the directory read;
    `files`: adapter_store.cache.files_signature of it before the read."""

    def __init__(self, message: str, path: str | None = None, files: tuple = ()):
        super().__init__(message)
        self.path, self.files = path, files

    def __reduce__(self):  # pickled whole across the engine core's pipe
        return type(self), (str(self), self.path, self.files)
