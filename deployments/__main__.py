"""`python -m deployments`: the options of `serve run deployments.app:build_app key=value ...`.

    python -m deployments --help                      # every option: type, default, description
    python -m deployments --check max_loras=8 ...     # validate options before starting anything

No torch and no Ray cluster: `deployments.args` (Ray's Serve config only to check an
autoscaling_config) and, for a key file, `deployments.auth`; a check takes a second. Values
are the strings `serve run` would pass; AppArgs parses them.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from deployments.args import AppArgs, UnknownOptionError
from deployments.option_names import validation_error_line

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def options_text(width: int = 80) -> str:
    """Every AppArgs field as `name: type = default [bounds]` and its wrapped description."""
    lines = []
    for name, field in AppArgs.model_fields.items():
        lines.append(f"  {name}: {_type_name(field)} = {_default_text(field)}{_bounds_text(field)}")
        lines += textwrap.wrap(field.description or "", width, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines)


def _type_name(field: FieldInfo) -> str:
    # 'typing.Literal['auto', 'cpu']' -> "Literal['auto', 'cpu']"; classes print as <class 'int'>.
    annotation = field.annotation
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return re.sub(r"\btyping\.", "", text)


def _default_text(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else repr(value)


def _bounds_text(field: FieldInfo) -> str:
    bounds = [f"{sign} {getattr(m, key)}" for m in field.metadata
              for key, sign in _BOUNDS.items() if getattr(m, key, None) is not None]
    return f"  ({', '.join(bounds)})" if bounds else ""


def parse_options(pairs: list[str]) -> dict[str, str]:
    """`key=value` strings -> a dict, split at the first '=' as `serve run` does."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not key=value")
        options[key] = value
    return options


def check_options(pairs: list[str]) -> str | None:
    """None when `pairs` make a valid AppArgs whose key file (build_app reads it) is valid too,
    else one message per problem, one a line."""
    try:
        args = AppArgs.model_validate(parse_options(pairs))
    except (UnknownOptionError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            return "\n".join(validation_error_line(error) for error in exc.errors())
        return str(exc)
    if args.api_keys is not None:
        from deployments.auth import KeyFileError, load_key_file
        try:
            load_key_file(args.api_keys)
        except KeyFileError as exc:
            return f"api_keys: {exc}"
    return None


def notes(pairs: list[str]) -> list[str]:
    """What valid options may still get wrong on this machine: where they ask for more CPUs than
    it has (a Ray instance of this machine alone never starts every replica), or name a local
    checkpoint it does not hold (fine where only the engine nodes hold it)."""
    import os

    from deployments.args import DUMMY_PREFIX

    args = AppArgs.model_validate(parse_options(pairs))
    # engine replicas on CPU unless device=cuda: 2 ingress replicas each (4 on a GPU)
    out = [note for note in (args.cpu_shortfall(on_gpu=args.device == "cuda"),) if note]
    model = args.model or ""
    if model and not model.startswith(("s3://", DUMMY_PREFIX)) and not os.path.exists(os.path.expanduser(model)):
        out.append(f"model={model!r} does not exist on this machine (fine if only the engine nodes hold it)")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deployments", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Options of the moeplex app: pass them as key=value to\n  serve run "
        "deployments.app:build_app key=value ...\n  make serve ARGS=\"key=value ...\"",
        epilog="app options (name: type = default):\n" + options_text())
    parser.add_argument("--check", nargs="*", metavar="KEY=VALUE",
                        help="validate these options (none: the defaults) and exit: 0 when "
                        "valid, 2 otherwise")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check is None:
        parser.print_help()
        return 0
    problem = check_options(args.check)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    for note in notes(args.check):
        print(f"note: {note}", file=sys.stderr)
    print("options ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
