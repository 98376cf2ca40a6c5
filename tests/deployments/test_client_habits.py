"""What vLLM, sglang and Ray Serve LLM users send works here, or is refused by name.

The ingress's FastAPI app runs in-process (no Ray), driven by the real `openai` client where
it applies; its model replica is a stub that answers every request with three items and
remembers the multiplexed id each request was routed with.
"""
import json
import shutil
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient

from deployments.args import AppArgs
from deployments.auth import KeyFile, TenantAuth
from deployments.ingress import Ingress, api
from tests.adapter_store.helpers import CONFIG, WEIGHTS

BASE = "base"
HEADERS = {"X-Tenant-Id": "acme"}  # development mode: no key file
ITEMS = [
    {"text": "Hel", "num_tokens": 1, "token_ids": [11]},
    {"text": "lo", "num_tokens": 1, "token_ids": [12]},
    {"text": "!", "num_tokens": 1, "token_ids": [13], "finish_reason": "length",
     "prompt_tokens": 2, "completion_tokens": 3},
]


async def _aiter(items):
    for item in items:
        yield item


class _Stream:
    """A replica stream (Serve's DeploymentResponseGenerator): the items; cancel() recorded."""

    def __init__(self, items, cancelled: list):
        self._items, self._cancelled = iter(items), cancelled

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self):
        self._cancelled.append(self)


class _RecordingReplica:
    def __init__(self):
        self.model_ids: list[str] = []
        self.payloads: list[dict] = []
        self.cancelled: list[_Stream] = []
        self.generate = SimpleNamespace(remote=self._generate)
        self.ready_calls = 0
        self.running: list = [self._ready]  # each running replica's ready(); raising = unhealthy

        self.transport: dict = {}

    def _generate(self, payload: dict) -> "_Stream":
        self.payloads.append(payload)
        return _Stream(ITEMS, self.cancelled)

    async def _ready(self):
        self.ready_calls += 1
        return {"model": "m", "stats": {"running": 0, "calls": self.ready_calls}}

    def broadcast(self, method: str):
        assert method == "ready"

        async def results_async(return_exceptions: bool = False):
            if not self.running:  # as Serve's broadcast with no replica running
                from ray.serve._private.common import DeploymentID
                from ray.serve.exceptions import DeploymentUnavailableError
                raise DeploymentUnavailableError(DeploymentID(name="LLMServer", app_name="moeplex"))
            answers = []
            for ready in self.running:
                try:
                    answers.append(await ready())
                except Exception as exc:  # noqa: BLE001 - as Serve's broadcast hands them back
                    answers.append(exc)
            return answers
        return SimpleNamespace(results_async=results_async)

    def options(self, **options):
        if "multiplexed_model_id" in options:  # per request
            self.model_ids.append(options["multiplexed_model_id"])
        else:  # once, at the ingress's start
            self.transport.update(options)
        return self


class _BroadcastRecorder:
    """A deployment handle of the ingress: records what every ingress replica is told."""

    def __init__(self):
        self.calls: list[tuple] = []

    def broadcast(self, method: str, *args):
        self.calls.append((method, *args))

        async def results_async():
            return []
        return SimpleNamespace(results_async=results_async)


class _Metrics:
    def __init__(self):
        self.requests: list[tuple] = []

    def request(self, *labels):
        self.requests.append(labels)


@pytest.fixture
def ingress(tmp_path, tiny_checkpoint, monkeypatch):
    from ray import serve

    cls = Ingress.func_or_class  # Serve's wrapper; its base is our class, its __init__ sync
    self = cls.__new__(cls)
    # a resolve cache that remembers, so loads and unloads must invalidate it to be seen
    args = AppArgs(model=str(tiny_checkpoint("qwen3_moe")), served_model_name=BASE,
                   store=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"),
                   adapter_resolve_ttl_s=60.0)
    cls.__mro__[1].__init__(self, _RecordingReplica(), args)
    self._metrics = _Metrics()
    self.broadcasts = _BroadcastRecorder()
    context = SimpleNamespace(servable_object=self, deployment="Ingress", app_name="moeplex")
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    monkeypatch.setattr(serve, "get_deployment_handle", lambda *_args: self.broadcasts)
    return self


@pytest.fixture
def http(ingress):
    with TestClient(api, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                         default_headers=HEADERS, http_client=http)


def test_ingress_streams_from_engine_replicas_over_serves_grpc_with_plain_pickle(ingress):
    assert ingress._llm.transport == {"_by_reference": False, "request_serialization": "pickle",
                                      "response_serialization": "pickle"}


def test_engine_transport_ray_keeps_serves_object_references(tmp_path, tiny_checkpoint):
    replica = _RecordingReplica()
    args = AppArgs(model=str(tiny_checkpoint("qwen3_moe")), store=str(tmp_path / "store"),
                   cache_dir=str(tmp_path / "cache"), engine_transport="ray")
    cls = Ingress.func_or_class
    cls.__mro__[1].__init__(cls.__new__(cls), replica, args)
    assert replica.transport == {}


def _put(ingress, tenant: str, name: str, adapter_dir):
    return ingress._store.put(tenant, name, adapter_dir, ingress._base_dir,
                              limits=ingress._upload_limits)


@pytest.fixture
def style(ingress, tiny_adapter):
    info = _put(ingress, "acme", "style", tiny_adapter("qwen3_moe", "per_expert", rank=4))
    return f"acme/style@{info.version}"


def _complete(client, model: str, **fields):
    return client.completions.create(model=model, prompt="hi", max_tokens=3, **fields)


# ---- 1. model="base:adapter" and the bare adapter name -------------------------------
def test_base_colon_adapter_and_bare_adapter_route_to_the_same_adapter(client, ingress, style):
    version = style.rpartition("@")[2]
    for model in ["style", f"{BASE}:style", f"{BASE}:style@{version}", BASE]:
        assert _complete(client, model).choices[0].text == "Hello!"
    assert ingress._llm.model_ids == [style, style, style, ""]


def test_models_retrieve_gives_the_card_of_a_model_as_a_request_names_it(client, ingress, style, http):
    """OpenAI's GET /v1/models/{id} (the SDK's models.retrieve), for the base model and an
    adapter by each of its names; another tenant's adapter and an unknown one are 404s."""
    version = style.rpartition("@")[2]
    base = client.models.retrieve(BASE)
    assert base.id == BASE and base.owned_by == "moeplex" and base.created > 0
    assert base.model_extra["max_model_len"] == ingress._args.max_model_len
    ingress._started = 1  # an adapter's card must not fall back to it
    for model in ["style", f"{BASE}:style", f"style@{version}"]:
        card = client.models.retrieve(model)
        assert (card.id, card.owned_by, card.model_extra["root"], card.model_extra["parent"]) == (
            model, "acme", f"style@{version}", BASE)
        info = ingress._store.resolve("acme", f"style@{version}")
        assert card.created == int(info.manifest["created_unix"])  # its upload, not the ingress's start
    for model, headers in [("nope", HEADERS), ("style", {"X-Tenant-Id": "globex"}), ("style", {})]:
        response = http.get(f"/v1/models/{model}", headers=headers)
        assert response.status_code == 404, (model, headers, response.text)
        assert response.json()["error"]["code"] == "model_not_found" and response.json()["error"]["param"] == "model"


@pytest.mark.parametrize("key_file_limit, setting", [
    (2, "max_concurrent_requests of tenant 'acme' in the key file"), (None, "max_concurrent_requests_per_tenant")])
def test_n_over_the_tenants_share_here_is_a_400_naming_the_setting_to_raise(client, ingress, key_file_limit,
                                                                              setting):
    from deployments.limits import TenantLimiter

    ingress._limiter = TenantLimiter(2, {"acme": key_file_limit}.get, num_replicas=2)  # 1 a replica
    with pytest.raises(openai.BadRequestError) as refused:
        _complete(client, BASE, n=2)
    error = refused.value.body
    assert error["code"] == "too_many_choices" and error["param"] == "n"
    assert "shared out over 2 ingress replicas" in error["message"] and setting in error["message"]


def test_a_429_for_requests_in_flight_says_it_is_this_replicas_share_of_the_limit():
    from deployments.errors import RateLimitError
    from deployments.limits import TenantLimiter

    limiter = TenantLimiter(3, num_replicas=2)
    limiter.acquire("acme", 2)
    with pytest.raises(RateLimitError) as refused:
        limiter.acquire("acme", 1)
    assert "on this ingress replica (its share 2 of the tenant's limit over 2 replica(s))" in refused.value.message


def test_unknown_base_before_the_colon_is_404_naming_the_served_model(client, ingress, style):
    with pytest.raises(openai.NotFoundError) as caught:
        _complete(client, "llama-3:style")
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'llama-3'" in error["message"] and f"'{BASE}'" in error["message"]
    assert ingress._llm.model_ids == []


def test_bad_adapter_ref_after_the_colon_blames_model_not_name(client, ingress):
    for model in [f"{BASE}:bad name", f"{BASE}:"]:
        with pytest.raises(openai.BadRequestError) as caught:
            _complete(client, model)
        assert caught.value.body["param"] == "model", model


# ---- 2. vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter ---------------------
def _allow_lora_paths(ingress):
    ingress._args = ingress._args.model_copy(update={"allow_lora_path_uploads": True})


def _trainer_output(tiny_adapter, tmp_path):
    """A PEFT output directory as trainers leave it: the adapter, a README and a pickle."""
    out = tmp_path / "trainer-out"
    shutil.copytree(tiny_adapter("qwen3_moe", "per_expert", rank=4), out)
    (out / "README.md").write_text("# my adapter\n")
    (out / "training_args.bin").write_bytes(b"\x80\x04pickled")
    return out


def test_lora_paths_are_refused_unless_the_operator_allows_them(http, ingress, tiny_adapter):
    body = {"lora_name": "sql", "lora_path": str(tiny_adapter("qwen3_moe", "per_expert", rank=4))}
    response = http.post("/v1/load_lora_adapter", json=body, headers=HEADERS)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "lora_path_uploads_disabled"
    assert ingress._store.list_adapters("acme") == []


def test_load_lora_adapter_stores_a_version_every_replica_is_told_of(http, client, ingress,
                                                                     tiny_adapter, tmp_path):
    _allow_lora_paths(ingress)
    with pytest.raises(openai.NotFoundError):  # the resolve cache now remembers "no such adapter"
        _complete(client, "sql")
    body = {"lora_name": "sql", "lora_path": str(_trainer_output(tiny_adapter, tmp_path))}
    response = http.post("/v1/load_lora_adapter", json=body, headers=HEADERS)
    assert response.status_code == 200, response.text
    assert "sql" in response.text
    assert ingress.broadcasts.calls == [("invalidate_resolved", "sql")]
    assert "sql" in [m.id for m in client.models.list()]
    assert _complete(client, f"{BASE}:sql").choices[0].text == "Hello!"
    [info] = ingress._store.list_adapters("acme")
    assert ingress._llm.model_ids == [f"acme/sql@{info.version}"]
    assert ingress._store.list_adapters("globex") == []  # the caller's tenant only


def test_unload_lora_adapter_deletes_it_for_every_replica(http, client, ingress, style):
    assert _complete(client, "style").choices[0].text == "Hello!"  # now cached as found
    response = http.post("/v1/unload_lora_adapter", json={"lora_name": "style", "lora_int_id": 3},
                         headers=HEADERS)
    assert response.status_code == 200, response.text
    assert ingress.broadcasts.calls == [("invalidate_resolved", "style")]
    assert ingress._store.list_adapters("acme") == []
    with pytest.raises(openai.NotFoundError):
        _complete(client, "style")
    again = http.post("/v1/unload_lora_adapter", json={"lora_name": "style"}, headers=HEADERS)
    assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"


def test_delete_takes_name_at_version_in_the_path_as_get_does(http, ingress, tiny_adapter):
    first = _put(ingress, "acme", "style", tiny_adapter("qwen3_moe", "per_expert", rank=4))
    second = _put(ingress, "acme", "style", tiny_adapter("qwen3_moe", "per_expert", rank=4))
    assert http.get(f"/v1/adapters/style@{first.version}", headers=HEADERS).status_code == 200
    gone = http.delete(f"/v1/adapters/style@{first.version}", headers=HEADERS)
    assert gone.status_code == 200 and gone.json()["id"] == f"style@{first.version}", gone.text
    assert [v.version for v in ingress._store.list_versions("acme", "style")] == [second.version]
    again = http.delete(f"/v1/adapters/style@{first.version}", headers=HEADERS)
    assert again.status_code == 404 and again.json()["error"]["param"] is None
    # owner/name: the caller's own is deleted, another tenant's is not found (never deleted)
    other = http.delete("/v1/adapters/acme/style", headers={"X-Tenant-Id": "globex"})
    assert other.status_code == 404 and ingress._store.list_adapters("acme")
    assert http.delete("/v1/adapters/acme/style", headers=HEADERS).status_code == 200
    assert ingress._store.list_adapters("acme") == []
    bad = http.delete("/v1/adapters/a..b", headers=HEADERS)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_name", bad.text


@pytest.mark.parametrize("lora_path,code", [
    ("s3://bucket/adapters/sql", "invalid_request_body"),
    ("relative/dir", "invalid_request_body"),
    ("{empty}", "lora_path_not_found"),
    ("{device}", "lora_path_not_found"),
], ids=["s3", "relative", "no_adapter_files", "weights_are_a_device_file"])
def test_load_lora_adapter_refuses_paths_it_cannot_load_with_a_400(http, ingress, tiny_adapter,
                                                                   tmp_path, lora_path, code):
    _allow_lora_paths(ingress)
    (tmp_path / "empty").mkdir()
    device = tmp_path / "device"
    device.mkdir()
    shutil.copy(tiny_adapter("qwen3_moe", "per_expert", rank=4) / CONFIG, device / CONFIG)
    (device / WEIGHTS).symlink_to("/dev/zero")  # endless if read: it must not be
    path = lora_path.format(empty=tmp_path / "empty", device=device)
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": path},
                         headers=HEADERS)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "lora_path", error
    assert ingress._store.list_adapters("acme") == []


def test_load_lora_adapter_with_an_unsafe_name_blames_lora_name(http, ingress, tiny_adapter):
    _allow_lora_paths(ingress)
    body = {"lora_name": "../x", "lora_path": str(tiny_adapter("qwen3_moe", "per_expert", rank=4))}
    response = http.post("/v1/load_lora_adapter", json=body, headers=HEADERS)
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name"


# ---- 3. malformed JSON and pydantic's wording -----------------------------------------
def test_malformed_json_is_a_400_saying_so_and_where_with_no_param(http):
    response = http.post("/v1/completions", content=b'{"model": "base",, "prompt": "hi"}',
                         headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is None and error["code"] == "invalid_json"
    assert "not valid JSON" in error["message"] and "character 17" in error["message"]


@pytest.mark.parametrize("body", [b'{"model": "base",, "prompt": "hi"}', b'{"model": "base", "prompt": 5}'],
                         ids=["malformed_json", "wrong_type"])
def test_a_caller_without_credentials_hears_401_before_what_is_wrong_with_its_body(http, body):
    response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "missing_tenant"  # development mode's credential


def test_a_chat_without_credentials_hears_401_before_its_content_is_refused(http):
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    response = http.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": image}]})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "missing_tenant"  # development mode's credential


def test_validator_messages_carry_no_pydantic_prefix(client):
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, BASE, stop=["a", "b", "c", "d", "e"])
    error = caught.value.body
    assert error["param"] == "stop" and error["message"].startswith("stop: stop takes up to 4")
    assert "Value error" not in error["message"]


# ---- 4. fields that would change the output are refused by name -----------------------
@pytest.mark.parametrize("fields,param", [
    ({"best_of": 2}, "best_of"),
    ({"suffix": "the end"}, "suffix"),
    ({"extra_body": {"prompt_logprobs": 1}}, "prompt_logprobs"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
    # vLLM's extensions this server does not implement: each would change the output
    ({"extra_body": {"spaces_between_special_tokens": False}}, "spaces_between_special_tokens"),
    ({"extra_body": {"bad_words": ["fox"]}}, "bad_words"),
    ({"extra_body": {"logits_processors": ["x"]}}, "logits_processors"),
    ({"extra_body": {"length_penalty": 0.5}}, "length_penalty"),
    ({"extra_body": {"return_tokens_as_token_ids": True}}, "return_tokens_as_token_ids"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_completion_fields_are_refused_by_name(client, ingress, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, BASE, **fields)
    error = caught.value.body
    assert error["param"] == param and param in error["message"]
    assert "not supported" in error["message"] and "Value error" not in error["message"]
    assert ingress._llm.model_ids == []


def test_no_op_values_of_unsupported_fields_are_served(client, ingress):
    _complete(client, BASE, best_of=1, suffix="", echo=False,
              extra_body={"use_beam_search": False, "spaces_between_special_tokens": True,
                          "bad_words": [], "length_penalty": 1.0, "return_tokens_as_token_ids": False})
    assert ingress._llm.model_ids == [""]


def test_null_for_a_field_with_a_default_is_the_default_and_a_whole_float_an_integer(http, ingress):
    """OpenAI's spec makes these nullable and vLLM declares them Optional: clients that send unset
    options as null were refused with a 400 on every request."""
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "presence_penalty": None,
             "frequency_penalty": None, "top_k": None, "repetition_penalty": None}
    chat = http.post("/v1/chat/completions", headers=HEADERS, json={
        "model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3.0, "seed": 7.0, **nulls})
    completion = http.post("/v1/completions", headers=HEADERS, json={
        "model": BASE, "prompt": "hi", "max_tokens": 3, "echo": None, "stream": True,
        "stream_options": {"include_usage": None}, **{k: v for k, v in nulls.items() if k != "stream"}})
    assert chat.status_code == 200 and completion.status_code == 200, (chat.text, completion.text)
    sent = [p["sampling"] for p in ingress._llm.payloads]
    assert [(p["temperature"], p["top_p"], p["top_k"], p["seed"]) for p in sent] == [(1.0, 1.0, 0, 7), (1.0, 1.0, 0, None)]
    assert ingress._llm.payloads[0]["max_tokens"] == 3 and type(ingress._llm.payloads[0]["max_tokens"]) is int
    assert completion.text.endswith("data: [DONE]\n\n") and '"usage"' not in completion.text
    for body, param in (({"max_tokens": 3.5}, "max_tokens"), ({"model": None}, "model"), ({"stream": "yes"}, "stream")):
        refused = http.post("/v1/completions", headers=HEADERS, json={"model": BASE, "prompt": "hi", **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


def test_add_special_tokens_reaches_the_replica_with_vllms_default_for_each_route(client, ingress):
    messages = [{"role": "user", "content": "hi"}]
    _complete(client, BASE)
    _complete(client, BASE, extra_body={"add_special_tokens": False})
    client.chat.completions.create(model=BASE, messages=messages, max_tokens=3)
    client.chat.completions.create(model=BASE, messages=messages, max_tokens=3, extra_body={"add_special_tokens": True})
    assert [p["add_special_tokens"] for p in ingress._llm.payloads] == [True, False, False, True]


def test_truncate_prompt_tokens_reaches_the_replica_only_when_sent(client, ingress):
    _complete(client, BASE)
    _complete(client, BASE, extra_body={"truncate_prompt_tokens": 8})
    client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   extra_body={"truncate_prompt_tokens": -1})
    assert [p.get("truncate_prompt_tokens") for p in ingress._llm.payloads] == [None, 8, -1]


def test_allowed_token_ids_reach_the_engines_sampling_and_bad_ones_are_refused_by_name(client, ingress):
    _complete(client, BASE, extra_body={"allowed_token_ids": [7, 3, 7]})
    assert ingress._llm.payloads[-1]["sampling"]["allowed_token_ids"] == (7, 3, 7)  # as sent (SamplingParams dedups)
    for bad in ([], [-1], ["1"]):
        with pytest.raises(openai.BadRequestError) as caught:
            _complete(client, BASE, extra_body={"allowed_token_ids": bad})
        assert caught.value.body["param"].startswith("allowed_token_ids")  # "[0]" for a non-integer


def test_skip_special_tokens_reaches_the_engines_sampling_true_unless_sent_false(client, ingress):
    _complete(client, BASE)
    _complete(client, BASE, extra_body={"skip_special_tokens": False})
    assert [p["sampling"]["skip_special_tokens"] for p in ingress._llm.payloads] == [True, False]


def test_chat_refuses_audio_output_and_beam_search_by_name(client):
    messages = [{"role": "user", "content": "hi"}]
    for fields, param in [({"modalities": ["text", "audio"]}, "modalities"),
                          ({"extra_body": {"use_beam_search": True}}, "use_beam_search")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=BASE, messages=messages, **fields)
        assert caught.value.body["param"] == param


# ---- 5. usage: null on ordinary chunks of a stream that asked for usage ---------------
@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
], ids=["completions", "chat"])
def test_streamed_chunks_carry_usage_null_until_the_usage_chunk(http, path, body):
    body = {**body, "model": BASE, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", path, json=body, headers=HEADERS) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    *ordinary, last = chunks
    assert len(ordinary) == 3 and all("usage" in c and c["usage"] is None for c in ordinary)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5


def test_streamed_chunks_have_no_usage_key_unless_asked(http):
    body = {"model": BASE, "prompt": "hi", "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers=HEADERS) as response:
        chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    assert len(chunks) == 3 and all("usage" not in c for c in chunks)


# ---- 6. /v1/models without a tenant in development mode ----------------------------------
def test_models_without_a_tenant_in_dev_mode_lists_base_and_shared_only(http, ingress,
                                                                        tiny_adapter):
    adapter = tiny_adapter("qwen3_moe", "per_expert", rank=4)
    for tenant, name in [("acme", "private"), ("globex", "public"), ("anonymous", "theirs")]:
        _put(ingress, tenant, name, adapter)
    ingress._store.share("globex", "public")
    response = http.get("/v1/models")
    assert response.status_code == 200, response.text
    assert [m["id"] for m in response.json()["data"]] == [BASE, "public"]
    with_tenant = http.get("/v1/models", headers=HEADERS).json()["data"]
    assert [m["id"] for m in with_tenant] == [BASE, "private", "public"]


def test_models_lists_the_last_known_adapters_while_the_store_is_unreachable(http, ingress, client,
                                                                            tiny_adapter, monkeypatch):
    """Completions keep resolving adapters through a store outage (ResolveCache's stand-ins), so
    the list a client picks from keeps answering too, marked; a tenant never listed before the
    outage, and every tenant whose list named an adapter uploaded or deleted through this
    ingress, get the store's 503; other tenants keep theirs."""
    from adapter_store.errors import StoreUnavailableError
    from deployments.ingress import STALE_LIST_HEADER
    _put(ingress, "acme", "style", tiny_adapter("qwen3_moe", "per_expert", rank=4))
    fresh = http.get("/v1/models", headers=HEADERS)
    assert STALE_LIST_HEADER not in fresh.headers

    def down(*_args):
        raise StoreUnavailableError("S3 is unreachable; check the endpoint")
    monkeypatch.setattr(ingress._store, "_list_keys", down)
    stale = http.get("/v1/models", headers=HEADERS)
    assert stale.status_code == 200 and stale.headers[STALE_LIST_HEADER]
    assert stale.json()["data"] == fresh.json()["data"]
    assert [m.id for m in client.models.list().data] == [BASE, "style"]
    never_listed = http.get("/v1/models", headers={"X-Tenant-Id": "globex"})
    assert never_listed.status_code == 503 and never_listed.json()["error"]["code"] == "store_unavailable"
    ingress._listings.invalidate("other")  # an upload or delete of an adapter acme's list lacks
    assert http.get("/v1/models", headers=HEADERS).status_code == 200
    ingress._listings.invalidate("style")  # what an upload or delete of it through any ingress replica does
    assert http.get("/v1/models", headers=HEADERS).status_code == 503


def test_models_without_a_key_is_401_when_keys_are_configured(http, ingress):
    ingress._auth = TenantAuth(KeyFile(tenants={"acme": {"key_sha256": ["0" * 64]}}))
    assert http.get("/v1/models").status_code == 401


def test_a_flood_of_ready_reaches_the_engine_replica_once_a_second(ingress, http):
    """/ready needs no key; its answers within READY_ANSWER_S share one engine replica call."""
    import deployments.ingress as ingress_module
    now = [1000.0]
    ingress._clock = lambda: now[0]
    answers = [http.get("/ready") for _ in range(25)]
    assert all(a.status_code == 200 for a in answers)
    assert ingress._llm.ready_calls == 1
    assert {a.json()["engine"]["calls"] for a in answers} == {1}
    now[0] += ingress_module.READY_ANSWER_S + 0.01
    assert http.get("/ready").json()["engine"]["calls"] == 2 and ingress._llm.ready_calls == 2



def test_every_answer_of_a_model_route_is_counted_by_tenant_route_and_status(ingress, http):
    """Refusals before the route runs (auth, body validation, the body cap) count as the route's
    own answers do; other routes are not counted."""
    body = {"model": BASE, "prompt": "hi", "max_tokens": 3}
    ingress.max_body_bytes = 10_000
    answers = [http.post("/v1/completions", json=body, headers=HEADERS),
               http.post("/v1/completions", json=body),  # no tenant named in development mode
               http.post("/v1/chat/completions", json={"model": BASE}, headers=HEADERS),
               http.post("/v1/completions", json={**body, "n": 1000}, headers=HEADERS),
               http.post("/tokenize", json={"model": BASE, "prompt": "x" * 20_000}, headers=HEADERS),
               http.get("/v1/models", headers=HEADERS)]
    assert [a.status_code for a in answers] == [200, 401, 400, 400, 413, 200]
    assert ingress._metrics.requests == [("acme", "completions", 200), ("-", "completions", 401),
                                         ("acme", "chat", 400), ("acme", "completions", 400),
                                         ("acme", "tokenize", 413)]


def test_ready_passes_over_a_dead_engine_replica_and_is_503_when_none_is_ready(ingress, http):
    from engine.errors import EngineUnavailableError

    async def dead():
        raise EngineUnavailableError("the engine core process exited (code -9)")
    ingress._llm.running = [dead, ingress._llm._ready]
    assert http.get("/ready").status_code == 200
    ingress._ready_answer = None
    ingress._llm.running = [dead]
    answer = http.get("/ready")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
    ingress._llm.running = []  # none started yet: min_replicas defaults to 1
    assert http.get("/ready").status_code == 503


def test_ready_while_scaled_to_zero_is_200_and_starts_no_engine_replica(ingress, http):
    ingress._args = ingress._args.model_copy(update={"autoscaling_config": {"min_replicas": 0}})
    ingress._llm.running = []
    answer = http.get("/ready")
    assert answer.status_code == 200 and answer.json()["engine"] == "scaled_to_zero"
    assert ingress._llm.ready_calls == 0 and ingress._llm.model_ids == []


# ---- n choices -----------------------------------------------------------------------------
def test_n_choices_take_n_places_and_give_them_back_streamed_or_whole(client, ingress):
    whole = _complete(client, BASE, n=2)
    assert [(c.index, c.text) for c in whole.choices] == [(0, "Hello!"), (1, "Hello!")]
    assert whole.usage.completion_tokens == 6 and ingress._llm.model_ids == [""]
    streamed = {}
    for chunk in client.completions.create(model=BASE, prompt="hi", max_tokens=3, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {0: "Hello!", 1: "Hello!", 2: "Hello!"}
    assert ingress._limiter.active("acme") == 0


def test_n_over_the_tenants_places_at_this_replica_is_refused_by_name(client, ingress):
    from deployments.limits import TenantLimiter
    ingress._limiter, limit = TenantLimiter(4), 4
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, BASE, n=limit + 1)
    assert caught.value.body["param"] == "n" and f"ask for at most {limit}" in caught.value.body["message"]
    assert ingress._limiter.active("acme") == 0 and _complete(client, BASE, n=limit).choices[-1].index == limit - 1
    # a batch's choices count as many as its prompts times n
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BASE, prompt=["a", "b", "c"], max_tokens=3, n=2)
    assert caught.value.body["param"] == "prompt" and "3 prompts x n=2" in caught.value.body["message"]
    batch = client.completions.create(model=BASE, prompt=["a", "b"], max_tokens=3, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3] and ingress._limiter.active("acme") == 0


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_gone_before_the_first_byte_frees_its_places_and_cancels_its_streams(ingress, n):
    """Starlette never iterates a streamed body whose response start fails (the socket closed):
    the tenant's places and the replica streams are let go all the same."""
    import asyncio

    body = json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 3, "stream": True, "n": n}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "server": ("testserver", 80), "client": ("c", 1),
             "headers": [(b"content-type", b"application/json"), (b"x-tenant-id", b"acme"),
                         (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            raise OSError("the client closed the connection")

    with pytest.raises(Exception):
        asyncio.run(api(scope, receive, send))
    assert ingress._limiter.active("acme") == 0
    assert len(ingress._llm.cancelled) == n
