"""model=dummy:<preset>, load_format=dummy and hf_overrides, through AppArgs and ensure_model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_store.errors import ValidationError
from deployments.args import TINY_MODEL_NAME, AppArgs
from deployments.model_files import ModelFilesError, ensure_model
from engine import LLMEngine, SamplingParams
from engine.models.presets import PRESETS
from engine.testing import make_peft_adapter

TINY_OLMOE = {"hidden_size": 64, "num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2,
              "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4}


def dummy_args(tmp_path, **kwargs) -> AppArgs:
    values = dict(model="dummy:olmoe-1b-7b", hf_overrides=json.dumps(TINY_OLMOE), device="cpu",
                  engine_warmup=False, cache_dir=str(tmp_path))
    return AppArgs(**{**values, **kwargs})


def test_shrunk_dummy_preset_serves_text_through_the_engine(tmp_path):
    args = dummy_args(tmp_path)
    model_dir = ensure_model(args)
    config = args.engine_config(model_dir)
    assert config.load_format == "dummy" and not list(model_dir.glob("*.safetensors"))
    engine = LLMEngine(config)
    [result] = engine.generate(["Hello world"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(result["token_ids"]) == 5 and result["error"] is None


def test_hf_overrides_reach_the_config_with_the_family_right(tmp_path):
    model_dir = ensure_model(dummy_args(tmp_path))
    config = json.loads((model_dir / "config.json").read_text())
    assert {k: config[k] for k in TINY_OLMOE} == TINY_OLMOE
    assert config["model_type"] == "olmoe" and config["architectures"] == ["OlmoeForCausalLM"]
    assert config["vocab_size"] == PRESETS["olmoe-1b-7b"].values["vocab_size"]  # not overridden
    assert (model_dir / "tokenizer.json").is_file()


def test_other_overrides_get_a_directory_of_their_own(tmp_path):
    first = ensure_model(dummy_args(tmp_path))
    assert ensure_model(dummy_args(tmp_path)) == first
    other = ensure_model(dummy_args(tmp_path, hf_overrides={**TINY_OLMOE, "num_hidden_layers": 1}))
    assert other != first and json.loads((other / "config.json").read_text())["num_hidden_layers"] == 1


def test_unknown_preset_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError) as err:
        AppArgs(model="dummy:llama-70b")
    assert "llama-70b" in str(err.value) and all(name in str(err.value) for name in PRESETS)


def test_served_name_of_a_preset_is_the_preset_unless_set():
    assert AppArgs(model="dummy:qwen3-30b-a3b").model_name() == "qwen3-30b-a3b"
    assert AppArgs(model="dummy:qwen3-30b-a3b", served_model_name="big").model_name() == "big"
    assert AppArgs(model="/ckpts/Mixtral/config.json", load_format="dummy").model_name() == "Mixtral"
    assert AppArgs().model_name() == TINY_MODEL_NAME


def test_hf_overrides_need_dummy_weights_and_dummy_needs_a_local_config():
    with pytest.raises(ValueError, match="dummy weights only"):
        AppArgs(model="/ckpts/qwen", hf_overrides={"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="config.json"):
        AppArgs(model="s3://bucket/qwen", load_format="dummy")
    with pytest.raises(ValueError):
        AppArgs(hf_overrides="{not json")


def test_load_format_dummy_takes_a_config_json_path(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("mixtral")
    args = AppArgs(model=str(source / "config.json"), load_format="dummy", cache_dir=str(tmp_path),
                   hf_overrides={"num_hidden_layers": 1}, device="cpu", engine_warmup=False)
    model_dir = ensure_model(args)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_hidden_layers"] == 1
    assert (model_dir / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    engine = LLMEngine(args.engine_config(model_dir))
    assert engine.spec.num_layers == 1


def test_an_override_the_engine_cannot_serve_fails_at_materialise(tmp_path):
    with pytest.raises(ModelFilesError, match="vocab_size"):
        ensure_model(dummy_args(tmp_path, hf_overrides={**TINY_OLMOE, "vocab_size": 8}))
    with pytest.raises(ModelFilesError, match="num_experts_per_tok"):
        ensure_model(dummy_args(tmp_path, hf_overrides={**TINY_OLMOE, "num_experts_per_tok": 9}))


def test_uploads_are_validated_against_the_dummy_config(tmp_path, tiny_checkpoint):
    args = dummy_args(tmp_path, max_lora_rank=8)
    model_dir = ensure_model(args)
    fitting = make_peft_adapter(model_dir, tmp_path / "fits", rank=8, fmt="per_expert")
    store = args.open_store()
    info = store.put("acme", "fits", fitting, model_dir, limits=args.store_limits(model_dir))
    assert info.name == "fits"
    other_base = make_peft_adapter(tiny_checkpoint("olmoe"), tmp_path / "other", rank=8, fmt="per_expert")
    with pytest.raises(ValidationError):
        store.put("acme", "other", other_base, model_dir, limits=args.store_limits(model_dir))


def test_the_embedded_default_still_has_real_weights_and_no_test_imports(tmp_path):
    script = (
        "import sys; from deployments.args import AppArgs; from deployments.model_files import ensure_model\n"
        f"args = AppArgs(cache_dir={str(tmp_path)!r})\n"
        "d = ensure_model(args)\n"
        "assert args.engine_config(d).load_format == 'auto' and list(d.glob('*.safetensors'))\n"
        "ensure_model(AppArgs(cache_dir=args.cache_dir, model='dummy:qwen3-30b-a3b'))\n"
        "assert not [m for m in sys.modules if m.startswith('engine.testing')], 'engine.testing imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[2])
