"""Options named wrong: the error and its one-line message with the nearest valid names."""
from __future__ import annotations

import difflib


class UnknownOptionError(TypeError):
    """An option AppArgs does not have; the message names the nearest ones.

    A TypeError, like an unexpected keyword argument, so pydantic lets it through as
    this one line instead of wrapping it in a ValidationError.
    """


def unknown_option_message(unknown: list[str], known) -> str:
    """One line naming each key of `unknown` and the nearest of `known`, for typo'd options."""
    if len(unknown) == 1:
        hint = _nearest_hint(unknown[0], known)
        named = f"unknown option {unknown[0]!r}" + (f"; {hint}" if hint else "")
    else:
        named = "unknown options " + _with_hints(unknown, known)
    return f"{named} (python -m deployments --help lists them)"


def unknown_key_message(unknown: list[str], known) -> str:
    """One line naming the unknown keys of a JSON option, each with its nearest of `known`."""
    return f"unknown key{'s' if len(unknown) > 1 else ''} {_with_hints(unknown, known)}; the keys: {', '.join(known)}"


def validation_error_line(error: dict) -> str:
    """One of a pydantic ValidationError's errors as `where: message`, without pydantic's prefix."""
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _with_hints(unknown: list[str], known) -> str:
    """'key' (did you mean ...?), ... for each of `unknown`; a key with no near name bare."""
    return ", ".join(f"{key!r} ({hint})" if (hint := _nearest_hint(key, known)) else repr(key) for key in unknown)


def _nearest_hint(key: str, known) -> str:
    """'did you mean ...?' with the close matches nearly as close as the best one, or ''."""
    matches = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    if not matches:
        return ""
    ratios = [difflib.SequenceMatcher(None, key, name).ratio() for name in matches]
    # 'max_lora' is one letter from 'max_loras' and five from 'max_lora_rank': name only the first.
    nearest = [name for name, ratio in zip(matches, ratios) if ratio >= ratios[0] - 0.1]
    names = [repr(name) for name in nearest]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return f"did you mean {listed}?"
