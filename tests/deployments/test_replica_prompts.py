"""LLMServer._prepare: a chat request without max_tokens is tokenised once, by the replica, and
the engine receives its ids; its default max_tokens is the room the prompt leaves."""
from types import SimpleNamespace

import pytest

from deployments.replica import LLMServer, _error_item
from deployments.schemas import ChatCompletionRequest, CompletionRequest
from engine.errors import InvalidRequestError
from engine.inputs import InputProcessor
from engine.tiny_model import make_tokenizer


class CountingInputs(InputProcessor):
    def __init__(self, *args):
        super().__init__(*args)
        self.encodes = 0

    def encode(self, text: str) -> list[int]:
        self.encodes += 1
        return super().encode(text)


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


def test_a_chat_request_with_max_tokens_hands_the_engine_its_text(tmp_path):
    server, inputs = _server(tmp_path, 256)
    prompt, params = server._prepare({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert isinstance(prompt, str) and inputs.encodes == 0 and params.max_tokens == 5


def test_logprob_entries_name_each_token_by_its_text_and_a_checkpoint_without_tokenizer_by_none(tmp_path):
    server, _ = _server(tmp_path, 64)
    server._token_texts = {}
    tok = server._engine.tokenizer
    ids = tok.encode("the fox")
    entries = server._logprob_entries([(ids[0], -0.5, [(ids[0], -0.5), (ids[1], -1.25)])])
    assert entries == [[tok.decode([ids[0]]), -0.5, [[tok.decode([ids[0]]), -0.5], [tok.decode([ids[1]]), -1.25]]]]
    assert server._token_texts == {ids[0]: tok.decode([ids[0]]), ids[1]: tok.decode([ids[1]])}
    server._engine.tokenizer, server._token_texts = None, {}
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
