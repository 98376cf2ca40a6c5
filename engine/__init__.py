"""moeplex engine: continuous batching of many tenants' LoRA adapters over one MoE model.

The names below load on first use, so that `engine.defaults` (read by the app's option
parsing) and the torch-free scheduler modules import without torch.
"""
import importlib

_HOMES = {
    "AdapterLoadError": "engine.errors", "AsyncLLMEngine": "engine.async_engine", "EngineConfig": "engine.config",
    "EngineCoreClient": "engine.core_client", "EngineError": "engine.errors", "EngineUnavailableError": "engine.errors",
    "InvalidRequestError": "engine.errors",
    "LLMEngine": "engine.llm_engine", "LoRARequest": "engine.sequence", "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
