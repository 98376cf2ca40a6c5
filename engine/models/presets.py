"""Real model shapes without a checkpoint: HF config.json values of published MoE models.

`model="dummy:<name>"` serves one of these with random weights (load_format="dummy"), so a
benchmark or a capacity test runs at the real shapes without downloading anything. The
values are those of the models' public config.json files (the fields our engine reads).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
    max_position_embeddings=40960, tie_word_embeddings=False, rope_theta=1e6)
QWEN3_235B_A22B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
    num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
    max_position_embeddings=40960, tie_word_embeddings=False, rope_theta=1e6)
MIXTRAL_8X7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
    num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=32768,
    tie_word_embeddings=False, rope_theta=1e6, sliding_window=None)
OLMOE_1B_7B = dict(
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=False, rms_norm_eps=1e-5, max_position_embeddings=4096,
    tie_word_embeddings=False, rope_theta=10000.0, clip_qkv=None)


@dataclass(frozen=True, slots=True)
class Preset:
    model_type: str  # HF model_type: the family
    architecture: str  # HF architectures[0]
    values: dict = field(default_factory=dict)  # config.json values (no model_type)

    def config_dict(self) -> dict:
        """A fresh config.json dict of this model: model_type, architectures and values."""
        return {"model_type": self.model_type, "architectures": [self.architecture], **self.values}


PRESETS: dict[str, Preset] = {
    "qwen3-30b-a3b": Preset("qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_30B_A3B),
    "qwen3-235b-a22b": Preset("qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_235B_A22B),
    "mixtral-8x7b": Preset("mixtral", "MixtralForCausalLM", MIXTRAL_8X7B),
    "olmoe-1b-7b": Preset("olmoe", "OlmoeForCausalLM", OLMOE_1B_7B),
}
ARCHITECTURES = {p.model_type: p.architecture for p in PRESETS.values()}


class UnknownPresetError(InvalidRequestError):
    """A `dummy:<name>` names no preset; the message lists the valid names."""


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown model preset {name!r}; valid presets: "
                                 f"{', '.join(sorted(PRESETS))}")
    return PRESETS[name]
