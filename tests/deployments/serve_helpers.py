"""Helpers of the Serve tests: HTTP uploads, the direct-engine oracle, replica actors."""
from __future__ import annotations

from pathlib import Path

import httpx

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# The Serve test app (tests/deployments/conftest.py builds it).
APP = "moeplex"
BASE = "tiny-moe"
KEYS = {"acme": "sk-acme-test", "globex": "sk-globex-test", "solo": "sk-solo-test"}
MAX_ADAPTERS_PER_TENANT = 3
MAX_MODEL_LEN = 256
MAX_ADAPTER_BYTES = 1 << 20


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def upload(base_url: str, headers: dict, name: str, adapter_dir: Path) -> httpx.Response:
    """POST /v1/adapters exactly as `curl -F name=.. -F files=@.. -F files=@..` does."""
    files = [("files", (f, (Path(adapter_dir) / f).read_bytes())) for f in ADAPTER_FILES]
    return httpx.post(f"{base_url}/v1/adapters", headers=headers, data={"name": name},
                      files=files, timeout=60)


class DirectEngine:
    """The engine called directly (no Ray, no HTTP): the oracle for served outputs."""

    def __init__(self, checkpoint: Path, max_model_len: int):
        from engine import EngineConfig, LLMEngine

        self.engine = LLMEngine(EngineConfig(model=str(checkpoint), device="cpu", max_loras=4,
                                             max_lora_rank=16, max_model_len=max_model_len))

    def complete(self, prompt, max_tokens: int, adapter_dir: Path | None = None,
                 name: str = "oracle", stop=(), **sampling) -> dict:
        from engine import LoRARequest, SamplingParams

        lora = None if adapter_dir is None else LoRARequest(lora_name=name,
                                                            lora_path=str(adapter_dir))
        params = SamplingParams(max_tokens=max_tokens, stop=tuple(stop), **{"temperature": 0.0, **sampling})
        return self.engine.generate([prompt], params, loras=[lora])[0]

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return self.engine.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                         add_generation_prompt=True)


def llm_replica_actors(app_name: str) -> list:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app_name}#LLMServer#")]
    return [ray.get_actor(n, namespace="serve") for n in names]
