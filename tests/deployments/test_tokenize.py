"""POST /tokenize and /detokenize, below HTTP: the request bodies (schemas.TokenizeRequest,
DetokenizeRequest) and the engine replica's `tokenize` / `detokenize`, against the ids the
replica's own completion path gives the engine and against the tokenizer itself. The routes
through real Serve: tests/deployments/test_serve_app.py."""
import asyncio

import pytest
from pydantic import ValidationError

from deployments.errors import request_validation_error
from deployments.schemas import DetokenizeRequest, TokenizeRequest
from engine.errors import InvalidRequestError
from tests.deployments.test_replica_prompts import TURNS, _chat, _server


def _tokenize(server, fields: dict) -> dict:
    payload = TokenizeRequest.model_validate(fields).payload()
    return asyncio.run(server.tokenize({**payload, "request_id": "tok-1", "tenant": "acme"}))


def test_a_prompts_ids_are_those_a_completion_gives_the_engine_with_their_strings(tmp_path):
    server, inputs = _server(tmp_path, 256)
    answer = _tokenize(server, {"prompt": "the quick brown fox", "return_token_strs": True})
    prompt, _ = server._prepare({"prompt": "the quick brown fox", "max_tokens": 4})
    tok = server._engine.tokenizer
    assert answer["tokens"] == prompt == tok("the quick brown fox")["input_ids"]
    assert answer["count"] == len(prompt) and answer["max_model_len"] == 256
    assert answer["token_strs"] == tok.convert_ids_to_tokens(prompt) and len(answer["token_strs"]) == len(prompt)
    assert _tokenize(server, {"prompt": "the quick brown fox"})["token_strs"] is None


@pytest.mark.parametrize("fields", [
    {},
    {"add_generation_prompt": False, "continue_final_message": True},
    {"chat_template_kwargs": {"enable_thinking": False}},
], ids=["default", "continue_final_message", "enable_thinking_false"])
def test_a_conversations_ids_are_those_a_chat_gives_the_engine_template_options_and_all(tmp_path, fields):
    server, _ = _server(tmp_path, 256)
    answer = _tokenize(server, {"messages": TURNS, **fields})
    prompt, _ = server._prepare(_chat(messages=TURNS, **fields))
    assert answer["tokens"] == prompt and answer["count"] == len(prompt)
    if fields:  # the options reach the template: other ids than the default's
        assert answer["tokens"] != _tokenize(server, {"messages": TURNS})["tokens"]


def test_tools_are_rendered_into_the_conversations_ids_as_on_a_chat(tmp_path):
    server, _ = _server(tmp_path, 256)
    tool = {"type": "function", "function": {"name": "now", "description": "the time", "parameters": {"type": "object"}}}
    with_tools = _tokenize(server, {"messages": TURNS[:1], "tools": [tool]})["tokens"]
    text = server._engine.tokenizer.apply_chat_template(TURNS[:1], tools=[tool], tokenize=False,
                                                        add_generation_prompt=True)
    assert with_tools == server._engine.inputs.encode(text, add_special_tokens=False)
    assert with_tools != _tokenize(server, {"messages": TURNS[:1]})["tokens"]


def test_prompts_past_the_context_are_counted_up_to_four_contexts_and_refused_beyond(tmp_path):
    """As vLLM, /tokenize counts a prompt no completion could take (a client measures a document
    to cut it up); past TOKENIZE_CONTEXTS contexts it stops counting and says so."""
    server, inputs = _server(tmp_path, 8)
    assert _tokenize(server, {"prompt": ""})["count"] == 0
    text = "the quick brown fox jumps"
    want = server._engine.tokenizer(text)["input_ids"]
    assert 8 <= len(want) < 32 and _tokenize(server, {"prompt": text})["tokens"] == want
    error = _tokenize(server, {"prompt": "word " * 50})["error"]
    assert error["status"] == 400 and error["param"] == "prompt" and "at least 32 tokens" in error["message"]
    error = _tokenize(server, {"messages": [{"role": "user", "content": "word " * 50}]})["error"]
    assert error["status"] == 400 and error["param"] == "messages"


def test_a_conversation_the_template_refuses_is_a_400_naming_messages(tmp_path):
    server, _ = _server(tmp_path, 256)
    server._engine.tokenizer.chat_template = "{{ raise_exception('no conversations here') }}"
    error = _tokenize(server, {"messages": TURNS})["error"]
    assert error["status"] == 400 and error["param"] == "messages" and "no conversations here" in error["message"]


def test_a_checkpoint_without_a_tokenizer_refuses_text_and_chats_with_a_400_not_a_500(tmp_path):
    server, _ = _server(tmp_path, 256)
    server._engine.tokenizer = None
    for fields, param in (({"prompt": "the fox"}, "prompt"), ({"messages": TURNS}, "messages")):
        error = _tokenize(server, fields)["error"]
        assert error["status"] == 400 and error["param"] == param and "no tokenizer" in error["message"]
    with pytest.raises(InvalidRequestError, match="no tokenizer") as refused:  # a chat completion too
        server._prepare(_chat(messages=TURNS))
    assert refused.value.param == "messages"
    error = asyncio.run(server.detokenize({"tokens": [1, 2], "request_id": "det-1"}))["error"]
    assert error["status"] == 400 and "no tokenizer" in error["message"]


def test_detokenize_gives_back_the_text_of_ids_and_refuses_ids_outside_the_vocabulary(tmp_path):
    server, inputs = _server(tmp_path, 16)
    ids = inputs.encode("the quick brown fox")
    answer = asyncio.run(server.detokenize({"tokens": ids, "request_id": "det-1"}))
    assert answer == {"prompt": server._engine.tokenizer.decode(ids)} and answer["prompt"] == "the quick brown fox"
    for bad in ([ids[0], inputs.vocab_size], [-1]):
        error = asyncio.run(server.detokenize({"tokens": bad, "request_id": "det-1"}))["error"]
        assert error["status"] == 400 and error["param"] == "tokens" and str(bad[-1]) in error["message"]
    assert "prompt" in asyncio.run(server.detokenize({"tokens": [ids[0]] * 64, "request_id": "det-1"}))
    error = asyncio.run(server.detokenize({"tokens": [ids[0]] * 65, "request_id": "det-1"}))["error"]
    assert error["status"] == 400 and error["param"] == "tokens" and "65 tokens" in error["message"]
    assert asyncio.run(server.detokenize({"tokens": [], "request_id": "det-1"})) == {"prompt": ""}


@pytest.mark.parametrize("fields, param", [
    ({}, "prompt"),
    ({"prompt": "a", "messages": TURNS}, "messages"),
    ({"prompt": "a", "tools": [{"type": "function", "function": {"name": "now"}}]}, "tools"),
    ({"messages": TURNS, "tools": [{"type": "function"}]}, "tools[0]"),
    ({"prompt": "a", "add_special_tokens": 1}, "add_special_tokens"),  # strict: a bool
    ({"messages": TURNS, "chat_template": "{{ messages }}"}, "chat_template"),
    ({"messages": TURNS, "continue_final_message": True}, "continue_final_message"),
    ({"messages": TURNS, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"messages": []}, "messages"),
], ids=["neither", "both", "tools_without_messages", "malformed_tool", "special_tokens", "own_template",
        "both_turns", "reserved_keyword", "prompt_not_text", "lone_surrogate", "no_messages"])
def test_a_tokenize_body_it_cannot_honour_is_refused_naming_the_field(fields, param):
    with pytest.raises(ValidationError) as refused:
        TokenizeRequest.model_validate(fields)
    error = request_validation_error(list(refused.value.errors()))
    assert error.status_code == 400 and error.param == param, (error.param, error.message)


def test_a_prompts_body_ignores_the_chat_templates_options_as_vllms_does():
    body = TokenizeRequest.model_validate({"prompt": "a", "continue_final_message": True})
    assert body.payload() == {"prompt": "a", "return_token_strs": False}
    with pytest.raises(ValidationError) as neither:
        TokenizeRequest.model_validate({})
    error = request_validation_error(list(neither.value.errors()))
    assert error.param == "prompt" and "or messages" in error.message and "not both" not in error.message


def test_a_tokenize_body_takes_vllms_fields_and_passes_add_special_tokens_only_when_sent():
    body = TokenizeRequest.model_validate({"model": "m", "prompt": "a", "add_special_tokens": False,
                                           "return_token_strs": True, "user": "ignored"})
    assert body.payload() == {"prompt": "a", "return_token_strs": True, "add_special_tokens": False}
    assert "add_special_tokens" not in TokenizeRequest.model_validate({"prompt": "a"}).payload()
    chat = TokenizeRequest.model_validate({"messages": TURNS, "add_generation_prompt": False,
                                           "chat_template_kwargs": {"enable_thinking": True}}).payload()
    assert chat["template_options"] == {"add_generation_prompt": False, "continue_final_message": False,
                                        "enable_thinking": True} and chat["template_variables"] is True
    with pytest.raises(ValidationError):
        DetokenizeRequest.model_validate({"tokens": ["1"]})  # strict: ids are numbers
    assert DetokenizeRequest.model_validate({"tokens": [1, 2]}).tokens == [1, 2]


def _with_bos(server, inputs) -> int:
    """The harness's tokenizer made to put a BOS first when asked for special tokens, as
    Mixtral's (Llama's) does; returns the BOS id."""
    from tokenizers import processors

    tok = server._engine.tokenizer
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    inputs.vocab_size = len(tok)
    return tok.bos_token_id


def test_a_completions_text_gets_the_tokenizers_bos_and_a_chats_rendered_template_none_as_in_vllm(tmp_path):
    from deployments.schemas import ChatCompletionRequest, CompletionRequest

    server, inputs = _server(tmp_path, 256)
    bos, tok = _with_bos(server, inputs), server._engine.tokenizer
    text = "the quick brown fox"
    plain = tok(text, add_special_tokens=False)["input_ids"]

    def completion(**fields):
        body = CompletionRequest(model="m", prompt=text, max_tokens=4, **fields)
        return server._prepare({"prompt": text, "max_tokens": 4, "add_special_tokens": body.add_special_tokens})[0]
    assert completion() == [bos] + plain == tok(text)["input_ids"]  # HF's default, and vLLM's
    assert completion(add_special_tokens=False) == plain
    assert server._prepare({"prompt": plain, "max_tokens": 4})[0] == plain  # ids are taken as they are

    def chat(**fields):
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": TURNS, **fields})
        return server._prepare({**_chat(messages=TURNS), "add_special_tokens": body.add_special_tokens})[0]
    rendered = tok.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True)
    assert chat() == tok(rendered, add_special_tokens=False)["input_ids"] and bos not in chat()
    assert chat(add_special_tokens=True) == [bos] + chat()
    # /tokenize counts what those routes give the model, with vLLM's defaults for each kind
    assert _tokenize(server, {"prompt": text})["tokens"] == completion()
    assert _tokenize(server, {"prompt": text, "add_special_tokens": False})["tokens"] == plain
    assert _tokenize(server, {"messages": TURNS})["tokens"] == chat()
    assert _tokenize(server, {"messages": TURNS, "add_special_tokens": True})["tokens"] == [bos] + chat()


def test_counting_past_the_context_leaves_the_shared_tokenizers_truncation_as_completions_need_it(tmp_path):
    """A fast tokenizer keeps its last call's truncation: /tokenize's longer bound on the shared one
    could cut a completion's encode on another thread at the wrong length."""
    server, inputs = _server(tmp_path, 8)
    inputs.encode("the fox")
    before = server._engine.tokenizer.backend_tokenizer.truncation
    assert _tokenize(server, {"prompt": "the quick brown fox jumps"})["count"] >= 8
    assert server._engine.tokenizer.backend_tokenizer.truncation == before and before["max_length"] == 8


def test_encodes_cut_at_different_bounds_on_several_threads_each_keep_their_own(tmp_path):
    """A fast tokenizer keeps its last call's truncation bound: two requests cutting a prompt to
    different lengths at once (truncate_prompt_tokens) must not cut each other's."""
    from concurrent.futures import ThreadPoolExecutor

    _, inputs = _server(tmp_path, 4096)
    text = "the quick brown fox jumps over the lazy dog " * 60
    whole = inputs.encode(text)
    assert len(whole) > 200

    def cut(k: int) -> bool:
        return inputs.encode_to(text, True, k, keep="last") == whole[-k:]
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(cut, [5, 200] * 200))
