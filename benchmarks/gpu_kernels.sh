#!/usr/bin/env bash
# Kernel GPU tests (bf16, real shapes) then the MoE-LoRA benchmark sweep, on one CUDA machine.
# Usage: benchmarks/gpu_kernels.sh [OUT_DIR]   (needs torch, triton, pytest in python3)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest tests/kernels -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -5
python3 benchmarks/bench_moe_lora.py --sweep-base --out "$out/sweep.json" > "$out/sweep.log" 2>&1
python3 benchmarks/bench_moe_lora.py --out "$out/bench.json" 2>&1 | tee "$out/bench.log" | grep -A100 "copy bandwidth"
