"""moeplex engine: continuous batching of many tenants' LoRA adapters over one MoE model."""
from engine.config import EngineConfig
from engine.errors import AdapterLoadError, EngineError, InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import LoRARequest

__all__ = ["AdapterLoadError", "AsyncLLMEngine", "EngineConfig", "EngineCoreClient", "EngineError", "InvalidRequestError",
           "LLMEngine", "LoRARequest", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name == "AsyncLLMEngine":  # keeps asyncio/threading out of plain `import engine`
        from engine.async_engine import AsyncLLMEngine
        return AsyncLLMEngine
    if name == "EngineCoreClient":
        from engine.core_client import EngineCoreClient
        return EngineCoreClient
    raise AttributeError(name)
