#!/usr/bin/env bash
# Where the time goes: per-kernel profiles of the MoE layer and of engine decode steps, the
# engine's GPU tests, the churn case and the transformers + PEFT baseline, in one GPU call.
# Usage: benchmarks/gpu_profile.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
timeout "${T_KPROF:-120}" python3 benchmarks/bench_moe_lora.py --profile-only --tokens 1 64 512 2048 \
    > "$out/kernel_profile.log" 2>&1; echo "kernel profile rc=$?"
timeout "${T_EPROF:-300}" python3 benchmarks/bench_engine.py --cases a_none c_16 d_64_over_16 --modes fused --skip-hf \
    --profile "$out/decode_trace.json" --out "$out/bench_profile.json" > "$out/engine_profile.log" 2>&1
echo "engine profile rc=$?"; grep -E "^(a_none|c_16|d_64)" "$out/engine_profile.log" | cut -c1-400
timeout "${T_TESTS:-200}" python3 -m pytest tests/engine -m gpu -q -p no:cacheprovider -x > "$out/gpu_tests.log" 2>&1
echo "engine gpu tests rc=$?"; tail -3 "$out/gpu_tests.log"
