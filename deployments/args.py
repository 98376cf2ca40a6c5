"""`AppArgs`: what an operator sets (`serve run deployments.app:build_app key=value ...`).

Every field has a default that works on a fresh machine: the embedded tiny checkpoint is
generated into `cache_dir` on first start, adapters go to a local directory under it,
and without `api_keys` the service runs in development mode (tenant from X-Tenant-Id).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TINY_MODEL_NAME = "moeplex-tiny-qwen3-moe"
DUMMY_PREFIX = "dummy:"


def _default_cache_dir() -> str:
    return str(Path.home() / ".cache" / "moeplex")


class AppArgs(BaseModel):
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
    store: str | None = Field(default=None, description="adapter store URI (dir, file://, s3://)")
    store_endpoint_url: str | None = None
    store_region: str | None = None
    api_keys: str | None = Field(default=None, description="tenant key file; absent = dev mode")
    cache_dir: str = Field(default_factory=_default_cache_dir)
    disk_cache_bytes: int = Field(default=8 << 30, gt=0)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: str | None = None
    seed: int = 0
    max_loras: int | None = Field(default=None, ge=1, description="adapter slots on the GPU; default: "
                                  "sized from GPU memory beside the KV cache (4 on CPU)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of the GPU "
                                          "the engine fills with weights, KV cache and adapter slots")
    lora_memory_fraction: float | None = Field(default=None, gt=0, lt=1, description="share of that "
                                               "budget for adapter slots when max_loras is unset; "
                                               "default: KV cache for max_num_seqs sequences first")
    max_lora_rank: int = Field(default=16, ge=1)
    max_adapters_per_replica: int | None = Field(default=None, ge=1)
    max_num_seqs: int = Field(default=64, ge=1)
    max_model_len: int = Field(default=2048, ge=16)
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="token budget of "
                                               "a step (chunked prefill); default: the engine's")
    max_cpu_loras: int | None = Field(default=None, ge=1, description="adapters in the pinned host "
                                      "tier; default 4 x max_loras")
    max_cpu_lora_bytes: int = Field(default=32 << 30, ge=1, description="byte bound of that tier (each "
                                    "adapter there is a whole slot image)")
    engine_warmup: bool = Field(default=True, description="compile prefill kernels at start-up (GPU)")
    async_scheduling: bool = Field(default=True, description="launch each step before the previous "
                                   "one's tokens are read back (hides host work behind the GPU)")
    engine_process: bool = Field(default=True, description="run the engine core in a process "
                                 "of its own inside each replica (false: a thread of the replica)")
    stream_interval_ms: float = Field(default=50.0, ge=0, le=1000, description="least time between "
                                      "two stream messages of one request (its tokens made meanwhile "
                                      "go together; the first and the last are never held); 0 = "
                                      "each engine step's tokens at once")
    lora_failure_ttl_s: float = Field(default=30.0, ge=0, description="seconds a failed adapter "
                                      "load fails fast before a request retries it")

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = Field(default=64, ge=1)
    replica_num_cpus: float = Field(default=1.0, ge=0)
    replica_num_gpus: float | None = Field(default=None, ge=0)
    replica_resources: dict[str, float] | None = None
    ingress_replicas: int | None = Field(default=None, ge=1, description="default: 2 per engine "
                                         "replica (the most an autoscaled app may run); each "
                                         "streams its requests' tokens, a per-message cost")
    ingress_throughput_optimized: bool = Field(
        default=True, description="run the ingress's code on Serve's own event loop "
        "(RAY_SERVE_THROUGHPUT_OPTIMIZED): no hand-over between two threads per stream message")
    ingress_max_ongoing_requests: int = Field(default=1024, ge=1)

    max_concurrent_requests_per_tenant: int = Field(default=32, ge=1)
    max_adapters_per_tenant: int = Field(default=64, ge=1)
    max_adapter_bytes: int | None = Field(
        default=None, ge=1, description="upload size limit; default: an fp32 adapter of rank "
        "max_lora_rank on every module the store accepts for the served model, plus a margin")
    adapter_resolve_ttl_s: float = Field(
        default=2.0, ge=0, description="seconds the ingress reuses a resolved `model` (adapter "
        "name -> version, or not found) before asking the store again; 0 = ask every request. "
        "Uploads and deletes through the same ingress replica show at once; through another "
        "replica (or the CLI) after at most this long, or 10x this long for a pinned "
        "name@version that was deleted or unshared")

    @field_validator("autoscaling_config", "hf_overrides", mode="before")
    @classmethod
    def _parse_json(cls, value):
        # `serve run ... autoscaling_config='{"min_replicas": 1}'` hands us a string.
        if isinstance(value, str):
            import json
            return json.loads(value)
        return value

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
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
        return self.store or str(self.cache_path("adapter-store"))

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

    def gpus_per_replica(self, cluster_gpus: float) -> float:
        """GPUs a replica asks Ray for; device=auto asks for one when the cluster has any."""
        if self.replica_num_gpus is not None:
            return self.replica_num_gpus
        if self.device == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return 1.0 if self.device == "cuda" else 0.0

    def adapters_per_replica(self) -> int | None:
        """None when the slot count is sized by the engine: the replica then uses its own."""
        if self.max_adapters_per_replica is not None:
            return self.max_adapters_per_replica
        return None if self.max_loras is None else 2 * self.max_loras

    def ingress_options(self) -> dict:
        """Keyword arguments for `Ingress.options(...)`."""
        replicas = self.ingress_replicas
        if replicas is None:
            engines = (self.autoscaling_config or {}).get("max_replicas") or self.num_replicas or 1
            replicas = 2 * int(engines)
        # The ingress only awaits I/O: let it hold many requests (Serve's default is 5).
        options: dict[str, Any] = {"num_replicas": replicas,
                                   "max_ongoing_requests": self.ingress_max_ongoing_requests}
        if self.ingress_throughput_optimized:
            env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
            options["ray_actor_options"] = {"runtime_env": {"env_vars": env}}
        return options

    def replica_options(self, cluster_gpus: float) -> dict:
        """Keyword arguments for `LLMServer.options(...)`: scaling and resources.

        `cluster_gpus`: the GPUs Ray knows of (`deployments.app.cluster_gpus()`).
        """
        actor = {"num_cpus": self.replica_num_cpus, "num_gpus": self.gpus_per_replica(cluster_gpus)}
        if self.replica_resources:
            actor["resources"] = dict(self.replica_resources)
        options: dict[str, Any] = {"ray_actor_options": actor,
                                   "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options

    def engine_config(self, model_dir: Path):
        from engine import EngineConfig
        budget = {} if self.max_num_batched_tokens is None else {"max_num_batched_tokens": self.max_num_batched_tokens}
        return EngineConfig(
            model=str(model_dir), device=self.resolved_device(), dtype=self.dtype,
            load_format="dummy" if self.uses_dummy_weights() else "auto",
            max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
            gpu_memory_utilization=self.gpu_memory_utilization, lora_memory_fraction=self.lora_memory_fraction,
            max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len, seed=self.seed,
            warmup=self.engine_warmup, async_scheduling=self.async_scheduling,
            lora_failure_ttl_s=self.lora_failure_ttl_s,
            max_cpu_loras=self.max_cpu_loras, max_cpu_lora_bytes=self.max_cpu_lora_bytes, **budget)

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
                           max_adapters_per_tenant=self.max_adapters_per_tenant)

    def open_store(self):
        from adapter_store import open_store
        return open_store(self.store_uri(), endpoint_url=self.store_endpoint_url,
                          region=self.store_region)
