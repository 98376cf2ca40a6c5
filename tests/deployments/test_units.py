"""Unit tests of the HTTP edge without Ray: auth, error mapping, schemas, limits, args."""
import json
import os

import pytest

from engine import EngineConfig

from deployments.args import AppArgs, UnknownOptionError
from deployments.auth import KeyFileError, TenantAuth, hash_key, load_key_file
from deployments.errors import (AuthenticationError, BadRequestError, NotFoundError,
                                PayloadTooLargeError, PermissionDeniedError, RateLimitError,
                                to_api_error)
from deployments.limits import TenantLimiter
from deployments.metrics import counter_deltas
from deployments.schemas import ChatCompletionRequest, CompletionRequest


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        "tenants:\n"
        f"  acme:\n    key_sha256: ['{hash_key('sk-acme')}']\n    max_concurrent_requests: 2\n"
        f"  globex:\n    key_sha256: ['{hash_key('sk-globex-1')}', '{hash_key('sk-globex-2')}']\n")
    return path


def test_key_file_maps_keys_to_tenants_and_stores_only_hashes(key_file):
    auth = TenantAuth.from_file(key_file)
    assert "sk-acme" not in key_file.read_text()
    assert auth.tenant_of({"authorization": "Bearer sk-acme"}) == "acme"
    assert auth.tenant_of({"authorization": "bearer sk-globex-2"}) == "globex"
    assert auth.tenant_of({"authorization": "Bearer sk-acme", "x-tenant-id": "acme"}) == "acme"
    assert auth.max_concurrent("acme") == 2 and auth.max_concurrent("globex") is None


@pytest.mark.parametrize("headers, error", [
    ({}, AuthenticationError),
    ({"authorization": "Bearer sk-wrong"}, AuthenticationError),
    ({"authorization": "Basic sk-acme"}, AuthenticationError),
    ({"x-tenant-id": "acme"}, AuthenticationError),
    ({"authorization": "Bearer sk-acme", "x-tenant-id": "globex"}, PermissionDeniedError),
    # HTTP headers arrive latin-1 decoded: a non-ASCII tenant header is a mismatch, not a crash
    ({"authorization": "Bearer sk-acme", "x-tenant-id": "acm\u00e9"}, PermissionDeniedError),
])
def test_key_mode_refuses_bad_credentials(key_file, headers, error):
    with pytest.raises(error):
        TenantAuth.from_file(key_file).tenant_of(headers)


def test_dev_mode_takes_the_tenant_header_and_checks_it():
    auth = TenantAuth.from_file(None)
    assert auth.tenant_of({"x-tenant-id": "team-1"}) == "team-1"
    with pytest.raises(AuthenticationError):
        auth.tenant_of({})
    with pytest.raises(BadRequestError, match="tenant id"):
        auth.tenant_of({"x-tenant-id": "../etc"})


@pytest.mark.parametrize("text, match", [
    ("tenants:\n  acme:\n    key_sha256: ['sk-plain-key']\n", "sha256"),
    ("tenants:\n  'a/b':\n    key_sha256: ['" + "0" * 64 + "']\n", "tenant id"),
    ("tenant: {}\n", "malformed"),
    ("tenants: [\n", "cannot read"),
])
def test_malformed_key_files_are_refused_with_the_fix(tmp_path, text, match):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(KeyFileError, match=match):
        load_key_file(path)


def test_store_and_engine_errors_map_to_openai_statuses():
    from adapter_store import errors as se
    from engine.errors import (AdapterFilesError, AdapterLoadError, EngineError, EngineUnavailableError,
                               InvalidRequestError)

    cases = [
        (se.AdapterNotFoundError("no adapter x"), NotFoundError, 404),
        (se.LimitExceededError("too big", code="adapter_too_large"), PayloadTooLargeError, 413),
        (se.LimitExceededError("rank 64 is over 32", code="rank_too_high"), None, 422),  # its content, not its size
        (se.LimitExceededError("too many", code="too_many_adapters"), RateLimitError, 429),
        (se.InvalidNameError("bad name"), BadRequestError, 400),
        (se.ValidationError("wrong shape"), None, 422),
        (se.StoreUnavailableError("down"), None, 503),
        (InvalidRequestError("top_p must be in (0, 1]"), BadRequestError, 400),
        (AdapterLoadError("bad file"), None, 422),
        (EngineError("boom"), None, 500),
        (EngineUnavailableError("the engine core process exited (code -9)"), None, 503),
        (AdapterFilesError("adapter directory /cache/entries/ab does not exist", "/cache/entries/ab"), None, 503),
        (RuntimeError("secret detail"), None, 500),
    ]
    for exc, cls, status in cases:
        api_error = to_api_error(exc)
        assert api_error.status_code == status, exc
        assert cls is None or isinstance(api_error, cls)
        body = api_error.body()["error"]
        assert set(body) == {"message", "type", "param", "code"}
    assert "secret" not in to_api_error(RuntimeError("secret detail")).message
    assert "/cache" not in to_api_error(AdapterFilesError("cannot read /cache/entries/ab", "/x")).message
    gone = to_api_error(se.AdapterNotFoundError("s3://bucket/tenants/acme/adapters/x is gone", code="not_found"))
    assert gone.code == "model_not_found" and gone.param == "model"  # as the ingress says it
    assert "bucket" not in gone.message and "moeplex-adapters" not in gone.message
    down = to_api_error(se.StoreUnavailableError("S3 endpoint unreachable while trying to read "
                                                 "s3://bucket/moeplex/tenants/acme/x", code="timeout"))
    assert down.code == "store_unavailable" and "(timeout)" in down.message and down.retry_after_s
    assert "bucket" not in down.message  # the operator's detail stays in the server log


def test_an_unreadable_adapter_files_error_keeps_its_type_and_path_across_the_core_pipe():
    import pickle

    from engine.errors import AdapterFilesError
    exc = pickle.loads(pickle.dumps(AdapterFilesError("adapter directory /d does not exist", "/d")))
    assert type(exc) is AdapterFilesError and str(exc) == "adapter directory /d does not exist"
    assert exc.path == "/d"


def test_a_request_whose_engine_went_away_is_503_with_retry_after_through_the_replica_item():
    from deployments.replica import _error_item
    from deployments.replica_stream import error_from_item
    from engine.errors import EngineUnavailableError
    item = _error_item("r", EngineUnavailableError("the engine core process exited (code -9)"))
    response = error_from_item(item["error"]).response()
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert json.loads(response.body)["error"]["code"] == "engine_unavailable"


def test_an_engine_refusal_names_its_field_in_param_also_pickled_as_from_the_core_process():
    import pickle

    from engine.errors import InvalidRequestError
    exc = pickle.loads(pickle.dumps(InvalidRequestError("top_p must be in (0, 1], got 0", "top_p")))
    assert str(exc) == "top_p must be in (0, 1], got 0" and exc.param == "top_p"
    body = to_api_error(exc).body()["error"]
    assert body == {"message": "top_p must be in (0, 1], got 0", "type": "invalid_request_error",
                    "param": "top_p", "code": "invalid_request"}
    assert to_api_error(InvalidRequestError("no field at fault")).body()["error"]["param"] is None


def test_request_schemas_validate_openai_fields():
    ok = CompletionRequest.model_validate({"model": "m", "prompt": ["hi"], "stop": "\n"})
    assert ok.prompt == "hi" and ok.stop_sequences() == ("\n",)
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]  # a batch
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    for bad in [{"model": "m"}, {"model": "m", "prompt": "x", "max_tokens": "many"},
                {"model": "m", "prompt": "x", "temperature": 3}, {"model": "m", "prompt": []},
                {"model": "m", "prompt": "x", "n": 17}, {"model": "m", "prompt": ["a", 1]},
                {"model": "m", "prompt": [[]]}, {"model": "m", "prompt": [[1], []]},
                {"model": "m", "prompt": "x", "stop": ["a"] * 5}]:
        with pytest.raises(ValueError):
            CompletionRequest.model_validate(bad)
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
         "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    assert chat.messages[0].text() == "a" and chat.token_budget() == 5
    assert chat.stream_usage().include_usage and not chat.stream_usage().continuous


def test_tenant_limiter_counts_per_tenant():
    limiter = TenantLimiter(2, {"vip": 3}.get)
    for _ in range(2):
        limiter.acquire("a")
    with pytest.raises(RateLimitError) as refused:
        limiter.acquire("a")
    assert refused.value.response().headers["retry-after"] == "1"  # worth a retry, soon
    limiter.acquire("b")
    limiter.release("a")
    limiter.acquire("a")
    for _ in range(3):
        limiter.acquire("vip")
    assert not limiter.can_acquire("vip") and limiter.active("b") == 1


def test_tenant_limiter_of_one_of_k_replicas_allows_its_share_rounded_up():
    limiter = TenantLimiter(5, {"solo": 1}.get, num_replicas=2)
    for _ in range(3):  # ceil(5 / 2)
        limiter.acquire("a")
    with pytest.raises(RateLimitError):
        limiter.acquire("a")
    limiter.acquire("solo")  # ceil(1 / 2): a tenant is never shut out by the split
    assert not limiter.can_acquire("solo")


def test_tenant_limiter_counts_a_requests_choices():
    limiter = TenantLimiter(4)
    limiter.acquire("a", 3)
    assert limiter.active("a") == 3 and limiter.can_acquire("a") and not limiter.can_acquire("a", 2)
    with pytest.raises(RateLimitError, match="this request's 2 choices count as 2"):
        limiter.acquire("a", 2)
    limiter.release("a", 3)
    assert limiter.active("a") == 0 and limiter.can_acquire("a", 4) and not limiter.can_acquire("a", 5)


def test_engine_counter_deltas_are_increments():
    last = {}
    assert counter_deltas(last, {"lora_slot_loads": 3, "running": 9}) == {"lora_slot_loads": 3}
    assert counter_deltas(last, {"lora_slot_loads": 5, "lora_slot_hits": 1}) == {
        "lora_slot_loads": 2, "lora_slot_hits": 1}
    assert counter_deltas(last, {"lora_slot_loads": 5}) == {}


def test_app_args_defaults_and_scaling(tmp_path):
    args = AppArgs(cache_dir=str(tmp_path))
    assert args.store_uri() == str(tmp_path / "adapter-store")
    assert args.replica_options(cluster_gpus=0)["num_replicas"] == 1
    scaled = AppArgs.model_validate({"autoscaling_config": json.dumps({"min_replicas": 1}),
                                     "replica_resources": {"moeplex_worker": 1}})
    opts = scaled.replica_options(cluster_gpus=0)
    assert opts["autoscaling_config"] == {"min_replicas": 1} and "num_replicas" not in opts
    assert opts["ray_actor_options"]["resources"] == {"moeplex_worker": 1}
    with pytest.raises(ValueError, match="not both"):
        AppArgs(num_replicas=2, autoscaling_config={"min_replicas": 1})
    with pytest.raises(ValueError):
        AppArgs(max_lora_rank=0)
    with pytest.raises(UnknownOptionError, match="did you mean 'model'"):
        AppArgs(modle="typo")


@pytest.mark.parametrize("memory, tier", [(24 << 30, 6 << 30), (1 << 40, 32 << 30)], ids=["24_gb_box", "1_tb_node"])
def test_the_host_tiers_default_bound_is_32_gib_or_a_quarter_of_the_hosts_memory(tmp_path, monkeypatch, memory, tier):
    """A 24 GB machine's host tier may not plan to pin 32 GiB: the default follows the host the
    engine config is made on (the engine replica's), an operator's value is kept as given."""
    monkeypatch.setattr("deployments.placement.host_memory_bytes", lambda: memory)
    assert AppArgs(cache_dir=str(tmp_path), device="cpu").engine_config(tmp_path / "m").max_cpu_lora_bytes == tier
    given = AppArgs(cache_dir=str(tmp_path), device="cpu", max_cpu_lora_bytes=48 << 30)
    assert given.engine_config(tmp_path / "m").max_cpu_lora_bytes == 48 << 30


def test_host_memory_is_this_machines_at_most():
    from deployments.placement import host_memory_bytes

    assert 0 < host_memory_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_app_args_reach_the_engine_config(tmp_path):
    args = AppArgs(cache_dir=str(tmp_path), device="cpu", engine_warmup=False, lora_failure_ttl_s=5,
                   max_num_batched_tokens=256, max_loras=3, max_cpu_loras=5, max_cpu_lora_bytes=1 << 30,
                   async_scheduling=False)
    config = args.engine_config(tmp_path / "model")
    assert (config.warmup, config.lora_failure_ttl_s, config.max_num_batched_tokens, config.max_loras,
            config.max_cpu_loras, config.max_cpu_lora_bytes, config.async_scheduling) == (False, 5.0, 256, 3, 5,
                                                                                         1 << 30, False)
    default = AppArgs(cache_dir=str(tmp_path), device="cpu").engine_config(tmp_path / "model")
    assert default.warmup and default.async_scheduling and default.max_num_batched_tokens == EngineConfig(model="m").max_num_batched_tokens
    with pytest.raises(ValueError):
        AppArgs(lora_failure_ttl_s=-1)
