"""Hostile request bodies and uploads get OpenAI's error JSON with a 4xx, never a 500.

The ingress's FastAPI app is driven in-process (no Ray): Serve's replica context, which
its routes ask for their `self`, hands them an Ingress whose store is local and whose
model replica fails the test if a request ever reaches it.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from deployments.args import AppArgs
from deployments.ingress import Ingress, api
from tests.adapter_store.helpers import CONFIG, WEIGHTS, copy_adapter

HEADERS = {"X-Tenant-Id": "acme"}  # development mode: no key file


class _UnreachableReplica:
    def options(self, **options):
        if "multiplexed_model_id" not in options:  # the transport, chosen once at start
            return self
        raise AssertionError("a refused request reached the model replica")


class _Metrics:
    def request(self, *_args):
        pass


class _BrokenStore:
    def list_adapters(self, _tenant):
        raise RuntimeError("the store's client library failed in an unforeseen way")


@pytest.fixture
def ingress(tmp_path, tiny_checkpoint, monkeypatch):
    from ray import serve

    cls = Ingress.func_or_class  # Serve's wrapper; its base is our class, its __init__ sync
    self = cls.__new__(cls)
    args = AppArgs(model=str(tiny_checkpoint("qwen3_moe")), served_model_name="base",
                   store=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"),
                   adapter_resolve_ttl_s=0.0)
    cls.__mro__[1].__init__(self, _UnreachableReplica(), args)
    self._metrics = _Metrics()
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=self))
    return self


@pytest.fixture
def client(ingress):
    with TestClient(api, raise_server_exceptions=False) as test_client:
        yield test_client


def _post_json(client, path: str, body: dict):
    # json.dumps escapes a lone surrogate as "\ud800", exactly as a hostile client sends it
    return client.post(path, content=json.dumps(body), headers={**HEADERS, "Content-Type": "application/json"})


def _assert_openai_error(response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("fields", [
    {"max_tokens": True},
    {"stream": "yes"},
    {"n": 1.5},  # a whole float is that integer (vLLM): a fraction is not
    {"seed": "7"},
    {"stream_options": {"include_usage": 1}},
    {"logit_bias": {"²": 5}},
    {"logit_bias": {"１２": 5}},  # full-width digits
    {"logit_bias": {"1" * 4400: 5}},
    {"prompt": "hello \ud800 world"},
    {"stop": ["\udfff"]},
], ids=["max_tokens_bool", "stream_str", "n_fraction", "seed_str", "include_usage_int", "bias_superscript",
        "bias_fullwidth", "bias_4400_digits", "prompt_surrogate", "stop_surrogate"])
def test_malformed_completion_fields_are_400_before_the_replica(client, fields):
    body = {"model": "base", "prompt": "hello", "max_tokens": 4, **fields}
    _assert_openai_error(_post_json(client, "/v1/completions", body), 400, "invalid_request_error")


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "hello \ud800"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udc00"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     "messages[1].content"),
], ids=["prompt_int", "prompt_mixed_list", "stop_int", "prompt_surrogate", "content_int", "content_surrogate",
        "user_content_missing", "assistant_without_content_or_calls"])
def test_a_malformed_field_is_named_in_param_as_the_request_spelt_it(client, path, fields, param):
    """param is the client's field, never the type pydantic tried for it ("prompt.str")."""
    body = {"model": "base", "max_tokens": 4, **({"prompt": "hello"} if "completions" == path[4:] else {}), **fields}
    error = _assert_openai_error(_post_json(client, path, body), 400, "invalid_request_error")
    assert error["param"] == param, error


@pytest.mark.parametrize("content", ["\ud83d", [{"type": "text", "text": "a\udc00"}]], ids=["string", "text_part"])
def test_chat_message_with_a_lone_surrogate_is_400(client, content):
    body = {"model": "base", "messages": [{"role": "user", "content": content}]}
    error = _assert_openai_error(_post_json(client, "/v1/chat/completions", body), 400,
                                 "invalid_request_error")
    assert "surrogate" in error["message"] and "messages[0].content" in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_8_mb_prompt_is_413_before_it_is_parsed_or_reaches_the_replica(client, ingress, path):
    assert ingress.max_body_bytes == 4 << 20  # the default at this model's max_model_len
    prompt = "word " * ((8 << 20) // 5)
    body = ({"model": "base", "prompt": prompt} if path == "/v1/completions"
            else {"model": "base", "messages": [{"role": "user", "content": prompt}]})
    error = _assert_openai_error(_post_json(client, path, body), 413, "invalid_request_error")
    assert error["code"] == "request_too_large"


def test_an_unforeseen_failure_is_openai_json_without_its_detail(client, ingress):
    ingress._store = _BrokenStore()
    error = _assert_openai_error(client.get("/v1/models", headers=HEADERS), 500, "server_error")
    assert "unforeseen" not in error["message"]


def _upload(client, adapter_dir):
    files = [("files", (name, (adapter_dir / name).read_bytes())) for name in (CONFIG, WEIGHTS)]
    return client.post("/v1/adapters", headers=HEADERS, data={"name": "ad"}, files=files)


@pytest.mark.parametrize("config_text,code", [
    ("[" * 100_000 + "]" * 100_000, "bad_config"),
    ('{"peft_type": "LORA", "r": 1' + "0" * 5000 + "}", "bad_config"),
])
def test_adapter_config_a_parser_chokes_on_is_a_json_4xx(client, ingress, tiny_adapter, tmp_path,
                                                        config_text, code):
    src = copy_adapter(tiny_adapter("qwen3_moe", "per_expert", rank=4), tmp_path / "a")
    (src / CONFIG).write_text(config_text)
    error = _assert_openai_error(_upload(client, src), 422, "invalid_request_error")
    assert error["code"] == code and ingress._store.list_adapters("acme") == []


def test_weights_with_a_non_string_metadata_are_refused_at_upload(client, ingress, tiny_adapter, tmp_path):
    import struct

    src = copy_adapter(tiny_adapter("qwen3_moe", "per_expert", rank=4), tmp_path / "a")
    raw = (src / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps({**json.loads(raw[8:8 + n]), "__metadata__": "x"}).encode()
    (src / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    error = _assert_openai_error(_upload(client, src), 422, "invalid_request_error")
    assert error["code"] == "bad_safetensors" and "__metadata__" in error["message"]
    assert ingress._store.list_adapters("acme") == []


def test_a_json_body_sent_as_text_plain_is_400_naming_the_content_type(client):
    body = json.dumps({"model": "base", "prompt": "hello", "max_tokens": 2})
    response = client.post("/v1/completions", content=body, headers={**HEADERS, "Content-Type": "text/plain"})
    error = _assert_openai_error(response, 400, "invalid_request_error")
    assert error["code"] == "invalid_content_type" and "application/json" in error["message"]
    assert "text/plain" in error["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
], ids=["completion", "chat"])
def test_stream_options_without_stream_is_400_naming_it(client, path, body):
    response = _post_json(client, path, {"model": "base", "max_tokens": 2, "stream_options": {"include_usage": True},
                                         **body})
    error = _assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == "stream_options" and "only allowed when stream is true" in error["message"]


def test_an_empty_stream_options_without_stream_is_taken_as_vllm_takes_it():
    from deployments.schemas import CompletionRequest

    body = CompletionRequest.model_validate({"model": "base", "prompt": "hi", "stream_options": {}})
    assert body.stream is False and body.stream_options is not None


def test_a_stop_of_the_wrong_type_is_400_naming_both_types_it_takes(client):
    error = _assert_openai_error(_post_json(client, "/v1/completions", {"model": "base", "prompt": "hi", "stop": 123}),
                                 400, "invalid_request_error")
    assert error["param"] == "stop" and "a string or a list of strings" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json", None], ids=["json_header", "no_header"])
def test_a_json_array_body_is_400_saying_an_object_is_needed(client, content_type):
    """Without the header FastAPI reads the body as JSON too: the fault is the array, not a type."""
    headers = {**HEADERS, **({"Content-Type": content_type} if content_type else {})}
    response = client.post("/v1/completions", content="[1, 2]", headers=headers)
    error = _assert_openai_error(response, 400, "invalid_request_error")
    assert error["code"] == "invalid_request_body" and "must be a JSON object" in error["message"]


def test_a_file_sent_twice_in_an_upload_is_400_naming_it(client, ingress, tiny_adapter):
    src = tiny_adapter("qwen3_moe", "per_expert", rank=4)
    files = [("files", (name, (src / name).read_bytes())) for name in (CONFIG, CONFIG, WEIGHTS)]
    response = client.post("/v1/adapters", headers=HEADERS, data={"name": "ad"}, files=files)
    error = _assert_openai_error(response, 400, "invalid_request_error")
    assert error["code"] == "duplicate_file" and repr([CONFIG]) in error["message"]
    assert ingress._store.list_adapters("acme") == []


def test_an_upload_takes_one_of_the_tenants_in_flight_places(client, ingress, tiny_adapter):
    src = tiny_adapter("qwen3_moe", "per_expert", rank=4)
    limiter = ingress._limiter
    limiter.acquire("acme", limiter.limit("acme"))  # the tenant's other requests fill its places
    error = _assert_openai_error(_upload(client, src), 429, "rate_limit_error")
    assert error["code"] == "too_many_concurrent_requests"
    assert ingress._store.list_adapters("acme") == []
    limiter.release("acme", limiter.limit("acme"))
    assert _upload(client, src).status_code == 201
    assert limiter.active("acme") == 0  # given back once answered


def test_openai_clients_models_delete_removes_the_callers_adapter_only(client, ingress, tiny_adapter):
    import openai

    src = tiny_adapter("qwen3_moe", "per_expert", rank=4)
    assert _upload(client, src).status_code == 201
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client,
                        default_headers=HEADERS, max_retries=0)
    with pytest.raises(openai.NotFoundError):  # another tenant's name for it finds nothing
        oai.models.delete("acme/ad", extra_headers={"X-Tenant-Id": "globex"})
    deleted = oai.models.delete("ad")
    assert (deleted.id, deleted.deleted, deleted.object) == ("ad", True, "model")
    assert ingress._store.list_adapters("acme") == []
    with pytest.raises(openai.NotFoundError) as gone:
        oai.models.delete("ad")
    assert gone.value.body["code"] == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError) as base:
        oai.models.delete("base")
    assert base.value.body["code"] == "model_not_deletable"


def test_an_adapter_named_like_the_served_model_is_refused_at_upload(client, ingress, tiny_adapter):
    src = tiny_adapter("qwen3_moe", "per_expert", rank=4)
    files = [("files", (name, (src / name).read_bytes())) for name in (CONFIG, WEIGHTS)]
    response = client.post("/v1/adapters", headers=HEADERS, data={"name": "base"}, files=files)
    error = _assert_openai_error(response, 400, "invalid_request_error")
    assert error["code"] == "reserved_name" and error["param"] == "name"
    assert ingress._store.list_adapters("acme") == []


def test_vllms_load_lora_adapter_may_not_take_the_served_models_name_either(client, ingress, tiny_adapter):
    ingress._args = ingress._args.model_copy(update={"allow_lora_path_uploads": True})
    src = str(tiny_adapter("qwen3_moe", "per_expert", rank=4))
    response = _post_json(client, "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": src})
    error = _assert_openai_error(response, 400, "invalid_request_error")
    assert error["code"] == "reserved_name" and error["param"] == "lora_name"
    assert _post_json(client, "/v1/load_lora_adapter", {"lora_name": "other", "lora_path": src}).status_code == 200
    assert [a.name for a in ingress._store.list_adapters("acme")] == ["other"]


def test_an_adapter_stored_under_the_served_models_name_is_listed_by_the_id_that_reaches_it(
        client, ingress, tiny_adapter, tiny_checkpoint):
    """The store's CLI does not know the served name: `model=base` is the base model, so the
    adapter's card is 'base:base', not a second card with the base model's id."""
    ingress._store.put("acme", "base", tiny_adapter("qwen3_moe", "per_expert", rank=4), tiny_checkpoint("qwen3_moe"))
    ids = [card["id"] for card in client.get("/v1/models", headers=HEADERS).json()["data"]]
    assert ids == ["base", "base:base"]


def test_an_adapter_made_for_another_base_model_is_not_listed_and_is_a_422_before_the_replica(
        client, ingress, tiny_adapter, tiny_checkpoint):
    """Stored by the CLI against another checkpoint (Mixtral's shapes; the server serves Qwen3-MoE):
    left out of /v1/models, and a request naming it is refused at the ingress, saying why."""
    ingress._store.put("acme", "mixbot", tiny_adapter("mixtral", "per_expert", rank=4), tiny_checkpoint("mixtral"))
    ingress._store.put("acme", "fits", tiny_adapter("qwen3_moe", "per_expert", rank=4), tiny_checkpoint("qwen3_moe"))
    ids = [card["id"] for card in client.get("/v1/models", headers=HEADERS).json()["data"]]
    assert ids == ["base", "fits"]
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions",
                                                              {"messages": [{"role": "user", "content": "hi"}]})):
        response = _post_json(client, path, {"model": "mixbot", "max_tokens": 2, **body})
        error = _assert_openai_error(response, 422, "invalid_request_error")
        assert error["code"] == "adapter_base_mismatch" and error["param"] == "model"
        assert "another base model" in error["message"] and "'base'" in error["message"]
    response = client.get("/v1/models/mixbot", headers=HEADERS)
    assert _assert_openai_error(response, 422, "invalid_request_error")["code"] == "adapter_base_mismatch"


class _RecordingReplica(_UnreachableReplica):
    """Takes note of the multiplexed id a request is routed with, then fails it (no engine here)."""

    def __init__(self):
        self.routed = []

    def options(self, **options):
        if "multiplexed_model_id" not in options:
            return self
        self.routed.append(options["multiplexed_model_id"])
        raise RuntimeError("no engine in this test")


def test_an_adapter_whose_manifest_predates_the_base_record_is_listed_and_routed(client, ingress, tiny_adapter,
                                                                                   tiny_checkpoint):
    """A store written before manifests held the base model's fingerprint: taken to fit (the
    replica's load still checks the shapes), so the request is routed to a replica."""
    info = ingress._store.put("acme", "old", tiny_adapter("qwen3_moe", "per_expert", rank=4),
                              tiny_checkpoint("qwen3_moe"))
    manifests = list(Path(ingress._args.store).rglob("manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    del manifest["base_model"]
    manifests[0].write_text(json.dumps(manifest))
    ids = [card["id"] for card in client.get("/v1/models", headers=HEADERS).json()["data"]]
    assert ids == ["base", "old"]
    ingress._llm = _RecordingReplica()
    _post_json(client, "/v1/completions", {"model": "old", "prompt": "hi", "max_tokens": 2})
    assert ingress._llm.routed == [info.ref]


def test_every_listed_model_id_is_unique_and_routes_to_the_adapter_its_card_describes(client, ingress, tiny_adapter,
                                                                                       tiny_checkpoint):
    """The caller's own 'foo' and two other tenants' shared 'foo's: the own one is 'foo', the shared
    ones 'owner/foo' (a plain 'foo' reaches the caller's own); a shared name no one else uses
    stays plain. Each id, sent as `model`, is routed to that card's adapter."""
    adapter, checkpoint = tiny_adapter("qwen3_moe", "per_expert", rank=4), tiny_checkpoint("qwen3_moe")
    for owner, name in (("acme", "foo"), ("beta", "foo"), ("gamma", "foo"), ("beta", "solo")):
        ingress._store.put(owner, name, adapter, checkpoint)
        if owner != "acme":
            ingress._store.share(owner, name)
    cards = client.get("/v1/models", headers=HEADERS).json()["data"][1:]
    assert sorted(card["id"] for card in cards) == ["beta/foo", "foo", "gamma/foo", "solo"]
    ingress._llm = _RecordingReplica()
    for card in cards:
        _post_json(client, "/v1/completions", {"model": card["id"], "prompt": "hi", "max_tokens": 2})
    assert ingress._llm.routed == [f"{card['owned_by']}/{card['root']}" for card in cards]


@pytest.mark.parametrize("stored, headers, listed", [
    # (owner, name, shared, made for another base model)
    ([("beta", "foo", True, False), ("gamma", "foo", True, True)], HEADERS, ["beta/foo"]),
    ([("acme", "foo", False, True), ("beta", "foo", True, False)], HEADERS, ["beta/foo"]),
    ([("anonymous", "foo", False, False), ("beta", "foo", True, False)], {}, ["beta/foo"]),
], ids=["a_sharer_not_listed_still_counts", "an_own_adapter_not_listed_still_takes_the_name", "no_tenant"])
def test_a_listed_id_is_named_as_the_store_resolves_it_even_beside_adapters_not_listed(
        client, ingress, tiny_adapter, tiny_checkpoint, stored, headers, listed):
    """An adapter left out of the list (another base model; in development mode without a tenant,
    one not shared) still takes part in how the store resolves a name: the ids are made over
    everything, and each listed one retrieves its own card."""
    for owner, name, shared, other_base in stored:
        family = "mixtral" if other_base else "qwen3_moe"
        ingress._store.put(owner, name, tiny_adapter(family, "per_expert", rank=4), tiny_checkpoint(family))
        if shared:
            ingress._store.share(owner, name)
    cards = client.get("/v1/models", headers=headers).json()["data"][1:]
    assert [card["id"] for card in cards] == listed
    for card in cards:
        got = client.get(f"/v1/models/{card['id']}", headers=headers)
        assert got.status_code == 200 and got.json()["root"] == card["root"], got.text


def test_the_base_model_card_carries_the_created_time_it_is_given(ingress):
    """build_app gives every ingress replica one time: the card is the same whichever answers."""
    cls = Ingress.func_or_class
    other = cls.__new__(cls)
    cls.__mro__[1].__init__(other, _UnreachableReplica(), ingress._args, 1_700_000_000)
    assert other._base_card().created == 1_700_000_000
    assert ingress._base_card().created != 1_700_000_000  # without one: its own start time


def test_a_valid_upload_still_succeeds(client, ingress, tiny_adapter):
    response = _upload(client, tiny_adapter("qwen3_moe", "per_expert", rank=4))
    assert response.status_code == 201, response.text
    assert [a.name for a in ingress._store.list_adapters("acme")] == ["ad"]


@pytest.mark.parametrize("keys", [False, True], ids=["development_mode", "api_keys"])
def test_api_docs_are_public_in_development_mode_only(tmp_path, tiny_checkpoint, monkeypatch, keys):
    from ray import serve

    from deployments.auth import hash_key

    key_file = None
    if keys:
        key_file = tmp_path / "keys.json"
        key_file.write_text(json.dumps({"tenants": {"acme": {"key_sha256": [hash_key("k")]}}}))
    cls = Ingress.func_or_class
    self = cls.__new__(cls)
    args = AppArgs(model=str(tiny_checkpoint("qwen3_moe")), store=str(tmp_path / "store"),
                   cache_dir=str(tmp_path / "cache"), api_keys=str(key_file) if key_file else None)
    cls.__mro__[1].__init__(self, _UnreachableReplica(), args)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=self))
    with TestClient(api, raise_server_exceptions=False) as client:
        assert client.get("/openapi.json").status_code == (404 if keys else 200)
        assert client.get("/docs").status_code == (404 if keys else 200)


def test_a_route_this_server_lacks_is_a_404_naming_it_and_the_routes_it_serves(client):
    """An SDK's embeddings call gets OpenAI's unknown-URL error, not Starlette's bare "Not Found";
    a known path with another method is a 405 saying so."""
    missing = _post_json(client, "/v1/embeddings", {"model": "base", "input": "hi"})
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "unknown_url" and error["type"] == "not_found_error"
    assert "POST /v1/embeddings" in error["message"] and "/v1/chat/completions" in error["message"]
    wrong_method = client.get("/v1/completions", headers=HEADERS)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["message"] == "GET is not allowed on /v1/completions"
    assert wrong_method.headers["allow"] == "POST"
