"""`AppArgs`: what an operator sets (`serve run deployments.app:build_app key=value ...`).

Every field has a default that works on a fresh machine: the embedded tiny checkpoint is
generated into `cache_dir` on first start, adapters go to a local directory under it,
and without `api_keys` the service runs in development mode (tenant from X-Tenant-Id).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapter_store.defaults import default_cache_dir, default_store_uri, store_from_env
from deployments.option_names import (UnknownOptionError, unknown_key_message, unknown_option_message,
                                      validation_error_line)
from deployments.placement import ReplicaPlacement
from engine import defaults

TINY_MODEL_NAME = "moeplex-tiny-qwen3-moe"
DUMMY_PREFIX = "dummy:"


class AppArgs(ReplicaPlacement, BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(default=None, description="HF checkpoint dir, s3:// prefix, or "
                              "dummy:<preset> (random weights at a real model's shapes, see "
                              "engine/models/presets.py); default: the embedded tiny checkpoint")
    load_format: Literal["auto", "dummy"] = Field(
        default="auto", description="dummy: random weights at the shapes of `model`'s config.json "
        "(model may then be a config.json path); implied by model=dummy:<preset>")
    hf_overrides: dict[str, Any] | None = Field(
        default=None, description="config.json values to replace (dummy weights only), e.g. "
        "'{\"num_hidden_layers\": 8}'")
    served_model_name: str | None = Field(default=None, description="the base model's `model` id")
    # Read from the environment where AppArgs is built (serve run's process), so the value
    # travels to every replica with the args, whatever the replicas' own environment.
    store: str | None = Field(default_factory=store_from_env, description="adapter store URI (dir, "
                              "file://, s3://); default: $MOEPLEX_STORE, else "
                              "{cache_dir}/adapter-store (moeplex-adapters's default with the "
                              "default cache_dir; with another, give it --store)")
    store_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint of "
                                           "an s3:// store (MinIO, R2, ...); default: AWS")
    store_region: str | None = Field(default=None, description="region of an s3:// store")
    api_keys: str | None = Field(default=None, description="tenant key file; absent = dev mode")
    cache_dir: str = Field(default_factory=default_cache_dir, description="local files: the "
                           "embedded tiny checkpoint, downloaded models, the adapter disk cache "
                           "and the default store")
    disk_cache_bytes: int = Field(default=8 << 30, gt=0, description="byte bound of each replica's "
                                  "adapter disk cache (LRU)")

    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when "
                                                   "the replica has a GPU, else cpu")
    dtype: Literal[defaults.DTYPE_NAMES] | None = Field(  # type: ignore[valid-type]
        default=None, description="weights and activations; default: the engine's for the device")
    seed: int = Field(default=defaults.SEED, description="sampling seed of the engine")
    max_loras: int | None = Field(default=None, ge=1, description="adapters resident on the GPU at "
                                  "once; default: sized from GPU memory beside the KV cache (4 on CPU)")
    lora_layout: Literal["slots", "bytes"] = Field(default="bytes", description="bytes: each resident "
                                                   "adapter at its own rank and targets (more adapters in "
                                                   "the same memory); slots: each in a max-rank image")
    lora_heap_bytes: int | None = Field(default=None, ge=1, description="with lora_layout=bytes, GPU "
                                        "bytes for resident adapters; default: sized from GPU memory "
                                        "beside the KV cache")
    lora_rank_unit: Literal[8, 16] | None = Field(default=None, description="what an adapter's expert "
                                                  "rank is rounded up to on the GPU (8: a rank-8 "
                                                  "adapter's experts take half the bytes of 16; 8 "
                                                  "needs lora_layout=bytes); default: 8 with bytes, "
                                                  "16 with slots")
    kv_heap_sharing: bool = Field(default=True, description="the adapter heap and the KV cache share "
                                  "one buffer: adapters use KV blocks no request needs (one GPU, "
                                  "lora_layout=bytes)")
    gpu_memory_utilization: float = Field(default=defaults.GPU_MEMORY_UTILIZATION, gt=0, le=1, description="share of the GPU "
                                          "the engine fills with weights, KV cache and adapters")
    lora_memory_fraction: float | None = Field(default=None, gt=0, lt=1, description="share of that "
                                               "budget for adapters when max_loras is unset; "
                                               "default: KV cache for max_num_seqs sequences first")
    max_lora_rank: int = Field(default=defaults.MAX_LORA_RANK, ge=1, description="largest adapter rank served (and "
                               "accepted on upload)")
    max_adapters_per_replica: int | None = Field(default=None, ge=1, description="adapters a "
                                                 "replica keeps fetched (Serve's multiplexing "
                                                 "LRU); default: 2 x the engine's adapter slots")
    max_num_seqs: int = Field(default=defaults.MAX_NUM_SEQS, ge=1, description="sequences the engine runs at once")
    max_model_len: int = Field(default=defaults.MAX_MODEL_LEN, ge=16, description="longest prompt plus completion, "
                               "in tokens")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="token budget of "
                                               "a step (chunked prefill); default: the engine's")
    max_cpu_loras: int | None = Field(default=None, ge=1, description="adapters in the pinned host "
                                      "tier; default 4 x max_loras")
    max_cpu_lora_bytes: int | None = Field(default=None, ge=1, description="byte bound of that tier; default: "
                                    f"{defaults.MAX_CPU_LORA_BYTES >> 30} GiB or a quarter of the engine host's "
                                    "memory (its container's limit), the smaller (each "
                                    "adapter there takes its own bytes; on one GPU host memory is page-locked as "
                                    "the tier fills, never more than this plus one largest adapter per loader "
                                    "thread)")
    engine_warmup: bool = Field(default=True, description="compile prefill kernels at start-up (GPU)")
    async_scheduling: bool = Field(default=defaults.ASYNC_SCHEDULING, description="launch each step before the previous "
                                   "one's tokens are read back (hides host work behind the GPU)")
    enable_prefix_caching: bool = Field(default=True, description="keep the KV of prompt blocks "
                                        "after their requests end; a prompt that begins the same way "
                                        "on the same adapter skips that part of its prefill")
    prefix_cache_scope: Literal["tenant", "all"] = Field(default="tenant", description="who shares "
                                                         "cached prefixes: one tenant's requests, or "
                                                         "every tenant's (then a tenant could tell "
                                                         "from its own latency what others sent)")
    prefix_affinity_routing: bool = Field(default=True, description="route a base-model request to the "
                                          "engine replica its tenant and prompt opening hash to, where "
                                          "earlier requests left that prefix cached "
                                          "(deployments/prefix_router.py)")
    prefix_affinity_max_imbalance: int = Field(default=8, ge=0, description="requests the preferred "
                                               "replica's queue may be ahead of the shortest before "
                                               "such a request goes by load instead")
    engine_process: bool = Field(default=True, description="run the engine core in a process "
                                 "of its own inside each replica (false: a thread of the replica)")
    stream_interval_ms: float = Field(default=50.0, ge=0, le=1000, description="least time between "
                                      "two stream messages of one request (its tokens made meanwhile "
                                      "go together; the first and the last are never held); 0 = "
                                      "each engine step's tokens at once")
    lora_failure_ttl_s: float = Field(default=defaults.LORA_FAILURE_TTL_S, ge=0, description="seconds a failed adapter "
                                      "load fails fast before a request retries it")

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one engine replica spans, "
                                      "attention and dense projections split by heads over them "
                                      "(1 or the replica's GPU count)")
    expert_parallel_size: int = Field(default=1, ge=1, description="GPUs one engine replica spans "
                                      "with its experts split by expert (1 or the replica's GPU "
                                      "count; with 1 and tensor_parallel_size > 1 each expert is split)")
    num_replicas: int | None = Field(default=None, ge=1, description="engine replicas; default 1 "
                                     "(or autoscaling_config)")
    autoscaling_config: dict[str, Any] | None = Field(
        default=None, description="Serve autoscaling of the engine replicas, as JSON, e.g. "
        "'{\"min_replicas\": 1, \"max_replicas\": 4}'")
    max_ongoing_requests: int = Field(default=64, ge=1, description="requests Serve sends one "
                                      "engine replica at a time")
    hot_adapter_share: float = Field(default=0.25, gt=0, le=1, description="an adapter above this "
                                     "share of an ingress's recent completions with an adapter is balanced over all "
                                     "engine replicas instead of kept on the one that has it; 1: never")
    replica_num_cpus: float = Field(default=1.0, ge=0, description="CPUs Ray reserves per engine "
                                    "replica")
    replica_num_gpus: float | None = Field(default=None, ge=0, description="GPUs per engine "
                                           "replica; default: 1 when the cluster has a GPU "
                                           "(device=auto)")
    replica_resources: dict[str, float] | None = Field(default=None, description="custom Ray "
                                                       "resources per engine replica, as JSON")
    ingress_replicas: int | None = Field(default=None, ge=1, description="default: 4 per engine "
                                         "replica on a GPU, 2 on CPU (per min_replicas when "
                                         "autoscaled); each streams its requests' tokens, a "
                                         "per-message cost")
    ingress_num_cpus: float = Field(default=0.5, ge=0, description="CPUs Ray reserves for each "
                                    "ingress replica (two of them and an engine replica fit a "
                                    "2-core machine; each engine replica brings its own ingress "
                                    "replicas, so num_replicas=2 there needs ingress_replicas=2 "
                                    "and replica_num_cpus=0.5; --check notes it)")
    ingress_on_serve_loop: bool = Field(
        default=True, description="run the ingress's code on Serve's own event loop "
        "(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0): no hand-over between two threads per "
        "stream message")
    ingress_max_ongoing_requests: int = Field(default=1024, ge=1, description="requests Serve "
                                              "sends one ingress replica at a time")
    engine_transport: Literal["grpc", "ray"] = Field(
        default="grpc", description="how the ingress reaches the engine replicas: Serve's "
        "gRPC transport between replicas, or Ray object references (a Ray "
        "object per stream message, about twice the CPU per message)")
    replica_on_serve_loop: bool = Field(
        default=True, description="run the engine replica's code on Serve's own event loop, as "
        "ingress_on_serve_loop does for the ingress")
    max_request_body_bytes: int | None = Field(
        default=None, ge=1, description="413 for a JSON request body past this, before it is "
        "parsed (uploads have max_adapter_bytes); default: 64 bytes a token of max_model_len, "
        "at least 4 MiB")
    api_docs: bool | None = Field(
        default=None, description="serve FastAPI's /docs, /redoc and /openapi.json; default: in "
        "development mode only (not with api_keys)")
    metrics_endpoint: bool = Field(
        default=True, description="GET /metrics on the API's port, without tenant auth (as "
        "vLLM's): vllm:num_requests_waiting|running and vllm:lora_requests_info (adapter names) "
        "over the engine replicas, and this node's ray_moeplex_* series; false: 404")
    server_timing: bool = Field(
        default=True, description="answer each completion with a Server-Timing header: "
        "milliseconds by phase before its first token (resolve, route, fetch, queue, adapter, "
        "prefill, ...) and in all; false: no header (it tells a tenant how busy the service is)")
    allow_lora_path_uploads: bool = Field(
        default=False, description="vLLM's /v1/load_lora_adapter may read adapters from a path "
        "on the ingress's machine (an operator decision: a tenant could name any server path)")

    max_concurrent_requests_per_tenant: int = Field(default=32, ge=1, description="a tenant's "
                                                    "requests in flight before 429 (a key file "
                                                    "entry may override it)")
    max_adapters_per_tenant: int = Field(default=64, ge=1, description="adapters a tenant may "
                                         "store")
    max_versions_per_adapter: int = Field(default=16, ge=1, description="versions kept of one "
                                          "adapter name; an upload past it deletes the oldest")
    max_adapter_bytes: int | None = Field(
        default=None, ge=1, description="upload size limit; default: an fp32 adapter of rank "
        "max_lora_rank on every module the store accepts for the served model, plus a margin")
    adapter_resolve_ttl_s: float = Field(
        default=2.0, ge=0, description="seconds the ingress reuses a resolved `model` (adapter "
        "name -> version, or not found) before asking the store again; 0 = ask every request. "
        "Uploads and deletes over HTTP show at once (every ingress replica is told); through the "
        "CLI, which no replica hears, after at most this long, or 10x this long for a pinned "
        "name@version that was deleted or unshared")

    @field_validator("lora_rank_unit", mode="before")
    @classmethod
    def _parse_int_choice(cls, value):
        # `serve run ... lora_rank_unit=8` hands us the string "8"; the choice is of ints
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("autoscaling_config", "hf_overrides", "replica_resources", mode="before")
    @classmethod
    def _parse_json(cls, value):
        # `serve run ... autoscaling_config='{"min_replicas": 1}'` hands us a string.
        if isinstance(value, str):
            import json
            return json.loads(value)
        return value

    @field_validator("store")
    @classmethod
    def _store_uri(cls, value):
        # "s3:/bucket" or "S3://bucket" would be taken for a local directory named "s3:" / "S3:"
        if value and value[:3].lower() == "s3:" and not value.startswith("s3://"):
            raise ValueError(f"{value!r} is neither s3://bucket[/prefix] nor a directory; write s3:// (lowercase)")
        return value

    @field_validator("store_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value):
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} needs its scheme: http://{value} or https://{value}")
        return value

    @field_validator("autoscaling_config")
    @classmethod
    def _serve_autoscaling(cls, value):
        # Serve ignores keys it does not know (a typo'd "max_replica" leaves max_replicas at 1, no
        # autoscaling) and checks the values only once the app deploys, in a traceback
        if value is None:
            return value
        from pydantic import ValidationError
        from ray.serve.config import AutoscalingConfig

        known = list(AutoscalingConfig.model_fields)
        unknown = [str(key) for key in value if key not in known]
        if unknown:
            raise ValueError(unknown_key_message(unknown, known))
        try:  # without `policy`, whose check imports the operator's policy module (maybe only a replica's)
            AutoscalingConfig(**{key: item for key, item in value.items() if key != "policy"})
        except ValidationError as exc:
            raise ValueError(validation_error_line(exc.errors()[0])) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _known_options_only(cls, data):
        if isinstance(data, dict):
            unknown = [str(key) for key in data if key not in cls.model_fields]
            if unknown:
                raise UnknownOptionError(unknown_option_message(unknown, cls.model_fields))
        return data

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self

    @model_validator(mode="after")
    def _parallel_sizes_agree(self):
        n = max(self.tensor_parallel_size, self.expert_parallel_size)
        if self.tensor_parallel_size not in (1, n) or self.expert_parallel_size not in (1, n):
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} and expert_parallel_size="
                             f"{self.expert_parallel_size}: each must be 1 or the replica's GPU count (the larger)")
        return self

    @model_validator(mode="after")
    def _rank_unit_fits_the_layout(self):
        # the engine would refuse it at start, after Ray and the weights: say so at --check
        if self.lora_rank_unit == 8 and self.lora_layout != "bytes":
            raise ValueError("lora_rank_unit=8 needs lora_layout=bytes (max-rank slots round ranks to 16)")
        return self

    @model_validator(mode="after")
    def _dummy_weights_fit_the_model(self):
        if self.model is not None and self.model.startswith(DUMMY_PREFIX):
            from engine.models.presets import get_preset
            get_preset(self.model[len(DUMMY_PREFIX):])  # names the valid presets
        elif self.load_format == "dummy" and self.model is not None and "://" in self.model:
            raise ValueError(f"load_format=dummy reads only a config.json; model={self.model!r} "
                             "must be a local checkpoint dir or config.json path (or dummy:<preset>)")
        if self.hf_overrides and not self.uses_dummy_weights():
            raise ValueError("hf_overrides applies to dummy weights only: set load_format=dummy "
                             "or model=dummy:<preset>")
        return self

    # ---- derived values -------------------------------------------------------------
    def cache_path(self, *parts: str) -> Path:
        return Path(self.cache_dir).expanduser().joinpath(*parts)

    def store_uri(self) -> str:
        return self.store or default_store_uri(self.cache_dir)

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return TINY_MODEL_NAME
        if self.model.startswith(DUMMY_PREFIX):
            return self.model[len(DUMMY_PREFIX):]
        parts = self.model.rstrip("/").rsplit("/", 2)
        return parts[-2] if parts[-1] == "config.json" and len(parts) > 1 else parts[-1]

    def uses_dummy_weights(self) -> bool:
        return self.load_format == "dummy" or (self.model or "").startswith(DUMMY_PREFIX)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def engine_config(self, model_dir: Path):
        from engine import EngineConfig
        budget = {} if self.max_num_batched_tokens is None else {"max_num_batched_tokens": self.max_num_batched_tokens}
        return EngineConfig(
            model=str(model_dir), device=self.resolved_device(), dtype=self.dtype,
            load_format="dummy" if self.uses_dummy_weights() else "auto",
            max_loras=self.max_loras, max_lora_rank=self.max_lora_rank, lora_layout=self.lora_layout,
            lora_heap_bytes=self.lora_heap_bytes, kv_heap_sharing=self.kv_heap_sharing,
            lora_rank_unit=self.lora_rank_unit,
            gpu_memory_utilization=self.gpu_memory_utilization, lora_memory_fraction=self.lora_memory_fraction,
            max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len, seed=self.seed,
            warmup=self.engine_warmup, async_scheduling=self.async_scheduling,
            enable_prefix_caching=self.enable_prefix_caching, prefix_cache_scope=self.prefix_cache_scope,
            lora_failure_ttl_s=self.lora_failure_ttl_s,
            max_cpu_loras=self.max_cpu_loras, max_cpu_lora_bytes=self.host_tier_bytes(),
            tensor_parallel_size=self.tensor_parallel_size, expert_parallel_size=self.expert_parallel_size, **budget)

    def host_tier_bytes(self) -> int:
        """max_cpu_lora_bytes, or its default for the host this runs on (the engine replica's)."""
        from deployments.placement import host_memory_bytes
        return self.max_cpu_lora_bytes or min(defaults.MAX_CPU_LORA_BYTES, host_memory_bytes() // 4)

    def adapter_bytes_limit(self, model_dir: Path) -> int:
        """`max_adapter_bytes`, or by default the largest adapter of max_lora_rank for the model."""
        if self.max_adapter_bytes is not None:
            return self.max_adapter_bytes
        import json

        from adapter_store.limits import default_max_adapter_bytes
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return default_max_adapter_bytes(config, self.max_lora_rank)

    def store_limits(self, model_dir: Path):
        """Upload limits against the served model in `model_dir` (see adapter_bytes_limit)."""
        from adapter_store import StoreLimits
        return StoreLimits(max_rank=self.max_lora_rank,
                           max_adapter_bytes=self.adapter_bytes_limit(model_dir),
                           max_adapters_per_tenant=self.max_adapters_per_tenant,
                           max_versions_per_adapter=self.max_versions_per_adapter)

    def open_store(self):
        from adapter_store import open_store
        return open_store(self.store_uri(), endpoint_url=self.store_endpoint_url,
                          region=self.store_region)
