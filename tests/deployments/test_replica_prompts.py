"""LLMServer._prepare: a request is tokenised once, by the replica, and the engine receives its
ids; a chat's default max_tokens is the room the prompt leaves, and a max_tokens past that room
is refused."""
from types import SimpleNamespace

import pytest

from deployments.replica import LLMServer, _error_item
from deployments.schemas import ChatCompletionRequest, CompletionRequest
from deployments.token_bytes import TokenTexts
from engine.errors import InvalidRequestError
from engine.inputs import InputProcessor
from engine.tiny_model import make_tokenizer


class CountingInputs(InputProcessor):
    def __init__(self, *args):
        super().__init__(*args)
        self.encodes = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encodes += 1
        return super().encode(text, add_special_tokens)


def _server(tmp_path, max_model_len: int) -> tuple[LLMServer, CountingInputs]:
    tok = make_tokenizer(tmp_path)
    inputs = CountingInputs(tok, len(tok), max_model_len, True, (tok.eos_token_id,))
    server = object.__new__(LLMServer)  # _prepare reads only the engine's tokenizer and inputs
    server._engine = SimpleNamespace(tokenizer=tok, inputs=inputs, shutdown=lambda: None)  # __del__ calls it
    server._args = SimpleNamespace(max_model_len=max_model_len)
    return server, inputs


def test_a_chat_request_without_max_tokens_is_tokenised_once_and_reaches_the_engine_as_ids(tmp_path):
    server, inputs = _server(tmp_path, 256)
    messages = [{"role": "user", "content": "the quick brown fox"}]
    prompt, params = server._prepare({"messages": messages, "max_tokens": None})
    text = server._engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == inputs.encode(text) and inputs.encodes == 2  # the replica's one, and this check's
    assert params.max_tokens == 256 - len(prompt)
    seq = inputs.make_sequence("r", prompt, params)
    assert seq.token_ids(0, seq.num_tokens) == prompt and inputs.encodes == 2  # the engine did not encode again


def test_a_chat_prompt_longer_than_the_model_is_refused_by_the_replica_with_the_engines_error(tmp_path):
    server, _ = _server(tmp_path, 8)
    with pytest.raises(InvalidRequestError, match="max_model_len is 8"):
        server._prepare({"messages": [{"role": "user", "content": "word " * 50}], "max_tokens": None})


def test_a_refusal_names_the_field_the_request_spelt_in_param(tmp_path):
    """The engine names the prompt "prompt" and echo's prompt logprobs "prompt_logprobs"; a chat
    sent messages, and a completion asked for those logprobs with logprobs."""
    server, inputs = _server(tmp_path, 8)
    chat = {"messages": [{"role": "user", "content": "word " * 50}], "max_tokens": None}
    with pytest.raises(InvalidRequestError) as too_long:
        server._prepare(chat)
    assert _error_item("r", too_long.value, chat)["error"]["param"] == "messages"
    completion = {"prompt": "word " * 50, "max_tokens": 4}
    with pytest.raises(InvalidRequestError) as too_long:
        inputs.make_sequence("r", *server._prepare(completion))
    error = _error_item("r", too_long.value, completion)["error"]
    assert error["param"] == "prompt" and error["status"] == 400 and "max_model_len is 8" in error["message"]
    echo = InvalidRequestError("prompt_logprobs must be an integer in [0, 20]", "prompt_logprobs")
    assert _error_item("r", echo, completion)["error"]["param"] == "logprobs"
    assert _error_item("r", InvalidRequestError("no field at fault"), chat)["error"]["param"] is None


def test_a_request_with_max_tokens_reaches_the_engine_as_ids_tokenised_once(tmp_path):
    server, inputs = _server(tmp_path, 256)
    for request in ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
                    {"prompt": "the quick brown fox", "max_tokens": 5}):
        inputs.encodes = 0
        prompt, params = server._prepare(request)
        assert isinstance(prompt, list) and inputs.encodes == 1 and params.max_tokens == 5
        inputs.make_sequence("r", prompt, params)
        assert inputs.encodes == 1


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_past_the_room_the_prompt_leaves_is_refused_naming_the_field_sent(tmp_path, field):
    """As OpenAI and vLLM: prompt + max_tokens over the context is a 400, not an output cut short."""
    server, inputs = _server(tmp_path, 32)
    prompt = "word " * 10
    room = 32 - len(inputs.encode(prompt))
    assert server._prepare({"prompt": prompt, "max_tokens": room})[1].max_tokens == room
    request = {"prompt": prompt, "max_tokens": room + 1}
    if field == "max_completion_tokens":
        request["max_tokens_field"] = field
    with pytest.raises(InvalidRequestError) as refused:
        server._prepare(request)
    error = _error_item("r", refused.value, request)["error"]
    # the code the ingress gives max_tokens past the whole context: one failure, one code
    assert error["status"] == 400 and error["param"] == field and error["code"] == "max_tokens_too_large"
    assert f"{field}={room + 1} is too large" in error["message"] and f"at most {room}" in error["message"]


def test_a_completion_without_max_tokens_asks_for_16_and_is_refused_where_16_do_not_fit(tmp_path):
    """The refusal says 16 is the default the client did not send, and how many would fit."""
    server, inputs = _server(tmp_path, 32)
    assert server._prepare({"prompt": "hi", "max_tokens": None})[1].max_tokens == 16
    room = 32 - len(inputs.encode("word " * 10))
    with pytest.raises(InvalidRequestError) as refused:
        server._prepare({"prompt": "word " * 10, "max_tokens": None})
    message = str(refused.value)
    assert "less than the 16 a completion gets when max_tokens is not given" in message
    assert f"at most {room}" in message and "max_tokens=16" not in message and refused.value.param == "max_tokens"
    assert refused.value.code == "max_tokens_too_large"


def test_logprob_entries_name_each_token_by_its_text_and_a_checkpoint_without_tokenizer_by_empty_text(tmp_path):
    server, _ = _server(tmp_path, 64)
    tok = server._engine.tokenizer
    server._token_texts = TokenTexts(tok)
    ids = tok.encode("the fox")
    entries = server._logprob_entries([(ids[0], -0.5, [(ids[0], -0.5), (ids[1], -1.25)])])
    assert entries == [[tok.decode([ids[0]]), -0.5, [[tok.decode([ids[0]]), -0.5], [tok.decode([ids[1]]), -1.25]]]]
    server._token_texts = TokenTexts(None)
    assert server._logprob_entries([(7, -0.5, [(7, -0.5)])]) == [["", -0.5, [["", -0.5]]]]


@pytest.mark.parametrize("fields, param", [
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= missing_rule"}}, "structured_outputs.grammar"),
])
def test_a_constraint_the_engine_cannot_compile_is_refused_naming_the_field_that_spelt_it(tmp_path, fields, param):
    """The request as the ingress sends it (its sampling and the constraint's field), refused by
    the engine's inputs as the replica's stream refuses it: a 400 whose param is the field."""
    server, inputs = _server(tmp_path, 64)
    body = CompletionRequest(model="m", prompt="word", max_tokens=4, **fields)
    request = {"prompt": "word", "max_tokens": 4, "sampling": body.sampling(),
               "structured_field": body.structured_field()}
    with pytest.raises(InvalidRequestError) as refused:
        inputs.make_sequence("r", *server._prepare(request))
    error = _error_item("r", refused.value, request)["error"]
    assert error["status"] == 400 and error["param"] == param, error


def test_a_forced_tool_choice_names_tools_as_its_constraints_field():
    tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[tool],
                                 tool_choice="required")
    assert body.structured_field() == "tools" and body.sampling()["structured"] is not None
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]).structured_field() is None


def _chat(**fields) -> dict:
    """The replica's payload of a chat request, as the ingress makes it."""
    body = ChatCompletionRequest.model_validate({"model": "m", **fields})
    return {"messages": [m.for_template() for m in body.messages], "max_tokens": 4,
            "template_options": body.template_options()}


TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello the"}]


@pytest.mark.parametrize("fields, options", [
    ({}, {"add_generation_prompt": True}),
    ({"add_generation_prompt": False}, {"add_generation_prompt": False}),
    ({"add_generation_prompt": False, "continue_final_message": True}, {"continue_final_message": True}),
    ({"chat_template_kwargs": {"enable_thinking": False}}, {"add_generation_prompt": True, "enable_thinking": False}),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, {"add_generation_prompt": False}),  # vLLM's override
], ids=["default", "no_generation_prompt", "continue_final_message", "enable_thinking_false",
        "no_generation_prompt_by_kwargs"])
def test_the_chat_template_options_render_as_transformers_renders_them(tmp_path, fields, options):
    server, inputs = _server(tmp_path, 256)
    prompt, _ = server._prepare(_chat(messages=TURNS, **fields))
    want = server._engine.tokenizer.apply_chat_template(TURNS, tokenize=False, **options)
    assert prompt == inputs.encode(want)
    if fields:  # each option changes what the model reads
        default = server._engine.tokenizer.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True)
        assert want != default
    if "continue_final_message" in fields:
        assert want.endswith("Hello the")  # the assistant's turn left open, its text to go on from
    if "enable_thinking" in fields.get("chat_template_kwargs", {}):
        assert want.endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("fields, param", [
    ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt still true
    ({"chat_template_kwargs": {"continue_final_message": True}}, "continue_final_message"),  # so too
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"self": 1}}, "chat_template_kwargs"),  # apply_chat_template's own
    ({"chat_template_kwargs": {"add_generation_prompt": "no"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"not an identifier": 1}}, "chat_template_kwargs"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"echo": True}, "echo"),
    ({"documents": [{"title": "a", "text": "b"}]}, "documents"),
], ids=["both_turns", "both_turns_by_kwargs", "reserved_keyword", "self", "turn_option_not_bool",
        "bad_variable", "own_template", "echo", "documents"])
def test_chat_template_options_it_cannot_honour_are_refused_by_name(fields, param):
    from deployments.errors import request_validation_error
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"model": "m", "messages": TURNS, **fields})
    assert request_validation_error(list(refused.value.errors())).param == param


def test_a_conversation_the_template_refuses_is_a_400_naming_messages(tmp_path):
    server, _ = _server(tmp_path, 256)
    server._engine.tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('the first message must be a system message') }}"
        "{% endif %}{{ messages[0]['content'] }}")
    # the conversation's fault, variables of the request's or not (Qwen3 clients send enable_thinking)
    for request in (_chat(messages=TURNS), {**_chat(messages=TURNS, chat_template_kwargs={"enable_thinking": False}),
                                            "template_variables": True}):
        with pytest.raises(InvalidRequestError, match="must be a system message") as refused:
            server._prepare(request)
        error = _error_item("r", refused.value, request)["error"]
        assert error["status"] == 400 and error["param"] == "messages"


def test_a_template_variable_the_template_cannot_compute_with_is_a_400_naming_chat_template_kwargs(tmp_path):
    server, _ = _server(tmp_path, 256)
    server._engine.tokenizer.chat_template = "{{ 'Today: ' + date_string }}{{ messages[0]['content'] }}"
    request = {**_chat(messages=TURNS, chat_template_kwargs={"date_string": 5}), "template_variables": True}
    with pytest.raises(InvalidRequestError, match="TypeError") as refused:
        server._prepare(request)
    error = _error_item("r", refused.value, request)["error"]
    assert error["status"] == 400 and error["param"] == "chat_template_kwargs"


@pytest.mark.parametrize("route", ["completion", "chat"])
def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens_as_vllm_does(tmp_path, route):
    server, inputs = _server(tmp_path, 64)
    text = "the quick brown fox jumps over the lazy dog"
    request = ({"prompt": text, "max_tokens": 4} if route == "completion"
               else {**_chat(messages=[{"role": "user", "content": text}]), "add_special_tokens": False})
    whole, _ = server._prepare(request)
    cut, params = server._prepare({**request, "truncate_prompt_tokens": 5})
    assert cut == whole[-5:] and len(whole) > 5 and params.max_tokens == 4
    assert server._prepare({**request, "truncate_prompt_tokens": 50})[0] == whole  # fewer than 50 to cut
    if route == "completion":  # token ids are cut alike
        assert server._prepare({"prompt": whole, "max_tokens": 4, "truncate_prompt_tokens": 3})[0] == whole[-3:]


def test_truncate_prompt_tokens_keeps_a_tokenizers_bos_first(tmp_path):
    from tests.deployments.test_tokenize import _with_bos

    server, inputs = _server(tmp_path, 64)
    bos = _with_bos(server, inputs)
    text = "the quick brown fox jumps over the lazy dog"
    whole, _ = server._prepare({"prompt": text, "max_tokens": 4})
    assert whole[0] == bos
    assert server._prepare({"prompt": text, "max_tokens": 4, "truncate_prompt_tokens": 4})[0] == [bos] + whole[-3:]


def test_truncate_prompt_tokens_past_the_context_is_refused_naming_it(tmp_path):
    server, _ = _server(tmp_path, 16)
    request = {"prompt": "the quick brown fox", "max_tokens": 4, "truncate_prompt_tokens": 17}
    with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens=17 is more than") as refused:
        server._prepare(request)
    assert _error_item("r", refused.value, request)["error"]["param"] == "truncate_prompt_tokens"
    # -1: the context's worth, which leaves no room for an output: refused as any such prompt
    long = {"prompt": "word " * 40, "max_tokens": 4, "truncate_prompt_tokens": -1}
    with pytest.raises(InvalidRequestError, match="max_model_len is 16"):
        server._prepare(long)
    assert len(server._prepare({**long, "truncate_prompt_tokens": 12})[0]) == 12
    from deployments.errors import request_validation_error
    from pydantic import ValidationError

    for bad in (0, -2, "3"):
        with pytest.raises(ValidationError) as refused:
            CompletionRequest.model_validate({"model": "m", "prompt": "a", "truncate_prompt_tokens": bad})
        assert request_validation_error(list(refused.value.errors())).param == "truncate_prompt_tokens"
