"""EngineConfig: everything LLMEngine needs to start, checked at construction."""
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import defaults
from engine.errors import InvalidRequestError
from engine.prefix_cache import SCOPES

_SHORT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_DTYPES = {name: getattr(torch, _SHORT.get(name, name)) for name in defaults.DTYPE_NAMES}


@dataclass(slots=True)
class EngineConfig:
    model: str | Path | None = None  # HF checkpoint dir; may be None with load_format="dummy" + hf_config
    device: str = "cpu"
    dtype: str | torch.dtype | None = None  # None: float32 on CPU, bfloat16 on CUDA
    # adapters resident on the device at once (slots); None: on CUDA as many max-rank adapters as
    # the memory rule gives (lora_layout "bytes": max_num_seqs, if more), 4 on CPU; 0: no adapters
    max_loras: int | None = None
    max_lora_rank: int = defaults.MAX_LORA_RANK
    # how resident adapters are laid out on the device (engine.lora.slots): "bytes", one heap where
    # each adapter takes its own rank and targets (more adapters in the same memory, decode steps
    # as fast as "slots": RESULTS.md); "slots", a whole image at max rank on every target per slot
    lora_layout: str = "bytes"
    # what the heap rounds an adapter's expert rank up to: 8 (a rank-8 adapter's experts take
    # half the bytes of 16; decode steps as fast: RESULTS.md, the multi-tenant trace) or 16, the
    # only unit of "slots"; None: 8 with "bytes", 16 with "slots"
    lora_rank_unit: int | None = None
    # bytes of that heap ("bytes" only); None: on CUDA from GPU memory beside the KV cache
    # (engine.memory's rule, in adapters of max rank on every target), max_loras such adapters otherwise
    lora_heap_bytes: int | None = None
    # the heap and the KV cache in one buffer ("bytes", one GPU): the heap borrows KV blocks no
    # sequence uses before it evicts an adapter, and gives them back when a sequence needs them
    # (engine.block_manager, engine.lora.manager); False: each keeps its own bytes
    kv_heap_sharing: bool = True
    # share of the GPU memory budget for adapter slots (CUDA, max_loras and num_kv_blocks None);
    # None: engine.memory's rule (KV cache for max_num_seqs sequences first, slots the rest)
    lora_memory_fraction: float | None = None
    # pinned host tier size; None: 4 x the slot count (here when max_loras is set, else by the runner)
    max_cpu_loras: int | None = None
    # and its byte bound: each host adapter is its compact image (its own rank and targets)
    max_cpu_lora_bytes: int | None = defaults.MAX_CPU_LORA_BYTES
    max_num_seqs: int = defaults.MAX_NUM_SEQS
    max_model_len: int = defaults.MAX_MODEL_LEN
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory (CUDA) or max_num_seqs x max_model_len (CPU)
    gpu_memory_utilization: float = defaults.GPU_MEMORY_UTILIZATION  # share of the card the engine may fill (CUDA)
    max_num_batched_tokens: int = defaults.MAX_NUM_BATCHED_TOKENS
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights at real shapes)
    hf_config: object = None  # a transformers config to use instead of model/config.json
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    warmup: bool = True  # dummy prefill / mixed steps at start-up on CUDA (Triton compiles there)
    lora_failure_ttl_s: float = defaults.LORA_FAILURE_TTL_S  # a failed adapter load is retried by requests after this
    # adapter prefetch: the first this many waiting requests, in admission order, reserve their
    # adapters before they are admitted (host load, then a free slot; one staged adapter per
    # tenant, at most the host tier's count); None: 2 x max_num_seqs; 0: no prefetch
    adapter_prefetch_window: int | None = None
    # aging: a tenant's oldest request with an adapter that has waited this many scheduler steps
    # gets first claim on the device room that frees (one per tenant, the longest at its tenant's
    # head first; engine.slot_policy); None: no aging
    max_adapter_wait_steps: int | None = 100
    # slot-fair preemption: a tenant's oldest request with an adapter that has waited this many
    # steps for a slot, while another tenant holds more than its fair share of the slots, gets
    # one of them drained (that tenant's adapter with the fewest running requests is preempted
    # and recomputed later); None: only after max_adapter_wait_steps
    slot_reclaim_steps: int | None = 8
    # schedule step n+1 before reading step n's tokens back, and launch it then when it is a decode
    # graph step (its decodes take those tokens on the device); a sequence that step n finishes
    # wastes one row of step n+1. Unseeded sampling then draws differently than without it.
    async_scheduling: bool = defaults.ASYNC_SCHEDULING
    # launch eager (prefill, mixed) steps ahead too: they are bound by host time, so that hides
    # nothing and delays the outputs of the step before them (tests use it to cover the path on CPU)
    async_eager_steps: bool = False
    # prefill and mixed steps' attention through kernels.paged_prefill_attention (one Triton launch
    # a layer, no padded copies) instead of gather + SDPA; None: on for CUDA, off on CPU (True
    # there runs the kernel only under the Triton interpreter)
    triton_prefill_attention: bool | None = None
    # CUDA graphs of prefill and mixed steps too (token buckets up to max_num_batched_tokens; their
    # attention is the Triton prefill kernel whatever the flag above; a step outside the buckets
    # runs eagerly); None: on for CUDA, off on CPU. Off with enforce_eager
    prefill_graphs: bool | None = None
    lora_mode: str = "fused"  # "fused" (virtual experts) or "loop" (one MoE call per adapter: baseline)
    # keep the KV of full prompt (and output) blocks after their sequences end, and start a
    # prompt that begins with one of them after it (engine.prefix_cache)
    enable_prefix_caching: bool = True
    # who shares cached prefixes: "tenant", requests of one tenant on one adapter (or the base
    # model); "all", every request on the same adapter, across tenants (one tenant could then tell
    # from its own first-token times whether another sent a prompt)
    prefix_cache_scope: str = "tenant"
    seed: int = defaults.SEED
    # a replica over several GPUs (engine.parallel): attention, dense projections and lm_head split
    # by heads / vocabulary over tensor_parallel_size ranks; experts split by expert over
    # expert_parallel_size ranks (else, with tensor parallelism, by each expert's intermediate).
    # Each is 1 or the replica's number of ranks (the larger of the two). Rank 0 runs this engine
    # (scheduler, adapter manager, sampling); the other ranks follow its steps
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    # where the ranks meet ("tcp://host:port", rank 0's host); None: a free port on 127.0.0.1
    distributed_init_method: str | None = None
    # who starts ranks 1..N-1: "processes", rank 0 as local processes (one node; CUDA device r for
    # rank r); "external", somebody else (the Ray replica: one actor per GPU of its placement group)
    parallel_workers: str = "processes"
    # longest the ranks wait for each other at start-up, and for a collective of a step
    distributed_timeout_s: float = 600.0

    def __post_init__(self):
        self.device = str(self.device)
        if self.model is None and self.hf_config is None:
            raise InvalidRequestError("EngineConfig needs model=<checkpoint dir> (or hf_config with load_format='dummy')")
        if self.load_format not in ("auto", "dummy"):
            raise InvalidRequestError(f"load_format={self.load_format!r}: use 'auto' or 'dummy'")
        if self.lora_mode not in ("fused", "loop"):
            raise InvalidRequestError(f"lora_mode={self.lora_mode!r}: use 'fused' or 'loop'")
        if self.prefix_cache_scope not in SCOPES:
            raise InvalidRequestError(f"prefix_cache_scope={self.prefix_cache_scope!r}: use one of {SCOPES}")
        for name in ("max_num_seqs", "max_model_len", "block_size", "max_num_batched_tokens", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, least in (("adapter_prefetch_window", 0), ("max_adapter_wait_steps", 1),
                            ("slot_reclaim_steps", 1)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise InvalidRequestError(f"{name} must be >= {least} or None, got {getattr(self, name)}")
        if self.lora_failure_ttl_s < 0:
            raise InvalidRequestError(f"lora_failure_ttl_s must be >= 0, got {self.lora_failure_ttl_s}")
        self._check_memory_settings()
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidRequestError(f"num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks}")
        if self.lora_layout not in ("slots", "bytes"):
            raise InvalidRequestError(f"lora_layout must be 'slots' or 'bytes', got {self.lora_layout!r}")
        if self.lora_heap_bytes is not None and (self.lora_heap_bytes < 1 or self.lora_layout != "bytes"):
            raise InvalidRequestError(f"lora_heap_bytes must be >= 1 or None, and set with lora_layout='bytes' "
                                      f"only, got {self.lora_heap_bytes} with {self.lora_layout!r}")
        if self.lora_rank_unit is None:
            self.lora_rank_unit = 8 if self.lora_layout == "bytes" else 16
        if self.lora_rank_unit not in (8, 16) or (self.lora_rank_unit != 16 and self.lora_layout != "bytes"):
            raise InvalidRequestError(f"lora_rank_unit must be 16, or 8 with lora_layout='bytes', got "
                                      f"{self.lora_rank_unit!r} with {self.lora_layout!r}")
        if self.max_cpu_lora_bytes is not None and self.max_cpu_lora_bytes < 1:
            raise InvalidRequestError(f"max_cpu_lora_bytes must be >= 1 or None, got {self.max_cpu_lora_bytes}")
        self._check_parallel_settings()
        on_cuda = self.torch_device.type == "cuda"
        if self.triton_prefill_attention is None:
            self.triton_prefill_attention = on_cuda
        if self.prefill_graphs is None:
            self.prefill_graphs = on_cuda
        if self.max_loras is None and not on_cuda:
            self.max_loras = 4
        if self.max_cpu_loras is None and self.max_loras is not None:
            self.max_cpu_loras = 4 * max(self.max_loras, 1)

    def _check_parallel_settings(self) -> None:
        from engine.parallel.shard import Shard

        Shard(0, self.tensor_parallel_size, self.expert_parallel_size)  # raises on a bad pair
        if self.parallel_workers not in ("processes", "external"):
            raise InvalidRequestError(f"parallel_workers must be 'processes' or 'external', got {self.parallel_workers!r}")
        if self.distributed_timeout_s <= 0:
            raise InvalidRequestError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")

    @property
    def world_size(self) -> int:
        """Ranks (GPUs) of this replica."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    def _check_memory_settings(self) -> None:
        if self.max_loras is not None and self.max_loras < 0:
            raise InvalidRequestError(f"max_loras must be >= 0 or None, got {self.max_loras}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.lora_memory_fraction is None:
            return
        if not 0 < self.lora_memory_fraction < 1:
            raise InvalidRequestError(f"lora_memory_fraction must be in (0, 1) or None, got {self.lora_memory_fraction}")
        if self.max_loras is not None or self.num_kv_blocks is not None:
            raise InvalidRequestError("lora_memory_fraction splits the memory only when max_loras and "
                                      "num_kv_blocks are both None (unset)")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype={self.dtype!r}: use one of {sorted(_DTYPES)}")
        return _DTYPES[self.dtype]
