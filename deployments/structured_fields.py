"""A request's structured output constraint, from whichever field spells it, as the engine's
(kind, text) (engine.structured):

- OpenAI's `response_format`: {"type": "json_object"} or {"type": "json_schema", "json_schema":
  {"name": ..., "schema": {...}}}; {"type": "text"} asks for nothing;
- vLLM's `guided_json` (a schema, as an object or as JSON text), `guided_regex`, `guided_choice`
  (a list of strings) and `guided_grammar` (EBNF);
- vLLM's `structured_outputs` object: one of "json", "regex", "choice", "grammar", or
  "json_object": true.

At most one constraint a request. Whether a schema, pattern or grammar compiles is the engine's
to say (a 400 from the replica); what is checked here is the shape.
"""
import json

from deployments.request_rules import FieldError
from engine.structured import is_choice_list

# structured_outputs' keys that name a constraint, and the engine's kind for each
_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
# its options that ask for nothing when false or null (vLLM's whitespace and fallback switches)
_NO_OP_KEYS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")


def structured_constraint(fields) -> tuple[str, tuple[str, str]] | None:
    """(the field that spelt it, (kind, text)) of the one constraint the request's fields ask
    for, or None; ValueError naming the field for a malformed one or for more than one (a
    FieldError: the 400's param). The field names the 400 of a constraint the engine cannot
    compile ("structured_outputs.regex" for vLLM's object)."""
    found = []
    rf = fields.response_format
    if rf is not None:
        found += [("response_format", c) for c in [_response_format(rf)] if c is not None]
    if fields.guided_json is not None:
        found.append(("guided_json", ("json_schema", _schema_text(fields.guided_json, "guided_json"))))
    if fields.guided_regex is not None:
        found.append(("guided_regex", ("regex", _text(fields.guided_regex, "guided_regex"))))
    if fields.guided_choice is not None:
        found.append(("guided_choice", ("choice", _choices(fields.guided_choice, "guided_choice"))))
    if fields.guided_grammar is not None:
        found.append(("guided_grammar", ("grammar", _text(fields.guided_grammar, "guided_grammar"))))
    if fields.structured_outputs is not None:
        found += _structured_outputs(fields.structured_outputs)
    if len(found) > 1:
        raise FieldError(found[1][0], "at most one structured output constraint a request; got "
                         f"{', '.join(n for n, _ in found)}")
    return found[0] if found else None


def _response_format(rf: dict) -> tuple[str, str] | None:
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", ""
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise FieldError("response_format", 'response_format {"type": "json_schema"} needs json_schema.schema, '
                             "a JSON schema object")
        return "json_schema", json.dumps(spec["schema"])
    raise FieldError("response_format", f'response_format needs a type: "text", "json_object" or "json_schema", '
                     f"got {kind!r}")


def _structured_outputs(value: dict) -> list[tuple[str, tuple[str, str]]]:
    found = []
    for key, item in value.items():
        if key in _KEYS and item is not None:
            where = f"structured_outputs.{key}"
            text = (_schema_text(item, where) if key == "json" else _choices(item, where) if key == "choice"
                    else _text(item, where))
            found.append((where, (_KEYS[key], text)))
        elif key == "json_object" and item is not None:
            if item is not True and item is not False:
                raise FieldError("structured_outputs.json_object", "structured_outputs.json_object must be true or false")
            found += [("structured_outputs.json_object", ("json_object", ""))] if item else []
        elif key not in _KEYS and key != "json_object" and not (key in _NO_OP_KEYS and not item):
            raise FieldError(f"structured_outputs.{key}", f"structured_outputs.{key} is not supported by this server; "
                             f"the constraints are {', '.join([*_KEYS, 'json_object'])}")
    if len(found) > 1:
        raise FieldError("structured_outputs", "structured_outputs takes one constraint")
    return found


def _schema_text(value, where: str) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str) and value:
        return value  # JSON text: the engine says whether it parses
    raise FieldError(where, f"{where} must be a JSON schema, as an object or as JSON text")


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(where, f"{where} must be a non-empty string")
    return value


def _choices(value, where: str) -> str:
    if not is_choice_list(value):
        raise FieldError(where, f"{where} must be a non-empty list of non-empty strings")
    return json.dumps(value)
