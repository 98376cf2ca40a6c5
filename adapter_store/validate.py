"""Validation of an adapter directory against a base model, before anything is stored.

Nothing here deserialises a pickle or imports torch: the config is JSON, the weights
are read through their safetensors header and a memory map (`safetensors_io`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import regex

from adapter_store.errors import LimitExceededError, ValidationError
from adapter_store.formats import (
    ATTENTION_MODULES, SHARED_SIDE, ModelShape, PatternTable, PatternTimeoutError, UnknownKeyError,
    compile_module_pattern, expected_shape, lora_scale, match_module_pattern, parse_lora_key, pattern_module_name,
)
from adapter_store.limits import (
    DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_VERSIONS_PER_ADAPTER, MAX_SERVED_WEIGHT, max_header_bytes,
)
from adapter_store.safetensors_io import TensorEntry, ValueScan, read_header, scan_values

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}
MAX_CONFIG_BYTES = 1 << 20
MAX_PATTERN_CHARS = 256  # target_modules string, rank_pattern / alpha_pattern keys
# Keys of rank_pattern / alpha_pattern each: every one is a regex tried against every module.
MAX_PATTERN_KEYS = 256


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Per-tenant limits checked on upload."""

    max_rank: int = DEFAULT_MAX_LORA_RANK
    max_adapter_bytes: int = 4 << 30
    max_adapters_per_tenant: int = 1000
    max_versions_per_adapter: int = DEFAULT_MAX_VERSIONS_PER_ADAPTER  # older ones are deleted

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) <= 0:
                raise ValueError(f"StoreLimits.{f.name} must be a positive int")


@dataclass(slots=True)
class AdapterSummary:
    """What validation learned; goes into the manifest."""

    rank: int
    targets: list[str]
    layout: str  # "per_expert" | "shared_outer" | "fused" | "attn_only"
    num_tensors: int
    dtypes: list[str]
    base_model: dict = field(default_factory=dict)


def load_base_model(base_model_dir: str | Path) -> tuple[ModelShape, dict, frozenset[int]]:
    """ModelShape, fingerprint record and dense-MLP layers (no experts there) of the checkpoint
    in `base_model_dir`."""
    path = Path(base_model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
        shape = ModelShape.from_config(config)
    except FileNotFoundError:
        raise ValidationError(f"base model config {path} not found; pass the checkpoint directory "
                              "of the served model (--base-model / MOEPLEX_BASE_MODEL)",
                              code="bad_base_model") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"base model config {path} is not usable: {exc}", code="bad_base_model") from None
    record = dataclasses.asdict(shape)
    dense = _dense_layers_of(config)
    if dense:  # only where there are some: every other base keeps the digest its adapters carry
        record["dense_mlp_layers"] = sorted(dense)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return shape, {"model_type": shape.family, "fingerprint": digest,
                   "name": config.get("_name_or_path") or str(Path(base_model_dir).resolve().name)}, dense


def _dense_layers_of(config: dict) -> frozenset[int]:
    """Qwen3-MoE's mlp_only_layers, and the layers decoder_sparse_step skips (the engine's rule,
    engine.models.spec._dense_layers)."""
    if config.get("model_type") != "qwen3_moe":
        return frozenset()
    step = config.get("decoder_sparse_step") or 1
    only = set(config.get("mlp_only_layers") or ())
    return frozenset(i for i in range(int(config["num_hidden_layers"])) if i in only or (i + 1) % step != 0)


def validate_adapter(src_dir: str | Path, base_model_dir: str | Path,
                     limits: StoreLimits) -> AdapterSummary:
    """Check an adapter directory; raise ValidationError (or a subclass) on any fault."""
    src = Path(src_dir)
    if not src.is_dir():
        raise ValidationError(f"adapter directory {src} does not exist", code="not_a_directory")
    _refuse_pickles_and_strays(src)
    config = _read_config(src)
    total = sum((src / name).stat().st_size for name in ADAPTER_FILES)
    if total > limits.max_adapter_bytes:
        raise LimitExceededError(
            f"adapter is {total} bytes; the limit is {limits.max_adapter_bytes}: lower the rank "
            "or the number of targeted modules, or save in bf16", code="too_large")
    _check_config_fields(config)
    _check_config_ranks(config, limits)
    shape, base, dense = load_base_model(base_model_dir)
    entries = read_header(src / WEIGHTS_FILE, max_header_bytes(shape))
    if not entries:
        raise ValidationError(f"{WEIGHTS_FILE} holds no tensors", code="empty_adapter")
    try:
        ranks = PatternTable(config.get("rank_pattern") or {}, config["r"])
        targeted = _Targets(config)
        keys = [_check_tensor(e, ranks, targeted, shape, dense) for e in entries]
    except PatternTimeoutError as exc:
        _bad_config(str(exc))
    _check_pairs(keys, entries)
    scans = _check_finite(src / WEIGHTS_FILE, entries)
    try:
        _check_scaled(config, keys, entries, scans)
    except PatternTimeoutError as exc:
        _bad_config(str(exc))
    return AdapterSummary(
        rank=max(rank for _, rank in keys), num_tensors=len(entries),
        targets=sorted({k.module for k, _ in keys}), layout=_layout([k for k, _ in keys]),
        dtypes=sorted({e.dtype for e in entries}), base_model=base,
    )


def _refuse_pickles_and_strays(src: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValidationError(
                f"{path.relative_to(src)} is a pickled file; pickles are refused unread. "
                "Save the adapter as adapter_model.safetensors (save_pretrained(safe_serialization=True)) "
                "and remove the pickle", code="pickle_refused")
        if path.suffix == ".safetensors" and path.relative_to(src) != Path(WEIGHTS_FILE):
            raise ValidationError(
                f"unexpected weights file {path.relative_to(src)}; put every tensor in one "
                f"{WEIGHTS_FILE} at the top of the directory", code="unexpected_file")
    if not (src / WEIGHTS_FILE).is_file():
        raise ValidationError(f"{WEIGHTS_FILE} is missing from {src}", code="missing_weights")


def _read_config(src: Path) -> dict:
    path = src / CONFIG_FILE
    if not path.is_file():
        raise ValidationError(f"{CONFIG_FILE} is missing from {src}; save the adapter with PEFT's "
                              "save_pretrained, which writes it", code="missing_config")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValidationError(f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes", code="bad_config")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also integers of 4300+ digits
        raise ValidationError(f"{CONFIG_FILE} is not valid JSON: {exc}", code="bad_config") from None
    except RecursionError:
        raise ValidationError(f"{CONFIG_FILE} nests arrays or objects too deeply to be a PEFT config",
                              code="bad_config") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise ValidationError(f"{CONFIG_FILE} has peft_type {found!r}; only PEFT LoRA adapters "
                              "(peft_type \"LORA\") are served", code="not_lora")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValidationError(f"{CONFIG_FILE} has init_lora_weights {init!r}: such an adapter expects a base model "
                              "whose weights its initialisation changed. Convert it to plain LoRA on the original "
                              "base (PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)) "
                              "and upload that", code="unsupported_option")
    enabled = [name for name in UNSERVED_OPTIONS if config.get(name)]
    if enabled:
        raise ValidationError(f"{CONFIG_FILE} enables {', '.join(enabled)}, which change{'s' if len(enabled) == 1 else ''} "
                              "what the adapter computes; only plain LoRA weights are served (W x + B A x times "
                              "its scale): train without them", code="unsupported_option")
    return config


# init_lora_weights that subtract the adapter's start from the base weights (PiSSA, CorDA, OLoRA) or
# quantise them (LoftQ): unless converted (which saves init_lora_weights true), the adapter is a
# delta over another base than the one served
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")
# PEFT LoraConfig fields that make the adapter compute something other than plain LoRA, or change
# the base model under it: served as plain LoRA they would give another model than the one trained.
UNSERVED_OPTIONS = (
    "use_dora", "lora_bias", "modules_to_save",
    "layer_replication",  # repeats layers: a deeper model than the base
    "alora_invocation_tokens",  # activated LoRA: the delta only from its invocation tokens on
    "use_qalora",  # pools the input by groups before A
    "kasa_config",  # truncates the base weights' singular values, a diagonal between A and B
    "use_bdlora",  # block-diagonal factors
    "arrow_config",  # routes tokens among several LoRA experts
    "monteclora_config",  # samples the factors
)


def _check_config_fields(config: dict) -> None:
    """Types of the fields the store and the engine read: a hostile config must not crash either."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_regex("target_modules", targets)
    elif not _is_str_list(targets):
        _bad_config("target_modules must be a list of module names or one regex string")
    if not _is_str_list(config.get("target_parameters")):
        _bad_config("target_parameters must be a list of parameter names")
    for field_name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field_name) or {}
        if not isinstance(pattern, dict):
            _bad_config(f"{field_name} must be an object mapping module-name regexes to values")
        if len(pattern) > MAX_PATTERN_KEYS:
            _bad_config(f"{field_name} has {len(pattern)} keys; at most {MAX_PATTERN_KEYS} are "
                        "accepted: merge them into fewer regexes")
        for key in pattern:
            _check_regex(field_name, key)
    layers = config.get("layers_to_transform")
    if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(_is_int(v) for v in layers))):
        _bad_config("layers_to_transform must be a layer index or a list of them")
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str):
        _check_regex("exclude_modules", excluded)
    elif not _is_str_list(excluded):
        _bad_config("exclude_modules must be a list of module names or one regex string")
    alphas = [config.get("lora_alpha"), *(config.get("alpha_pattern") or {}).values()]
    if not all(_is_finite_number(a) for a in alphas):
        _bad_config("lora_alpha and alpha_pattern values must be finite numbers")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _is_finite_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def _check_regex(field_name: str, pattern: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        _bad_config(f"{field_name} entry of {len(pattern)} characters is over {MAX_PATTERN_CHARS}")
    try:
        regex.compile(pattern)  # the engine that matches it (formats.match_module_pattern)
        compile_module_pattern(pattern, suffix=field_name != "target_modules")
    except regex.error as exc:
        _bad_config(f"{field_name} entry {pattern!r} is not a valid regex ({exc})")


def _bad_config(message: str) -> None:
    raise ValidationError(f"{CONFIG_FILE}: {message}; save the adapter with PEFT's save_pretrained",
                          code="bad_config")


def _check_config_ranks(config: dict, limits: StoreLimits) -> None:
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r")] + list(pattern.values() if isinstance(pattern, dict) else [None])
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise ValidationError(f"{CONFIG_FILE}: r and rank_pattern values must be positive integers",
                              code="bad_config")
    if max(ranks) > limits.max_rank:
        raise LimitExceededError(f"adapter rank {max(ranks)} is over this tenant's limit of "
                                 f"{limits.max_rank}; retrain with r <= {limits.max_rank}", code="rank_too_high")


def _check_tensor(entry: TensorEntry, ranks: PatternTable, targeted: "_Targets", shape: ModelShape,
                  dense: frozenset[int]):
    try:
        key = parse_lora_key(entry.key, entry.shape, shape)
    except UnknownKeyError as exc:
        raise ValidationError(f"{exc}; the adapter must target only attention q/k/v/o and the "
                              "experts of this base model (no router, lm_head or embeddings)",
                              code="unknown_key") from None
    if key.layer in dense and key.module not in ATTENTION_MODULES:
        raise ValidationError(f"tensor {entry.key!r} adapts experts of layer {key.layer}, which has a dense "
                              "MLP in this base model (mlp_only_layers / decoder_sparse_step): it has no experts",
                              code="unknown_key")
    module_name = pattern_module_name(entry.key, key)
    rank = ranks.value(module_name)
    want = expected_shape(key, rank, shape)
    if tuple(entry.shape) != want:
        raise ValidationError(
            f"tensor {entry.key!r} has shape {list(entry.shape)}, expected {list(want)} for rank "
            f"{rank} on this base model: check r/rank_pattern and that the adapter was trained on "
            "this base model", code="wrong_shape")
    if not targeted.covers(key, module_name):
        raise ValidationError(f"tensor {entry.key!r} is not covered by target_modules/target_parameters "
                              f"(less exclude_modules, in layers_to_transform) of {CONFIG_FILE}: fix the config "
                              "or drop the tensor", code="untargeted_key")
    return key, rank


class _Targets:
    """PEFT's test of which modules an adapter adapts: target_modules / target_parameters, less
    exclude_modules, in the layers of layers_to_transform. A name list is a set, so a config
    listing every module path costs one lookup per dotted suffix, not a scan per tensor. PEFT
    makes no LoRA module outside these, so a tensor there would not be loaded by PEFT: served, it
    would give another model than the one trained."""

    def __init__(self, config: dict):
        self._params = set(config.get("target_parameters") or [])
        targets = config.get("target_modules") or []
        self._regex = targets if isinstance(targets, str) else None
        self._names = set() if self._regex is not None else set(targets)
        excluded = config.get("exclude_modules") or []
        self._excluded_regex = excluded if isinstance(excluded, str) else None
        self._excluded = set() if self._excluded_regex is not None else set(excluded)
        self._matched: dict[tuple[str, str], bool] = {}  # (regex, module name) -> match: A and B share one
        layers = config.get("layers_to_transform")  # PEFT: None or [] is every layer
        self._layers = set(layers if isinstance(layers, list) else [layers]) if layers not in (None, []) else None

    def covers(self, key, module_name: str) -> bool:
        if key.fused:  # PEFT matches target_parameters by suffix alone: no exclusions, no layer test
            return _suffix_in(module_name, self._params)
        if self._excluded_regex is not None:
            if self._match(self._excluded_regex, module_name):
                return False
        elif _suffix_in(module_name, self._excluded):
            return False
        if self._regex is not None:
            return self._regex == "all-linear" or self._match(self._regex, module_name)
        if module_name in self._names:  # a whole path is taken as named, whatever its layer (PEFT)
            return True
        return _suffix_in(module_name, self._names) and (self._layers is None or key.layer in self._layers)


    def _match(self, pattern: str, module_name: str) -> bool:
        if (pattern, module_name) not in self._matched:
            self._matched[(pattern, module_name)] = match_module_pattern(pattern, module_name, suffix=False)
        return self._matched[(pattern, module_name)]


def _suffix_in(module_name: str, names: set) -> bool:
    """`module_name == t or module_name.endswith("." + t)` for some t in names."""
    parts = module_name.split(".")
    return any(".".join(parts[i:]) in names for i in range(len(parts)))


def _check_pairs(keys, entries: list[TensorEntry]) -> None:
    """Every module has its lora_A and lora_B; in the shared-outer layout an expert's missing
    half is the layer's shared one, of the same rank."""
    sides: dict[tuple, set] = {}
    ranks: dict[tuple, int] = {}
    for (key, rank), entry in zip(keys, entries):
        target = (*key.target, key.fused, key.shared)
        if key.which in sides.setdefault(target, set()):
            raise ValidationError(f"tensor {entry.key!r} duplicates another of the same module",
                                  code="duplicate_key")
        sides[target].add(key.which)
        ranks[target] = rank
    shared = {(t[0], t[1]): ranks[t] for t in sides if t[4]}
    per_expert = {(t[0], t[1]) for t in sides if t[2] is not None}
    for target, found in sides.items():
        layer, module, expert, _fused, is_shared = target
        if is_shared:
            if (layer, module) not in per_expert:
                raise ValidationError(f"layer {layer} {module}: a shared lora_{SHARED_SIDE[module]} "
                                      "without any expert's other half", code="unpaired_key")
            continue
        if expert is not None and (layer, module) in shared:
            own = "B" if SHARED_SIDE[module] == "A" else "A"
            if found != {own}:
                raise ValidationError(
                    f"layer {layer} {module} expert {expert}: with a shared lora_{SHARED_SIDE[module]} "
                    f"each expert has only its lora_{own}", code="unpaired_key")
            if ranks[target] != shared[(layer, module)]:
                raise ValidationError(
                    f"layer {layer} {module} expert {expert} has rank {ranks[target]} but the shared "
                    f"half has rank {shared[(layer, module)]}", code="wrong_shape")
            continue
        if found != {"A", "B"}:
            raise ValidationError(f"layer {target[0]} module {target[1]} (expert {target[2]}) has lora_"
                                  f"{''.join(found)} without its lora_{'B' if 'A' in found else 'A'} twin",
                                  code="unpaired_key")


def _check_finite(path: Path, entries: list[TensorEntry]) -> list[ValueScan]:
    scans = []
    for entry in entries:
        scan = scan_values(path, entry)
        if scan.non_finite:
            raise ValidationError(f"tensor {entry.key!r} holds {scan.non_finite} NaN/Inf values; fix the training "
                                  "run (lower the learning rate, check loss scaling) and re-export",
                                  code="non_finite")
        scans.append(scan)
    return scans


def _check_scaled(config: dict, keys: list, entries: list[TensorEntry], scans: list[ValueScan]) -> None:
    """Each factor as the engine serves it (B times its module's scale) within MAX_SERVED_WEIGHT, and
    each scale too (the engine multiplies in fp32, where an all-zero B times a scale past its range is
    NaN). A shared-outer layer's one down B serves every expert at that expert's own scale
    (engine.lora.adapter, which then keeps it per expert): the largest of its experts' scales."""
    alphas = PatternTable(config.get("alpha_pattern") or {}, config["lora_alpha"])
    rslora = bool(config.get("use_rslora"))
    divisor = "sqrt(r)" if rslora else "r"
    experts: dict[tuple, list[str]] = {}  # (layer, module) -> its experts' module names
    for (key, _), entry in zip(keys, entries):
        if key.expert is not None and not key.shared:
            experts.setdefault((key.layer, key.module), []).append(pattern_module_name(entry.key, key))
    for (key, rank), entry, scan in zip(keys, entries, scans):
        scale = 1.0
        if key.which == "B":
            names = experts.get((key.layer, key.module), []) if key.shared else [pattern_module_name(entry.key, key)]
            alpha = max((abs(alphas.value(name)) for name in names), default=0.0)
            scale = lora_scale(alpha, rank, rslora)
            if scale > MAX_SERVED_WEIGHT:
                raise ValidationError(f"tensor {entry.key!r} is scaled by lora_alpha / {divisor} = {scale:.3g}, past "
                                      f"{MAX_SERVED_WEIGHT:g}, the largest value fp16 holds: check lora_alpha / "
                                      "alpha_pattern", code="weights_out_of_range")
        served = scan.max_abs * scale
        if served > MAX_SERVED_WEIGHT:
            factor = f" times lora_alpha / {divisor} = {scale:.3g}" if key.which == "B" else ""
            raise ValidationError(
                f"tensor {entry.key!r} reaches {scan.max_abs:.3g}{factor} = {served:.3g} as served, past "
                f"{MAX_SERVED_WEIGHT:g}, the largest value fp16 holds: check lora_alpha / alpha_pattern "
                "and r against the training run", code="weights_out_of_range")


def _layout(keys) -> str:
    if any(k.shared for k in keys):
        return "shared_outer"
    if any(k.fused for k in keys):
        return "fused"
    return "per_expert" if any(k.expert is not None for k in keys) else "attn_only"
