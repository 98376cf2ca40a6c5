"""Test fixtures importable by tests and benchmarks: tiny checkpoints, PEFT adapters, oracle."""
from engine.testing.adapters import FORMATS, make_peft_adapter
from engine.testing.checkpoints import FAMILIES, make_tiny_checkpoint, read_config
from engine.testing.reference import (
    adapter_format,
    load_reference_model,
    merge_adapter_,
    reference_logits,
)

__all__ = [
    "FAMILIES", "FORMATS", "adapter_format", "load_reference_model", "make_peft_adapter",
    "make_tiny_checkpoint", "merge_adapter_", "read_config", "reference_logits",
]
