"""Tool calling on chat completions (deployments/tool_calls.py): the request fields' checks, the
forced choices' JSON schemas, the Hermes-format parse of whole and streamed texts, and the OpenAI
bodies ResponseBuilder makes of them. Through Serve with the openai client: test_serve_app.py."""
import json

import jsonschema
import pytest
from pydantic import ValidationError

from deployments.openai_format import CHAT, COMPLETION, ResponseBuilder, StreamUsage, chunk_line
from deployments.schemas import ChatCompletionRequest, CompletionRequest
from deployments.tool_calls import ToolStream, parse, tool_plan

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, NOW]


def _call(name: str, arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def _names_and_args(calls: list[dict]) -> list[tuple[str, dict]]:
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_auto_takes_content_before_the_calls_and_every_call():
    plan = tool_plan(TOOLS, None, None)
    text = "Let me look.\n" + _call("get_weather", {"city": "Oslo"}) + "\n" + _call("now", {})
    content, calls = parse(plan, text)
    assert content == "Let me look.\n"
    assert _names_and_args(calls) == [("get_weather", {"city": "Oslo"}), ("now", {})]
    only_call = parse(plan, _call("now", {}))
    assert only_call[0] is None and _names_and_args(only_call[1]) == [("now", {})]
    assert parse(plan, "\n" + _call("now", {}))[0] == "\n"  # what a stream sends before the call


def test_auto_reads_arguments_given_as_json_text_and_a_last_block_left_open():
    plan = tool_plan(TOOLS, "auto", None)
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'
    assert _names_and_args(parse(plan, text)[1]) == [("get_weather", {"city": "Rome"})]


@pytest.mark.parametrize("text", [
    "<tool_call>not json</tool_call>",
    _call("delete_everything", {}),  # a tool the request did not offer
    _call("now", {}) + " and some words after it",
    '<tool_call>{"name": "now", "arguments": [1, 2]}</tool_call>',
    "<tool_call>" + json.dumps({"name": "now"})[:-1] + "<tool_call>" + json.dumps({"name": "now"}) + "</tool_call>",
    "<tool_call>" + "[" * 100_000,  # nested past Python's stack
])
def test_auto_leaves_text_that_is_not_a_call_as_content(text):
    assert parse(tool_plan(TOOLS, None, None), text) == (text, [])
    stream = ToolStream(tool_plan(TOOLS, None, None))
    sent = stream.feed(text)
    assert sent + stream.finish()[0] == text


def test_arguments_come_back_as_ascii_json_text():
    """A lone surrogate the model escaped stays an escape: a UTF-8 response body can carry it."""
    text = '<tool_call>{"name": "now", "arguments": {"x": "\\ud800 caf\u00e9"}}</tool_call>'
    (call,) = parse(tool_plan(TOOLS, None, None), text)[1]
    assert call["function"]["arguments"].isascii()
    assert json.loads(call["function"]["arguments"]) == {"x": "\ud800 caf\u00e9"}
    json.dumps(call).encode("utf-8")


def test_none_parses_nothing_and_parallel_false_keeps_the_first_call():
    text = _call("now", {}) + _call("get_weather", {"city": "Oslo"})
    assert parse(tool_plan(TOOLS, "none", None), text) == (text, [])
    assert _names_and_args(parse(tool_plan(TOOLS, None, False), text)[1]) == [("now", {})]


def test_forced_choices_constrain_to_schemas_their_parse_accepts():
    named = tool_plan(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None)
    kind, schema = named.constraint()
    assert kind == "json_schema_compact" and json.loads(schema) == WEATHER["function"]["parameters"]
    assert _names_and_args(parse(named, '{"city": "Oslo"}')[1]) == [("get_weather", {"city": "Oslo"})]
    required = tool_plan(TOOLS, "required", False)
    schema = json.loads(required.constraint()[1])
    good = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    jsonschema.validate(good, schema)
    for bad in ([], good * 2, [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert _names_and_args(parse(required, json.dumps(good))[1]) == [("get_weather", {"city": "Oslo"})]
    assert "maxItems" not in json.loads(tool_plan(TOOLS, "required", None).constraint()[1])
    assert tool_plan(TOOLS, "auto", None).constraint() is None
    # cut by max_tokens: the text stays content
    assert parse(required, '[{"name": "now", "argu') == ('[{"name": "now", "argu', [])
    many = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"description": "x" * 1000}}}
            for i in range(80)]
    with pytest.raises(ValueError, match="offer fewer or smaller tools"):
        tool_plan(many, "required", None).constraint()


def test_stream_holds_back_only_what_may_begin_a_call():
    plan = tool_plan(TOOLS, None, None)
    stream = ToolStream(plan)
    pieces = ["Hel", "lo <", "b <tool", "_c", "all>", '{"name": "now", ', '"arguments": {}}', "</tool_call>"]
    sent = [stream.feed(p) for p in pieces]
    assert sent == ["Hel", "lo ", "<b ", "", "", "", "", ""]
    tail, calls = stream.finish()
    assert tail == "" and _names_and_args(calls) == [("now", {})]
    broken = ToolStream(plan)
    sent = "".join(broken.feed(p) for p in ["ok <tool_call>{oops", "}</tool_call>"])
    tail, calls = broken.finish()
    assert calls == [] and sent + tail == "ok <tool_call>{oops}</tool_call>"  # nothing lost
    plain = ToolStream(plan)
    assert plain.feed("a <tool") == "a " and plain.finish() == ("<tool", [])


def _stream(builder: ResponseBuilder, pieces: list[str], finish: str = "stop") -> list[dict]:
    items = [{"text": p} for p in pieces[:-1]] + [{"text": pieces[-1], "finish_reason": finish}]
    lines = [chunk_line(builder, item, i == 0, StreamUsage()) for i, item in enumerate(items)]
    return [json.loads(line[len("data: "):]) for line in lines if line is not None]


def test_builder_streams_content_then_the_calls_and_finishes_with_tool_calls():
    builder = ResponseBuilder(CHAT, "chatcmpl-1", "m", tools=tool_plan(TOOLS, None, None))
    chunks = _stream(builder, ["Sure", ". <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}',
                               "</tool_call>"])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure. "
    assert deltas[0]["role"] == "assistant"
    calls = deltas[-1]["tool_calls"]
    assert [c["index"] for c in calls] == [0]
    assert _names_and_args(calls) == [("get_weather", {"city": "Oslo"})]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_builder_one_item_stream_starts_with_the_role_and_a_named_choice_says_stop():
    named = tool_plan(TOOLS, {"type": "function", "function": {"name": "now"}}, None)
    (chunk,) = _stream(ResponseBuilder(CHAT, "chatcmpl-1", "m", tools=named), ["{}"])
    delta = chunk["choices"][0]["delta"]
    assert delta["role"] == "assistant" and _names_and_args(delta["tool_calls"]) == [("now", {})]
    assert chunk["choices"][0]["finish_reason"] == "stop"  # OpenAI's word under a named tool_choice
    whole = ResponseBuilder(CHAT, "chatcmpl-1", "m", tools=named).whole_choice("{}", "stop")
    assert whole["finish_reason"] == "stop" and _names_and_args(whole["message"]["tool_calls"]) == [("now", {})]


def test_builder_whole_choice_carries_calls_and_keeps_length_and_plain_text():
    plan = tool_plan(TOOLS, None, None)
    builder = ResponseBuilder(CHAT, "chatcmpl-1", "m", tools=plan)
    choice = builder.whole_choice(_call("now", {}), "stop")
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert _names_and_args(choice["message"]["tool_calls"]) == [("now", {})]
    cut = builder.whole_choice("<tool_call>{", "length")
    assert cut["finish_reason"] == "length" and cut["message"] == {"role": "assistant", "content": "<tool_call>{"}
    plain = builder.whole_choice("Hello", "stop")
    assert plain["message"] == {"role": "assistant", "content": "Hello"} and plain["finish_reason"] == "stop"
    # completions never parse calls
    assert ResponseBuilder(COMPLETION, "cmpl-1", "m", tools=plan).whole_choice(_call("now", {}), "stop")["text"] \
        == _call("now", {})


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def test_requests_with_tools_carry_their_plan_and_forced_choices_their_constraint():
    assert _chat().tool_plan() is None
    auto = _chat(tools=TOOLS)
    assert auto.tool_plan().mode == "auto" and auto.sampling()["structured"] is None
    named = _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}})
    assert named.sampling()["structured"] == ("json_schema_compact", json.dumps({"type": "object"}))
    history = [{"role": "user", "content": "time?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    request = ChatCompletionRequest(model="m", messages=history, tools=TOOLS)
    rendered = [m.for_template() for m in request.messages]
    assert rendered[1] == {"role": "assistant", "content": "", "tool_calls": history[1]["tool_calls"]}
    for field in ("tool_choice", "parallel_tool_calls"):  # not silently ignored any more
        assert field in ChatCompletionRequest.model_fields
    assert rendered[2] == {"role": "tool", "content": "12:00", "tool_call_id": "call_1"}


@pytest.mark.parametrize("fields, words", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [NOW, NOW]}, "given twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]}, "parameters"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "constrains the output"),
    ({"functions": [{"name": "f"}]}, "send tools"),
    ({"tools": ["get_weather"]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice must be"),
])
def test_malformed_tool_fields_are_refused_with_the_field_named(fields, words):
    with pytest.raises(ValidationError, match=words.replace("[", r"\[").replace("]", r"\]")):
        _chat(**fields)


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [NOW, {"type": "retrieval"}]}, "tools[1]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": ["a"] * 5}, "stop"),
])
def test_a_400_over_http_names_the_field_in_param(fields, param):
    """Checks across fields run where pydantic sees the whole body and reports no field; through
    FastAPI's own validation error the OpenAI body still names the field, as a field check's does."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.testclient import TestClient

    from deployments.errors import request_validation_error
    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def refuse(_request, exc):
        return request_validation_error(list(exc.errors())).response()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        return {}

    response = TestClient(app).post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param, error
    assert error["code"] == "invalid_request_body" and "Value error" not in error["message"]


@pytest.mark.parametrize("call", [
    {"id": "call_1"},  # no function
    {"id": "call_1", "type": "function", "function": {"name": "now"}},  # no arguments
    {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": {}}},  # not JSON text
    {"id": "call_1", "type": "retrieval", "function": {"name": "now", "arguments": "{}"}},
])
def test_malformed_tool_calls_in_a_conversation_are_refused_before_the_template(call):
    with pytest.raises(ValidationError, match="tool_calls"):
        ChatCompletionRequest(model="m", messages=[{"role": "assistant", "content": None, "tool_calls": [call]}])


def test_completions_refuse_tools_and_chat_accepts_none_without_tools():
    with pytest.raises(ValidationError, match="chat completions"):
        CompletionRequest(model="m", prompt="hi", tools=TOOLS)
    assert _chat(tool_choice="none").tool_plan() is None
