"""PEFT LoRA key formats of the supported MoE families, without torch.

One parser serves the store (validation) and the engine (loading). A key names a
layer, a canonical module and, for per-expert formats, an expert:

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight      -> (3, "q_proj", None, "A")
    base_model.model.model.layers.3.mlp.experts.7.up_proj.lora_B.weight  -> (3, "up", 7, "B")
    base_model.model.model.layers.3.block_sparse_moe.experts.7.w3.lora_B.weight (Mixtral, same)
    base_model.model.model.layers.3.mlp.experts.base_layer.lora_A.weight -> fused experts,
        gate_up or down told apart by shape (see `classify_fused`)
    base_model.model.model.layers.3.mlp.experts.gate_proj.lora_A.weight  -> (3, "gate", None, "A"),
        shared: the shared-outer layout (below)

Shared-outer MoE LoRA, as Megatron-Bridge exports it (and sglang's
`--experts-shared-outer-loras` reads it): gate's and up's lora_A and down's lora_B are one
tensor per layer, [1, r, IN] and [1, OUT, r], under the experts' name without an expert index;
the other halves are per expert, as in the per-expert format. Mixtral spells w1/w3/w2.

Canonical modules: q_proj k_proj v_proj o_proj (dense) and gate up down (per expert),
gate_up and down for the fused 3-D experts format (PEFT `target_parameters`).
"""
from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass

import regex

# Tenants write the module-name patterns (PEFT's target_modules string, rank_pattern and
# alpha_pattern keys); a pattern with nested quantifiers can backtrack for minutes, so each
# match runs under a time limit, and all the matches of one adapter under a total budget.
PATTERN_TIMEOUT_S = 0.05
PATTERN_BUDGET_S = 5.0

FAMILIES = ("qwen3_moe", "mixtral", "olmoe")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_MODULES = ("gate", "up", "down")
# Per-expert projection names as checkpoints of transformers 4.x spell them.
_EXPERT_ALIASES = {
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "w1": "gate", "w3": "up", "w2": "down",
}

_PREFIX = r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\."
_ATTN_RE = re.compile(_PREFIX + r"self_attn\.(?P<module>[qkvo]_proj)\.lora_(?P<ab>[AB])\.weight$")
_EXPERT_RE = re.compile(
    _PREFIX + r"(?P<block>mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
    r"(?P<module>gate_proj|up_proj|down_proj|w1|w2|w3)\.lora_(?P<ab>[AB])\.weight$"
)
_SHARED_RE = re.compile(
    _PREFIX + r"(?P<block>mlp|block_sparse_moe)\.experts\."
    r"(?P<module>gate_proj|up_proj|down_proj|w1|w2|w3)\.lora_(?P<ab>[AB])\.weight$"
)
# The half of each expert projection that the shared-outer layout shares across experts.
SHARED_SIDE = {"gate": "A", "up": "A", "down": "B"}
_FUSED_RE = re.compile(
    _PREFIX + r"mlp\.experts\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$"
)


class UnknownKeyError(ValueError):
    """A tensor key that no supported format of this model family explains."""


class PatternTimeoutError(ValueError):
    """A tenant's module-name pattern took too long to match (catastrophic backtracking)."""


def match_module_pattern(pattern: str, module_name: str, suffix: bool = True) -> bool:
    """PEFT's matching of a module-name regex, under PATTERN_TIMEOUT_S.

    suffix=True: the pattern matches the end of the dotted path (rank/alpha_pattern keys);
    suffix=False: it must match the whole path (a target_modules string).
    """
    return _match(compile_module_pattern(pattern, suffix), pattern, module_name, PATTERN_TIMEOUT_S)


@functools.lru_cache(maxsize=2048)
def compile_module_pattern(pattern: str, suffix: bool = True) -> regex.Pattern:
    """The compiled form `match_module_pattern` uses; raises regex.error if it does not compile.

    Compiled once per pattern: `regex`'s own cache holds 500 patterns, so a config with more
    keys than that would recompile every one of them for every tensor.
    """
    return regex.compile(rf"(.*\.)?({pattern})" if suffix else pattern)


def _match(compiled: regex.Pattern, pattern: str, module_name: str, timeout_s: float) -> bool:
    try:
        return regex.fullmatch(compiled, module_name, timeout=timeout_s) is not None
    except TimeoutError:
        raise PatternTimeoutError(f"module pattern {pattern!r} takes too long to match; "
                                  "simplify it (no nested quantifiers)") from None


class PatternTable:
    """PEFT's rank_pattern / alpha_pattern lookup for one adapter (see `pattern_value`).

    Each module name is matched once (lora_A and lora_B share it), and every match of the
    table shares one time budget: per-match limits alone would let many slow patterns times
    many modules hold a thread for minutes.
    """

    def __init__(self, patterns: dict, default, budget_s: float | None = None):
        self._patterns = [(p, compile_module_pattern(p), v) for p, v in patterns.items()]
        self._default = default
        self._deadline = time.monotonic() + (PATTERN_BUDGET_S if budget_s is None else budget_s)
        self._values: dict[str, object] = {}

    def value(self, module_name: str):
        if module_name not in self._values:
            self._values[module_name] = self._lookup(module_name)
        return self._values[module_name]

    def _lookup(self, module_name: str):
        for pattern, compiled, value in self._patterns:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise PatternTimeoutError(f"{len(self._patterns)} module patterns take too long to "
                                          "match in total; use fewer or simpler patterns")
            if _match(compiled, pattern, module_name, min(PATTERN_TIMEOUT_S, left)):
                return value
        return self._default


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The dimensions of a base model that decide every LoRA tensor's shape."""

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int  # per-expert (moe_intermediate_size for Qwen3-MoE)
    num_experts: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"unsupported model_type {family!r}; supported: {', '.join(FAMILIES)}")
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        # Checkpoints spell the expert count either way (transformers maps one onto the other).
        experts = config.get("num_experts") or config.get("num_local_experts")
        inter = config.get("moe_intermediate_size") if family == "qwen3_moe" else None
        inter = inter or config.get("intermediate_size")
        if not experts or not inter:
            raise ValueError(f"config of {family} lacks the expert count or intermediate size")
        return cls(
            family=family,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(inter),
            num_experts=int(experts),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
        )

    def io_features(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a canonical module as a linear map."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        table = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate": (self.hidden_size, self.intermediate_size),
            "up": (self.hidden_size, self.intermediate_size),
            "down": (self.intermediate_size, self.hidden_size),
            "gate_up": (self.hidden_size, 2 * self.intermediate_size),
        }
        return table[module]


@dataclass(frozen=True, slots=True)
class LoRAKey:
    """What one adapter tensor is: its layer, canonical module, expert and A/B side."""

    layer: int
    module: str  # q_proj k_proj v_proj o_proj | gate up down | gate_up down (fused)
    expert: int | None  # None for dense modules and for the fused format (all experts)
    which: str  # "A" or "B"
    fused: bool = False
    shared: bool = False  # shared-outer: one tensor for every expert of the layer

    @property
    def target(self) -> tuple[int, str, int | None]:
        """The (layer, module, expert) this key and its A/B twin belong to."""
        return self.layer, self.module, self.expert


def parse_lora_key(key: str, shape: tuple[int, ...], model: ModelShape) -> LoRAKey:
    """Recognise one tensor key of a PEFT LoRA adapter for `model`.

    Raises UnknownKeyError when no supported format of the family explains the key,
    or when the key's layer or expert is out of the model's range.
    """
    parsed = _match_key(key, shape, model)
    if parsed is None:
        raise UnknownKeyError(f"tensor {key!r} is not a LoRA weight this {model.family} model knows")
    if parsed.layer >= model.num_layers:
        raise UnknownKeyError(f"tensor {key!r}: layer {parsed.layer} >= num_hidden_layers {model.num_layers}")
    if parsed.expert is not None and parsed.expert >= model.num_experts:
        raise UnknownKeyError(f"tensor {key!r}: expert {parsed.expert} >= num_experts {model.num_experts}")
    return parsed


def _match_key(key: str, shape: tuple[int, ...], model: ModelShape) -> LoRAKey | None:
    if m := _ATTN_RE.match(key):
        return LoRAKey(int(m["layer"]), m["module"], None, m["ab"])
    if m := _EXPERT_RE.match(key):
        if not _family_spelling(m["block"], m["module"], model.family):
            return None
        return LoRAKey(int(m["layer"]), _EXPERT_ALIASES[m["module"]], int(m["expert"]), m["ab"])
    if m := _SHARED_RE.match(key):
        if not _family_spelling(m["block"], m["module"], model.family):
            return None
        module = _EXPERT_ALIASES[m["module"]]
        if SHARED_SIDE[module] != m["ab"]:
            return None  # only gate/up A and down B are shared
        return LoRAKey(int(m["layer"]), module, None, m["ab"], shared=True)
    if m := _FUSED_RE.match(key):
        module = classify_fused(m["ab"], shape, model)
        if module is None:
            return None
        return LoRAKey(int(m["layer"]), module, None, m["ab"], fused=True)
    return None


def _family_spelling(block: str, module: str, family: str) -> bool:
    """Mixtral: block_sparse_moe.experts...w1|w2|w3; the others: mlp.experts..._proj."""
    if family == "mixtral":
        return block == "block_sparse_moe" and module.startswith("w")
    return block == "mlp" and module.endswith("_proj")


def classify_fused(which: str, shape: tuple[int, ...], model: ModelShape) -> str | None:
    """Tell gate_up from down in the fused 3-D experts format by the tensor's shape.

    PEFT nests one wrapper per targeted parameter, so the key alone does not say which
    parameter it wraps. lora_A is [r*E, in] and lora_B is [out, r*E]; gate_up reads the
    hidden size and writes 2*I, down reads I and writes the hidden size.
    """
    if len(shape) != 2:
        return None
    d, i = model.hidden_size, model.intermediate_size
    feature = shape[1] if which == "A" else shape[0]
    gate_up_feature, down_feature = (d, i) if which == "A" else (2 * i, d)
    if feature == gate_up_feature and feature != down_feature:
        return "gate_up"
    if feature == down_feature and feature != gate_up_feature:
        return "down"
    return None


def expected_shape(key: LoRAKey, rank: int, model: ModelShape) -> tuple[int, ...]:
    """The shape a tensor of `key` must have for an adapter of rank `rank`."""
    in_f, out_f = model.io_features(key.module)
    if key.shared:
        return (1, rank, in_f) if key.which == "A" else (1, out_f, rank)
    if key.fused:
        rows = rank * model.num_experts
        return (rows, in_f) if key.which == "A" else (out_f, rows)
    return (rank, in_f) if key.which == "A" else (out_f, rank)


def peft_module_name(key: str) -> str:
    """The module path PEFT's rank_pattern/alpha_pattern match against."""
    name = re.sub(r"^base_model\.model\.", "", key)
    return re.sub(r"\.lora_[AB]\.weight$", "", name)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scale of a module's delta: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def pattern_value(module_name: str, patterns: dict, default):
    """PEFT's rule: the first pattern that matches the end of the module path wins."""
    return PatternTable(patterns, default).value(module_name)


def pattern_module_name(key: str, parsed: LoRAKey) -> str:
    """The name PEFT matches rank_pattern/alpha_pattern against for tensor `key`.

    Modules: their path (`peft_module_name`). Fused 3-D experts: PEFT matches the
    parameter's path, `...mlp.experts.gate_up_proj` or `...mlp.experts.down_proj`,
    with the `base_layer` wrappers of nested targets stripped.
    """
    name = peft_module_name(key)
    if not parsed.fused:
        return name
    param = "gate_up_proj" if parsed.module == "gate_up" else "down_proj"
    return re.sub(r"(\.base_layer)+$", "", name) + "." + param
