"""Tool calling (OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`) on chat completions.

The tools reach the model through its chat template (`tools=` of apply_chat_template, as
transformers renders them), and its calls come back in the Hermes format that Qwen's templates
teach the model: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block a call.

- tool_choice "auto" (the default with tools): the text before the first block is the message's
  content; each block becomes a `tool_calls` entry. If any block is not such JSON or names a tool
  the request did not offer, or text follows the blocks, the whole text stays content and no call
  is made (nothing is lost).
- "required" and a named function ({"type": "function", "function": {"name": ...}}): the output is
  constrained (a JSON schema, engine.structured) to a call of an offered tool (a list of
  {"name", "arguments"} objects, at least one) or to the named tool's arguments, in one layout of
  whitespace, so it always parses unless max_tokens cuts it (then the text stays content,
  finish_reason "length").
- "none": no call is parsed; the text is the content.
A choice with calls finishes with "tool_calls" where it would have said "stop", except under a
named tool_choice, where OpenAI (and vLLM) keep "stop". With parallel_tool_calls false a choice
keeps its first call only ("required": one at most).

Streaming: content streams as it comes, except a tail that could begin a block (`<tool_c`...);
from a block on, the text is held, and the last chunk carries the calls (each whole, with its
arguments in one piece) or, if they do not parse, the held text as content.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from deployments.request_rules import FieldError
from engine.structured import MAX_TEXT

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's function names


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools: `mode` ("auto", "none", "required" or "named"), the offered tools as
    the chat template takes them, their names, the named tool's (mode "named"), and whether a
    choice may make several calls."""
    mode: str
    tools: list[dict]
    names: tuple[str, ...]
    named: str | None
    parallel: bool

    def constraint(self) -> tuple[str, str] | None:
        """The (kind, text) structured output constraint of a forced choice, else None."""
        if self.mode not in ("named", "required"):
            return None
        params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}
        if self.mode == "named":
            return "json_schema_compact", json.dumps(params[self.named])  # a parameters' size: the engine checks
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": params[name]},
                           "required": ["name", "arguments"], "additionalProperties": False}
                          for name in self.names]}
        schema = {"type": "array", "items": call, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        text = json.dumps(schema)
        if len(text) > MAX_TEXT:
            raise FieldError("tools", f"tools: tool_choice \"required\" makes a schema of their parameters, "
                             f"{len(text)} characters, over the {MAX_TEXT} a constraint may have: offer fewer or "
                             "smaller tools")
        return "json_schema_compact", text


def tool_plan(tools: list | None, tool_choice, parallel: bool | None) -> ToolPlan | None:
    """The plan of a request's tool fields (None: no tools and no choice that needs them);
    FieldError for a malformed one."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise FieldError("tool_choice", "tool_choice needs tools")
    if not tools:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise FieldError("tools", f"tools must be a list of at most {MAX_TOOLS} tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise FieldError(f"tools[{i}]", f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise FieldError(f"tools[{i}].function.name", f"tools[{i}].function.name must be 1-64 letters, digits, "
                             "'_' or '-'")
        if name in names:
            raise FieldError(f"tools[{i}].function.name", f"tools[{i}].function.name {name!r} is given twice")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise FieldError(f"tools[{i}].function.parameters",
                             f"tools[{i}].function.parameters must be a JSON schema object")
        names.append(name)
    mode, named = _choice(tool_choice, names)
    return ToolPlan(mode, tools, tuple(names), named, True if parallel is None else bool(parallel))


def _choice(tool_choice, names: list[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("auto", "none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise FieldError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
        return "named", name
    raise FieldError("tool_choice", 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                     '"function": {"name": ...}}')


def call_entry(name: str, arguments: dict) -> dict:
    """An OpenAI tool call: arguments as JSON text (ASCII: a lone surrogate the model escaped stays
    an escape, which UTF-8 bodies can carry), an id of its own."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def parse(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a choice's whole text."""
    if plan.mode == "none":
        return text, []
    start = 0 if plan.mode in ("named", "required") else text.find(OPEN)
    calls = _calls(plan, text[start:]) if start >= 0 else []
    return (text[:start] or None, calls) if calls else (text, [])


def _calls(plan: ToolPlan, text: str) -> list[dict]:
    """The calls of a forced choice's whole text, or of an auto choice's text from its first block
    on (the first only, without parallel calls); [] where they do not parse."""
    if plan.mode in ("named", "required"):
        return _forced(plan, text)
    calls = _blocks(plan, text)
    return calls if plan.parallel else calls[:1]


def _forced(plan: ToolPlan, text: str) -> list[dict]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
        return []
    if plan.mode == "named":
        return [call_entry(plan.named, value)] if isinstance(value, dict) else []
    if not isinstance(value, list):
        return []
    calls = [_call(plan, item) for item in value]
    return [] if not calls or None in calls else calls


def _blocks(plan: ToolPlan, text: str) -> list[dict]:
    """The calls of text that starts with a block, or [] if any block is not a call."""
    calls, blocks = [], text.split(OPEN)[1:]
    for i, block in enumerate(blocks):
        body, closed, rest = block.partition(CLOSE)
        if rest.strip() or (not closed and i < len(blocks) - 1):
            return []  # text between or after blocks, or a block left open before another: not the format
        try:
            call = _call(plan, json.loads(body))
        except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
            return []
        if call is None:
            return []
        calls.append(call)
    return calls


def _call(plan: ToolPlan, value) -> dict | None:
    if not isinstance(value, dict) or value.get("name") not in plan.names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    return call_entry(value["name"], arguments) if isinstance(arguments, dict) else None


class ToolStream:
    """A streamed choice's text through its plan: `feed` returns the content to send now,
    `finish` the rest of the content and the calls (see the module docstring)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self._pending = ""  # content not sent yet: a tail that may begin a block
        self._held = None  # the text from the first block on (auto), or all of it (forced)
        if plan.mode in ("named", "required"):
            self._held = ""

    def feed(self, text: str) -> str:
        if self.plan.mode == "none":
            return text
        if self._held is not None:
            self._held += text
            return ""
        self._pending += text
        start = self._pending.find(OPEN)
        if start >= 0:
            out, self._held, self._pending = self._pending[:start], self._pending[start:], ""
            return out
        keep = _prefix_tail(self._pending)
        out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, the calls); once, at the choice's end."""
        if self._held is None:
            out, self._pending = self._pending, ""
            return out, []
        held, self._held = self._held, ""
        calls = _calls(self.plan, held)
        return ("", calls) if calls else (held, [])


def _prefix_tail(text: str) -> int:
    """The length of the longest end of text that is a proper start of OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
