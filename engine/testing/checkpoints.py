"""Tiny, real Hugging Face MoE checkpoints made on the spot (no downloads).

They live in `engine.tiny_model` (the embedded default model is one); tests import them here.

`make_tiny_checkpoint` writes what a user's checkpoint directory holds: config.json,
sharded safetensors weights in the per-expert key layout, generation_config.json and
tokenizer files with a ChatML chat template, all through transformers' own classes.
"""
from engine.tiny_model import (  # noqa: F401 - the production writer, re-exported for tests
    CHAT_TEMPLATE, FAMILIES, SPECIAL_TOKENS, make_tiny_checkpoint, make_tokenizer, read_config,
    tiny_config,
)
