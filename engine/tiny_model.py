"""Write a tiny random MoE checkpoint (and optionally a LoRA adapter) for demos and tests.

    python -m engine.tiny_model OUT_DIR --family qwen3_moe
    python -m engine.tiny_model OUT_DIR --family mixtral --adapter ADAPTER_DIR --format fused
"""
from __future__ import annotations

import argparse
import sys

from engine.testing import FAMILIES, FORMATS, make_peft_adapter, make_tiny_checkpoint


def main(argv: list[str] | None = None) -> int:
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
