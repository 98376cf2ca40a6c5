"""Every refusal happens before anything is stored, on both backends, with a typed error."""
import pickle

import pytest
import torch

from adapter_store import StoreLimits
from adapter_store.errors import InvalidNameError, LimitExceededError, ValidationError
from tests.adapter_store.helpers import (
    CONFIG, WEIGHTS, copy_adapter, edit_config, edit_tensors, first_key, stored_keys,
)


class _Boom:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _refused(store, src, base_model, code, limits=StoreLimits(), error=ValidationError):
    with pytest.raises(error) as caught:
        store.put("acme", "ad", src, base_model, limits=limits)
    assert caught.value.code == code, str(caught.value)
    assert stored_keys(store) == []
    return str(caught.value)


def test_pickle_refused_unread(store, adapter, base_model, tmp_path):
    src = copy_adapter(adapter, tmp_path / "a")
    marker = tmp_path / "unpickled"
    (src / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    message = _refused(store, src, base_model, "pickle_refused")
    assert "adapter_model.bin" in message and "safetensors" in message
    assert not marker.exists()


@pytest.mark.parametrize("tenant,name", [
    ("acme", "../escape"), ("acme", "a/b"), ("acme", ".."), ("acme", "a\x00b"), ("acme", "bad\nname"),
    ("acme", ""), ("acme", "x" * 65), ("../root", "ad"), ("", "ad"), ("acme", "ad@1"), ("acme", "sp ace"),
])
def test_unsafe_names_refused(store, adapter, base_model, tenant, name):
    with pytest.raises(InvalidNameError):
        store.put(tenant, name, adapter, base_model)
    assert stored_keys(store) == []


@pytest.mark.parametrize("dtype,value", [
    (torch.float32, float("nan")), (torch.float32, float("inf")),
    (torch.float16, float("-inf")), (torch.bfloat16, float("nan")), (torch.bfloat16, float("inf")),
])
def test_non_finite_refused(store, adapter, base_model, tmp_path, dtype, value):
    src = copy_adapter(adapter, tmp_path / "a")
    key = first_key(src, "experts.3.down_proj.lora_B")

    def poison(tensors):
        for k in tensors:
            tensors[k] = tensors[k].to(dtype)
        tensors[key][5, 1] = value

    edit_tensors(src, poison)
    assert key in _refused(store, src, base_model, "non_finite")


@pytest.mark.parametrize("changes,side", [
    ({"lora_alpha": 1e30}, "lora_B"),  # finite, yet B x alpha / r is far past fp16's range
    ({"alpha_pattern": {"q_proj": 1e9}}, "q_proj.lora_B"),
    ({"lora_alpha": 3e5, "use_rslora": True}, "lora_B"),  # alpha / sqrt(r): 1.5e5 a unit of B
])
def test_scale_that_overflows_the_served_weights_refused(store, adapter, base_model, tmp_path, changes, side):
    """The engine folds lora_alpha / r into B: a finite config can still make served weights
    overflow, and then the adapter's requests write Inf and NaN into the KV cache."""
    src = edit_tensors(copy_adapter(adapter, tmp_path / "a"),  # every B value 0.5 or less
                       lambda t: t.update({k: v.clamp(-0.5, 0.5) for k, v in t.items()}))
    message = _refused(store, edit_config(src, **changes), base_model, "weights_out_of_range")
    assert side in message and "lora_alpha" in message and "65504" in message


def test_a_scale_past_fp16s_range_refused_even_over_an_all_zero_b(store, adapter, base_model, tmp_path):
    """The engine multiplies in fp32, where 0 times a scale past its range is NaN (and an untrained
    expert's B is all zeros, as PEFT initialises it)."""
    src = edit_tensors(copy_adapter(adapter, tmp_path / "a"),
                       lambda t: t.update({k: v * 0 if "lora_B" in k else v for k, v in t.items()}))
    assert "65504" in _refused(store, edit_config(src, lora_alpha=1e300), base_model, "weights_out_of_range")


def test_shared_outer_b_is_checked_at_each_experts_own_scale(store, base_model, tiny_adapter, tmp_path):
    """An alpha_pattern naming the experts scales the one shared down B per expert (the engine keeps
    it per expert then): the check takes the largest of them, not the shared tensor's own name."""
    src = copy_adapter(tiny_adapter("qwen3_moe", "shared_outer", rank=4), tmp_path / "a")
    edit_config(src, alpha_pattern={r"experts\.\d+\.down_proj": 1e9})
    assert "experts.down_proj.lora_B" in _refused(store, src, base_model, "weights_out_of_range")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_adapters_over_a_base_their_initialisation_changed_refused(store, adapter, base_model, tmp_path, init):
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), init_lora_weights=init)
    assert "path_initial_model_for_weight_conversion" in _refused(store, src, base_model, "unsupported_option")


def test_a_factor_past_fp16s_range_refused_and_a_large_scale_of_small_weights_accepted(
        store, adapter, base_model, tmp_path):
    src = copy_adapter(adapter, tmp_path / "a")
    key = first_key(src, "self_attn.v_proj.lora_A")
    edit_tensors(src, lambda t: t[key].__setitem__((1, 2), 1e6))
    assert key in _refused(store, src, base_model, "weights_out_of_range")
    src = edit_tensors(copy_adapter(adapter, tmp_path / "b"),
                       lambda t: t.update({k: v.clamp(-0.5, 0.5) for k, v in t.items()}))
    assert store.put("acme", "ad", edit_config(src, lora_alpha=1e4), base_model).manifest["rank"] == 4


@pytest.mark.parametrize("changes", [
    {"layer_replication": [[0, 1], [0, 1]]}, {"alora_invocation_tokens": [5, 6]}, {"use_qalora": True},
    {"kasa_config": {"r": 4}}, {"arrow_config": {"top_k": 2}},
])
def test_options_that_change_what_lora_computes_refused(store, adapter, base_model, tmp_path, changes):
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), **changes)
    assert next(iter(changes)) in _refused(store, src, base_model, "unsupported_option")


@pytest.mark.parametrize("changes,left_out", [
    ({"layers_to_transform": [0]}, "layers.1."),  # PEFT adapts layer 0 alone: layer 1's tensors are not its
    ({"layers_to_transform": 1}, "layers.0."),
    ({"exclude_modules": ["q_proj"]}, "q_proj"),
    ({"exclude_modules": ".*experts.*"}, "experts"),
])
def test_tensors_of_modules_the_config_leaves_out_refused(store, adapter, base_model, tmp_path, changes, left_out):
    """PEFT makes no LoRA module there, so it would not load those tensors: served, they would
    make another model than the one trained."""
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), **changes)
    message = _refused(store, src, base_model, "untargeted_key")
    assert left_out in message and "exclude_modules" in message


def test_layers_and_exclusions_that_cover_every_tensor_accepted(store, adapter, base_model, tmp_path):
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), layers_to_transform=[0, 1], exclude_modules=["lm_head"])
    assert store.put("acme", "ad", src, base_model).manifest["rank"] == 4


@pytest.mark.parametrize("options,targets", [
    # PEFT matches target_parameters by suffix alone: fused experts of every layer are saved
    ({"target_modules": ["q_proj"], "layers_to_transform": [0],
      "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}, ["down", "gate_up", "q_proj"]),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": []}, ["q_proj", "v_proj"]),  # [] is every layer
    # a whole path is taken as named, whatever layers_to_transform says
    ({"target_modules": ["model.layers.1.self_attn.q_proj", "k_proj"], "layers_to_transform": [0]}, ["k_proj", "q_proj"]),
], ids=["fused_experts_ignore_layers", "empty_layers_list", "whole_path_target"])
def test_what_peft_saves_with_these_options_is_accepted(store, base_model, tmp_path, options, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **options)).save_pretrained(str(tmp_path / "a"))
    assert store.put("acme", "ad", tmp_path / "a", base_model).manifest["targets"] == targets


def test_peft_adapter_of_some_layers_less_excluded_modules_accepted(store, base_model, tmp_path):
    """What PEFT itself saves with layers_to_transform and exclude_modules is stored as is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        layers_to_transform=[1], layers_pattern="layers", exclude_modules=["k_proj"])
    get_peft_model(model, config).save_pretrained(str(tmp_path / "a"))
    info = store.put("acme", "ad", tmp_path / "a", base_model)
    assert info.manifest["targets"] == ["o_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("dense", [{"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}])
def test_expert_tensors_on_a_dense_mlp_layer_refused(store, adapter, base_model, tmp_path, dense):
    """Qwen3-MoE layers with a dense MLP have no experts: the engine refused such an adapter at every
    load, each request a 422; the upload is where to say so."""
    import json
    import shutil
    base = shutil.copytree(base_model, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **dense}))
    assert "layer 0, which has a dense MLP" in _refused(store, adapter, base, "unknown_key")
    # an adapter the CLI validated against the base without dense layers is not this base's
    from adapter_store.validate import load_base_model
    assert load_base_model(base)[1]["fingerprint"] != load_base_model(base_model)[1]["fingerprint"]


def test_bf16_adapter_accepted(store, adapter, base_model, tmp_path):
    src = edit_tensors(copy_adapter(adapter, tmp_path / "a"),
                       lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert store.put("acme", "ad", src, base_model).manifest["dtypes"] == ["BF16"]


def test_wrong_shape_refused(store, adapter, base_model, tmp_path):
    src = copy_adapter(adapter, tmp_path / "a")
    key = first_key(src, "self_attn.q_proj.lora_A")
    edit_tensors(src, lambda t: t.update({key: torch.zeros(4, 31)}))
    message = _refused(store, src, base_model, "wrong_shape")
    assert "[4, 31]" in message and "[4, 32]" in message


def test_config_rank_disagreeing_with_tensors_refused(store, adapter, base_model, tmp_path):
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), r=8)
    _refused(store, src, base_model, "wrong_shape")


@pytest.mark.parametrize("key", [
    "base_model.model.lm_head.lora_A.weight",
    "base_model.model.model.layers.0.mlp.gate.lora_A.weight",  # the router
    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",  # no such layer
])
def test_unknown_key_refused(store, adapter, base_model, tmp_path, key):
    src = edit_tensors(copy_adapter(adapter, tmp_path / "a"), lambda t: t.update({key: torch.zeros(4, 32)}))
    assert key in _refused(store, src, base_model, "unknown_key")


def test_unpaired_and_untargeted_refused(store, adapter, base_model, tmp_path):
    src = copy_adapter(adapter, tmp_path / "a")
    key = first_key(src, "experts.2.up_proj.lora_B")
    edit_tensors(src, lambda t: t.pop(key))
    _refused(store, src, base_model, "unpaired_key")
    src = edit_config(copy_adapter(adapter, tmp_path / "b"), target_modules=["q_proj", "k_proj"])
    _refused(store, src, base_model, "untargeted_key")


def test_rank_over_limit_refused(store, adapter, base_model):
    message = _refused(store, adapter, base_model, "rank_too_high", StoreLimits(max_rank=2), LimitExceededError)
    assert "rank 4" in message and "r <= 2" in message


def test_oversize_refused(store, adapter, base_model):
    _refused(store, adapter, base_model, "too_large", StoreLimits(max_adapter_bytes=10_000), LimitExceededError)


@pytest.mark.parametrize("breakage,code", [
    ("no_config", "missing_config"), ("not_lora", "not_lora"), ("dora", "unsupported_option"),
    ("truncated", "bad_safetensors"), ("int_tensor", "bad_dtype"), ("no_weights", "missing_weights"),
])
def test_broken_adapter_refused(store, adapter, base_model, tmp_path, breakage, code):
    src = copy_adapter(adapter, tmp_path / "a")
    if breakage == "no_config":
        (src / CONFIG).unlink()
    elif breakage == "not_lora":
        edit_config(src, peft_type="IA3")
    elif breakage == "dora":
        edit_config(src, use_dora=True)
    elif breakage == "truncated":
        data = (src / WEIGHTS).read_bytes()
        (src / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif breakage == "int_tensor":
        key = first_key(src, "lora_A")
        edit_tensors(src, lambda t: t.update({key: t[key].to(torch.int32)}))
    else:
        (src / WEIGHTS).unlink()
    _refused(store, src, base_model, code)


def test_adapter_count_limit(store, adapter, base_model):
    limits = StoreLimits(max_adapters_per_tenant=1)
    store.put("acme", "one", adapter, base_model, limits=limits)
    store.put("acme", "one", adapter, base_model, limits=limits)  # a new version is not a new adapter
    with pytest.raises(LimitExceededError) as caught:
        store.put("acme", "two", adapter, base_model, limits=limits)
    assert caught.value.code == "too_many_adapters" and "delete" in str(caught.value)
    store.put("other", "two", adapter, base_model, limits=limits)  # limits are per tenant


@pytest.mark.parametrize("family,fmt,options", [
    ("qwen3_moe", "per_expert", {"rank_pattern": {"experts.1.up_proj": 2, "q_proj": 3}}),
    ("qwen3_moe", "fused", {"rank_pattern": {"k_proj": 2, "gate_up_proj": 3}}),
    ("mixtral", "per_expert", {}),
    ("olmoe", "fused", {"attention": False}),
    ("qwen3_moe", "shared_outer", {"rank_pattern": {"q_proj": 3}}),
    ("mixtral", "shared_outer", {"attention": False}),
])
def test_valid_formats_accepted(tmp_path, tiny_checkpoint, tiny_adapter, family, fmt, options):
    from adapter_store.local import LocalStore

    src = tiny_adapter(family, fmt, rank=4, **options)
    info = LocalStore(tmp_path).put("acme", "ad", src, tiny_checkpoint(family))
    assert info.manifest["layout"] == fmt and info.manifest["rank"] == 4
    assert info.manifest["base_model"]["model_type"] == family
    if options.get("rank_pattern"):  # the pattern is what makes those shapes right
        with pytest.raises(ValidationError, match="rank"):
            LocalStore(tmp_path).put("acme", "ad2", edit_config(copy_adapter(src, tmp_path / "x"),
                                                                rank_pattern={}), tiny_checkpoint(family))


def test_adapter_for_another_base_model_refused(store, tiny_adapter, tiny_checkpoint):
    _refused(store, tiny_adapter("mixtral", "per_expert", rank=4), tiny_checkpoint("qwen3_moe"), "unknown_key")


@pytest.mark.parametrize("changes", [
    {"target_modules": "(unclosed"},  # a regex (PEFT's string form) that does not compile
    {"rank_pattern": {"q_proj[": 4}},
    {"target_modules": [3, "q_proj"]},
    {"target_modules": {"q_proj": 1}},
    {"target_parameters": "gate_up_proj"},
    {"lora_alpha": "sixteen"},
    {"lora_alpha": float("nan")},  # json.loads takes the NaN literal
    {"lora_alpha": float("inf")},
    {"lora_alpha": None},
    {"alpha_pattern": {"q_proj": float("nan")}},
    {"alpha_pattern": ["q_proj"]},
    {"rank_pattern": {"q" * 300: 4}},  # over MAX_PATTERN_CHARS
    {"layers_to_transform": ["0"]},
    {"exclude_modules": {"q_proj": 1}},
])
def test_malformed_config_refused(store, adapter, base_model, tmp_path, changes):
    """A hostile adapter_config.json gets a typed refusal, never a crash or a stored adapter."""
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), **changes)
    message = _refused(store, src, base_model, "bad_config")
    assert CONFIG in message and next(iter(changes)) in message


@pytest.mark.parametrize("changes,code", [
    ({"target_modules": "(.*.*)*z"}, "untargeted_key"),  # nested quantifiers: `re` backtracks for hours
    ({"rank_pattern": {"(.*.*)*z": 2}}, None),  # matches nothing: the adapter is fine
])
def test_backtracking_patterns_answer_promptly(store, adapter, base_model, tmp_path, changes, code):
    """Patterns are matched by an engine that does not backtrack exponentially (with a time
    limit as backstop), so a hostile pattern cannot tie up the thread that validates it."""
    import threading

    src = edit_config(copy_adapter(adapter, tmp_path / "a"), **changes)
    outcome = []

    def put():
        try:
            outcome.append(store.put("acme", "ad", src, base_model))
        except ValidationError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=put, daemon=True)
    worker.start()
    worker.join(60)
    assert outcome, "validation did not finish: catastrophic backtracking"
    assert (getattr(outcome[0], "code", None) == code) if code else not isinstance(outcome[0], Exception)


def test_pattern_over_its_time_limit_is_a_config_error(store, adapter, base_model, tmp_path, monkeypatch):
    import regex

    def too_slow(*args, **kwargs):
        raise TimeoutError("regex timed out")

    monkeypatch.setattr(regex, "fullmatch", too_slow)
    src = edit_config(copy_adapter(adapter, tmp_path / "a"), rank_pattern={"q_proj": 2})
    assert "too long to match" in _refused(store, src, base_model, "bad_config")


@pytest.mark.parametrize("entry", [
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},  # unhashable dtype
    {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]},
    ["F32", [1], [0, 4]],
])
def test_malformed_header_entry_refused(store, adapter, base_model, tmp_path, entry):
    import json
    import struct

    src = copy_adapter(adapter, tmp_path / "a")
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": entry}).encode()
    (src / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    _refused(store, src, base_model, "bad_safetensors")
