"""ModelSpec: the family-independent facts the engine needs from a HF config.json."""
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import EngineError

SUPPORTED_FAMILIES = ("qwen3_moe", "mixtral", "olmoe")


@dataclass(slots=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers (Qwen3-MoE mlp_only_layers / decoder_sparse_step)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    norm_topk_prob: bool
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: str | None = None  # "head" (Qwen3: per head), "full" (OLMoE: over all heads), None
    clip_qkv: float | None = None
    sliding_window: int | None = None
    dense_layers: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise EngineError(f"num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_heads % self.num_kv_heads:
            raise EngineError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise EngineError(f"rope_type={rope_type!r} is not supported yet (only 'default')")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise EngineError("config.json has no rope_theta")
    return float(theta)


def _dense_layers(cfg, family: str, num_layers: int) -> tuple[int, ...]:
    if family != "qwen3_moe":
        return ()
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    only = set(getattr(cfg, "mlp_only_layers", None) or ())
    return tuple(i for i in range(num_layers) if i in only or (i + 1) % step != 0)


def _eos_ids(model_dir: Path | None, cfg) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [getattr(cfg, "eos_token_id", None)]
    if model_dir is not None and (model_dir / "generation_config.json").exists():
        from transformers import GenerationConfig
        sources.insert(0, GenerationConfig.from_pretrained(model_dir).eos_token_id)
    for value in sources:
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return tuple(ids)


def spec_from_hf_config(cfg, model_dir: Path | None = None) -> ModelSpec:
    """Build a ModelSpec from a transformers PretrainedConfig of a supported family."""
    family = cfg.model_type
    if family not in SUPPORTED_FAMILIES:
        raise EngineError(f"model_type={family!r} is not supported; use one of {SUPPORTED_FAMILIES}")
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    moe_inter = cfg.intermediate_size if family != "qwen3_moe" else cfg.moe_intermediate_size
    window = getattr(cfg, "sliding_window", None)
    if family == "qwen3_moe" and not getattr(cfg, "use_sliding_window", False):
        window = None
    return ModelSpec(
        family=family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim, num_experts=num_experts, top_k=cfg.num_experts_per_tok,
        moe_intermediate_size=moe_inter, intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=_rope_theta(cfg),
        max_position_embeddings=cfg.max_position_embeddings,
        norm_topk_prob=True if family == "mixtral" else bool(getattr(cfg, "norm_topk_prob", False)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family),
        clip_qkv=getattr(cfg, "clip_qkv", None), sliding_window=window,
        dense_layers=_dense_layers(cfg, family, cfg.num_hidden_layers),
        eos_token_ids=_eos_ids(model_dir, cfg),
    )


def spec_of(config) -> ModelSpec:
    """The spec of an EngineConfig's model: its hf_config if given, else model/config.json."""
    return spec_from_hf_config(config.hf_config) if config.hf_config is not None else load_spec(config.model)


def load_spec(model_dir: str | Path) -> ModelSpec:
    from transformers import AutoConfig
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise EngineError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint directory")
    return spec_from_hf_config(AutoConfig.from_pretrained(model_dir), model_dir)
