"""Defaults of the engine settings the app's options pass through (deployments.args.AppArgs and
EngineConfig both read them here). Plain constants: the app's option parsing imports this module
without torch."""
from adapter_store.limits import DEFAULT_MAX_LORA_RANK

MAX_LORA_RANK = DEFAULT_MAX_LORA_RANK  # the store's upload limit and the engine's slots agree
MAX_NUM_SEQS = 64
MAX_MODEL_LEN = 2048
MAX_NUM_BATCHED_TOKENS = 2048
GPU_MEMORY_UTILIZATION = 0.9
MAX_CPU_LORA_BYTES = 32 << 30
LORA_FAILURE_TTL_S = 30.0
ASYNC_SCHEDULING = True
SEED = 0
# the names EngineConfig.dtype takes (engine.config maps each to its torch dtype)
DTYPE_NAMES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
