"""Random PEFT LoRA adapters at real model size, fast: bf16, one buffer, one write per file.

A rank-16 adapter on q/k/v/o and every expert's gate/up/down of Qwen3-30B-A3B is 1.7 GB in
bf16 (37k tensors). `engine.testing.make_peft_adapter` builds such a file tensor by tensor in
fp32 on the CPU (3.3 GB, minutes); here the values are drawn in one `torch.randn` on the
GPU when there is one, and the safetensors file is written directly: header, then the one
buffer. Without a GPU a big adapter reuses one random buffer and redraws only its first
values from the adapter's seed, so files (and their outputs) still differ per adapter.

Key layout: the per-expert one of transformers 4.x checkpoints (DESIGN.md, adapter formats).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from adapter_store.formats import ATTENTION_MODULES, ModelShape

_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "olmoe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
# Past this many values a CPU run reuses one random buffer instead of drawing each adapter.
_CPU_REDRAW_LIMIT = 1 << 26
_REDRAWN_PER_ADAPTER = 1 << 20


def adapter_layout(config: dict, rank: int) -> list[tuple[str, tuple[int, int], float]]:
    """(tensor key, shape, init scale) of every tensor, in file order."""
    shape = ModelShape.from_config(config)
    block, names = _EXPERT_NAMES[shape.family]
    modules = []
    for layer in range(shape.num_layers):
        prefix = f"base_model.model.model.layers.{layer}."
        modules += [(prefix + f"self_attn.{m}", shape.io_features(m)) for m in ATTENTION_MODULES]
        modules += [(prefix + f"{block}.experts.{e}.{name}", shape.io_features(canon))
                    for e in range(shape.num_experts) for canon, name in names.items()]
    layout = []
    for path, (in_f, out_f) in modules:
        layout.append((path + ".lora_A.weight", (rank, in_f), in_f ** -0.5))
        layout.append((path + ".lora_B.weight", (out_f, rank), 0.02))
    return layout


def adapter_bytes(config: dict, rank: int) -> int:
    """Size of the safetensors data of one adapter (bf16), header not counted."""
    return 2 * sum(r * c for _, (r, c), _ in adapter_layout(config, rank))


class RandomAdapterWriter:
    """Writes adapters of one layout with distinct seeds: `write(out_dir, seed) -> out_dir`."""

    def __init__(self, config: dict, rank: int, alpha: float = 32.0, device: str | None = None):
        self.layout = adapter_layout(config, rank)
        self.total = sum(r * c for _, (r, c), _ in self.layout)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.header = _header(self.layout)
        shape = ModelShape.from_config(config)
        targets = list(ATTENTION_MODULES) + list(_EXPERT_NAMES[shape.family][1].values())
        self.adapter_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "use_rslora": False, "target_modules": targets, "target_parameters": None,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "base_model_name_or_path": config.get("_name_or_path", ""), "inference_mode": True}
        self._shared: torch.Tensor | None = None

    def write(self, out_dir: str | Path, seed: int) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        values = self._values(seed)
        with open(out / "adapter_model.safetensors", "wb") as f:
            f.write(self.header)
            f.write(values.view(torch.int16).numpy())  # the buffer itself, no copy
        (out / "adapter_config.json").write_text(json.dumps(self.adapter_config, indent=2))
        return out

    def _values(self, seed: int) -> torch.Tensor:
        """[total] bf16 on the CPU: N(0, 1) scaled per tensor (A: 1/sqrt(fan_in), B: 0.02)."""
        gen = torch.Generator(self.device).manual_seed(seed)
        if self.device == "cpu" and self.total > _CPU_REDRAW_LIMIT:
            if self._shared is None:
                self._shared = self._scaled(torch.randn(self.total, generator=gen))
            values = self._shared.clone()
            head = torch.randn(_REDRAWN_PER_ADAPTER, generator=gen)
            values[:_REDRAWN_PER_ADAPTER] = self._scaled(head, limit=_REDRAWN_PER_ADAPTER)
            return values
        raw = torch.randn(self.total, generator=gen, device=self.device)
        return self._scaled(raw).cpu()

    def _scaled(self, raw: torch.Tensor, limit: int | None = None) -> torch.Tensor:
        out = torch.empty(raw.numel(), dtype=torch.bfloat16, device=raw.device)
        begin = 0
        for _, (r, c), scale in self.layout:
            end = min(begin + r * c, raw.numel())
            out[begin:end] = raw[begin:end] * scale
            begin = end
            if limit is not None and begin >= limit:
                break
        return out


def _header(layout) -> bytes:
    """safetensors header: 8-byte length, then JSON padded with spaces to 8-byte alignment."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (r, c), _ in layout:
        size = 2 * r * c
        meta[key] = {"dtype": "BF16", "shape": [r, c], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
