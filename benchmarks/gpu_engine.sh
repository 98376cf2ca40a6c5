#!/usr/bin/env bash
# Engine and kernel GPU tests, then the engine benchmark, in one call on a CUDA machine.
# Usage: benchmarks/gpu_engine.sh [OUT_DIR]   (needs torch, triton, transformers, peft, pytest)
# Limits per step (seconds) come from the environment: TEST_SECONDS, BENCH1_SECONDS, BENCH2_SECONDS.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
timeout "${TEST_SECONDS:-240}" python3 -m pytest tests/engine tests/kernels -m gpu -q -p no:cacheprovider \
    > "$out/gpu_tests.log" 2>&1
grep -E "FAILED|ERROR" "$out/gpu_tests.log" | head -20; tail -1 "$out/gpu_tests.log"
# Every case through the virtual-expert kernels with CUDA graphs, then a decode profile.
timeout "${BENCH1_SECONDS:-300}" python3 benchmarks/bench_engine.py --modes fused --skip-hf \
    --profile "$out/decode_trace.json" --out "$out/bench_fused.json" > "$out/bench_fused.log" 2>&1
rc=$?; gzip -f "$out/decode_trace.json" 2>/dev/null; echo "bench fused rc=$rc"; grep -E "^(a_none|b_one|c_16|d_64)" "$out/bench_fused.log" | cut -c1-330
# The per-adapter loop on the 16-adapter case, and transformers + PEFT at 8 layers.
timeout "${BENCH2_SECONDS:-200}" python3 benchmarks/bench_engine.py --cases a_none c_16 --modes loop \
    --out "$out/bench_loop.json" > "$out/bench_loop.log" 2>&1
echo "bench loop rc=$?"; grep -E "^(a_none|c_16)|vs transformers" "$out/bench_loop.log" | cut -c1-600
