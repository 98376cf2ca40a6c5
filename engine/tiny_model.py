"""Tiny random MoE checkpoints, and dummy-weight model directories, made on the spot.

`make_tiny_checkpoint` writes what a user's checkpoint directory holds: config.json,
sharded safetensors weights in the per-expert key layout, generation_config.json and
tokenizer files with a ChatML chat template, all through transformers' own classes (the
embedded default model and the tests' fixtures). `write_dummy_model` writes config.json and
tokenizer files only, for random weights at any shape (load_format="dummy").

    python -m engine.tiny_model OUT_DIR --family qwen3_moe
    python -m engine.tiny_model OUT_DIR --family mixtral --adapter ADAPTER_DIR --format fused
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from engine.errors import InvalidRequestError

FAMILIES = ("qwen3_moe", "mixtral", "olmoe")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML; with tools, a system block that lists their functions (as Qwen's templates do, shorter:
# the tiny model's context is short), and an assistant's earlier calls as Hermes-style
# <tool_call> blocks (deployments/tool_calls.py)
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}{% for tool in tools %}{{ tool['function'] | tojson }}{{ '\n' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}{{ '}</tool_call>' }}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    # Qwen3's switch: enable_thinking=false opens the reply with an empty thinking block
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route each token "
    "to a few experts. Tenants upload LoRA adapters; replicas serve them in one batch. "
    "Hello world! How are you today? 0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \" ? ! "
    "def main(): return 42  # comments\nimport torch\nclass Foo:\n    pass\n"
)

# Small but not degenerate: experts not a power of two, GQA, 2*I != D.
_BASE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
    initializer_range=0.1, tie_word_embeddings=False,
)
_FAMILY_DEFAULTS = {
    "qwen3_moe": dict(num_experts=6, moe_intermediate_size=24, intermediate_size=48,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=6, intermediate_size=24),
    "olmoe": dict(num_experts=6, intermediate_size=24, norm_topk_prob=False),
}


def make_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on a small corpus and save it as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def tiny_config(family: str, vocab_size: int, eos_ids: list[int], pad_id: int, **overrides):
    """A transformers config of `family` at test size, with `overrides` applied."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    values = {**_BASE, **_FAMILY_DEFAULTS[family], **overrides}
    values.setdefault("vocab_size", vocab_size)
    return AutoConfig.for_model(
        family, eos_token_id=eos_ids[0], pad_token_id=pad_id, bos_token_id=None, **values
    )


def make_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "qwen3_moe",
    seed: int = 0,
    max_shard_size: str = "100KB",
    router_scale: float = 1.0,
    bf16_exact: bool = False,
    **overrides,
) -> Path:
    """Write a random-weight HF checkpoint of `family` into `out_dir` and return it.

    Weights are float32, saved sharded (several safetensors files and an index) in the
    per-expert layout transformers writes. `overrides` change any config value
    (num_experts, num_experts_per_tok, norm_topk_prob, tie_word_embeddings, ...).
    `router_scale` multiplies the routers' weights: a large one widens the margins between
    expert scores, so that bf16 rounding does not flip top-k choices (bf16 parity tests);
    `bf16_exact` rounds every weight to a bf16 value (still stored as float32), so that an
    fp32 oracle and a bf16 engine compute with the same weights.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    eos_ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    vocab = -(-len(tok) // 8) * 8  # padded like real checkpoints: ids past the tokenizer exist
    config = tiny_config(family, vocab, eos_ids, pad_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):  # Qwen3-MoE may have dense-MLP layers
                layer.mlp.gate.weight.mul_(router_scale)
        if bf16_exact:
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).float())
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    return out


def read_config(checkpoint_dir: str | Path) -> dict:
    return json.loads((Path(checkpoint_dir) / "config.json").read_text())


# What a checkpoint directory holds besides its weights and config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "generation_config.json")


def write_dummy_model(out_dir: str | Path, config: dict, overrides: dict | None = None,
                      tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json and tokenizer files (no weights) for serving with random weights.

    `config` is a config.json dict (model_type, architectures and sizes); `overrides` replace
    its values (vLLM's hf_overrides). The tokenizer is copied from `tokenizer_dir` when that
    holds one, else it is the tiny checkpoints' tokenizer, whose end-of-text ids become the
    config's; a vocab_size larger than the tokenizer is fine (those ids exist, as in real
    checkpoints). Raises InvalidRequestError (or EngineError) when the result cannot be served.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = dict(config)
    source = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if source is not None and (source / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        num_tokens = len(AutoTokenizer.from_pretrained(str(out)))
    else:
        tok = make_tokenizer(out)
        end_ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        values.update(eos_token_id=end_ids, pad_token_id=end_ids[1], bos_token_id=None)
        num_tokens = len(tok)
    values.update(overrides or {})
    (out / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    _check_servable(out, num_tokens)
    return out


def _check_servable(model_dir: Path, num_tokens: int) -> None:
    from engine.models.spec import load_spec

    spec = load_spec(model_dir)  # raises on an unsupported family or inconsistent sizes
    if spec.vocab_size < num_tokens:
        raise InvalidRequestError(f"vocab_size={spec.vocab_size} is smaller than the tokenizer's "
                                  f"{num_tokens} tokens; raise vocab_size (hf_overrides)")


def main(argv: list[str] | None = None) -> int:
    from engine.testing.adapters import FORMATS, make_peft_adapter  # demo and test tools only

    parser = argparse.ArgumentParser(prog="moeplex-tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the checkpoint into")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3_moe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", help="also write a LoRA adapter into this directory")
    parser.add_argument("--format", choices=FORMATS, default="per_expert", help="adapter key format")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    ckpt = make_tiny_checkpoint(args.out_dir, args.family, seed=args.seed)
    print(f"checkpoint: {ckpt}")
    if args.adapter:
        adapter = make_peft_adapter(ckpt, args.adapter, rank=args.rank, fmt=args.format, seed=args.seed)
        print(f"adapter: {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
