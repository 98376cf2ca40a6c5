"""Model presets and dummy model directories: real shapes, no checkpoint."""
import json

import pytest
import torch

from engine import EngineConfig, EngineError, LLMEngine, SamplingParams
from engine.models.moe_lm import MoECausalLM
from engine.models.presets import PRESETS, UnknownPresetError, get_preset
from engine.models.spec import load_spec
from engine.tiny_model import write_dummy_model

# Total and active parameters as the model cards publish them (billions).
PUBLISHED = {
    "qwen3-30b-a3b": (30.5, 3.3),
    "qwen3-235b-a22b": (235.0, 22.0),
    "mixtral-8x7b": (46.7, 12.9),
    "olmoe-1b-7b": (6.9, 1.3),
}
SHRINK = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 32,
          "moe_intermediate_size": 24, "vocab_size": 1000}


def parameter_counts(spec) -> tuple[float, float]:
    """(total, active per token) parameters of the engine's model of `spec`, in billions."""
    with torch.device("meta"):
        model = MoECausalLM(spec)
    total = experts = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if name.endswith(("mlp.w_gate_up", "mlp.w_down")):
            experts += param.numel()
    active = total - experts + experts * spec.top_k // spec.num_experts
    return total / 1e9, active / 1e9


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_a_model_of_the_published_size(name, tmp_path):
    spec = load_spec(write_dummy_model(tmp_path, get_preset(name).config_dict()))
    total, active = parameter_counts(spec)
    want_total, want_active = PUBLISHED[name]
    assert total == pytest.approx(want_total, rel=0.015)
    assert active == pytest.approx(want_active, rel=0.05)
    assert spec.family == get_preset(name).model_type


def test_unknown_preset_error_names_the_valid_ones():
    with pytest.raises(UnknownPresetError) as err:
        get_preset("qwen3-31b")
    assert all(name in str(err.value) for name in PRESETS)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_shrunk_dummy_model_generates_from_a_text_prompt(name, tmp_path):
    config = get_preset(name).config_dict()
    out = write_dummy_model(tmp_path, config, {**SHRINK, "num_experts": 5, "num_local_experts": 5, "num_experts_per_tok": 2})
    written = json.loads((out / "config.json").read_text())
    assert written["hidden_size"] == 64 and written["architectures"] == config["architectures"]
    engine = LLMEngine(EngineConfig(model=out, load_format="dummy", warmup=False))
    assert engine.spec.num_experts == 5 and engine.tokenizer is not None
    [result] = engine.generate(["Hello world"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(result["token_ids"]) == 4 and result["finish_reason"] == "length"


def test_dummy_model_ends_on_its_tokenizer_end_of_text_ids(tmp_path):
    out = write_dummy_model(tmp_path, get_preset("olmoe-1b-7b").config_dict())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    assert set(load_spec(out).eos_token_ids) == {tok.convert_tokens_to_ids("<|im_end|>"),
                                                 tok.convert_tokens_to_ids("<|endoftext|>")}
    assert load_spec(out).vocab_size > len(tok)  # ids past the tokenizer exist, as in real checkpoints


def test_dummy_model_refuses_a_vocab_smaller_than_its_tokenizer(tmp_path):
    with pytest.raises(EngineError, match="vocab_size"):
        write_dummy_model(tmp_path, get_preset("olmoe-1b-7b").config_dict(), {"vocab_size": 16})


def test_dummy_model_from_a_checkpoint_keeps_its_tokenizer(tmp_path, checkpoints):
    source = checkpoints["qwen3_moe"]
    config = json.loads((source / "config.json").read_text())
    out = write_dummy_model(tmp_path, config, {"num_hidden_layers": 1}, tokenizer_dir=source)
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert load_spec(out).num_layers == 1 and not list(out.glob("*.safetensors"))


def test_engine_benchmark_takes_its_shapes_from_the_presets():
    from benchmarks.bench_engine import QWEN3_30B_A3B

    assert QWEN3_30B_A3B is get_preset("qwen3-30b-a3b").values
