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


def _default_cache_dir() -> str:
    return str(Path.home() / ".cache" / "moeplex")


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(default=None, description="HF checkpoint dir or s3:// prefix; "
                              "default: the embedded tiny checkpoint")
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
    max_loras: int = Field(default=4, ge=1)
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
    lora_failure_ttl_s: float = Field(default=30.0, ge=0, description="seconds a failed adapter "
                                      "load fails fast before a request retries it")

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = Field(default=64, ge=1)
    replica_num_cpus: float = Field(default=1.0, ge=0)
    replica_num_gpus: float | None = Field(default=None, ge=0)
    replica_resources: dict[str, float] | None = None
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_max_ongoing_requests: int = Field(default=1024, ge=1)

    max_concurrent_requests_per_tenant: int = Field(default=32, ge=1)
    max_adapters_per_tenant: int = Field(default=64, ge=1)
    max_adapter_bytes: int = Field(default=512 << 20, ge=1)
    adapter_resolve_ttl_s: float = Field(
        default=2.0, ge=0, description="seconds the ingress reuses a resolved `model` (adapter "
        "name -> version, or not found) before asking the store again; 0 = ask every request. "
        "Uploads and deletes through the same ingress replica show at once; through another "
        "replica (or the CLI) after at most this long, or 10x this long for a pinned "
        "name@version that was deleted or unshared")

    @field_validator("autoscaling_config", mode="before")
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
        return self.model.rstrip("/").rsplit("/", 1)[-1]

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def gpus_per_replica(self) -> float:
        if self.replica_num_gpus is not None:
            return self.replica_num_gpus
        return 1.0 if self.device == "cuda" else 0.0

    def adapters_per_replica(self) -> int:
        return self.max_adapters_per_replica or 2 * self.max_loras

    def replica_options(self) -> dict:
        """Keyword arguments for `LLMServer.options(...)`: scaling and resources."""
        actor = {"num_cpus": self.replica_num_cpus, "num_gpus": self.gpus_per_replica()}
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
            max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
            max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len, seed=self.seed,
            warmup=self.engine_warmup, async_scheduling=self.async_scheduling,
            lora_failure_ttl_s=self.lora_failure_ttl_s,
            max_cpu_loras=self.max_cpu_loras, max_cpu_lora_bytes=self.max_cpu_lora_bytes, **budget)

    def store_limits(self):
        from adapter_store import StoreLimits
        return StoreLimits(max_rank=self.max_lora_rank, max_adapter_bytes=self.max_adapter_bytes,
                           max_adapters_per_tenant=self.max_adapters_per_tenant)

    def open_store(self):
        from adapter_store import open_store
        return open_store(self.store_uri(), endpoint_url=self.store_endpoint_url,
                          region=self.store_region)
