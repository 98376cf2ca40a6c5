#!/usr/bin/env bash
# Engine and kernel GPU tests, then the engine benchmark, on a CUDA machine.
# Usage: benchmarks/gpu_engine.sh [OUT_DIR] [PARTS...]   PARTS: tests fused loop (default: all three)
# One device call is limited to 10 minutes: run `tests fused` in one call and `loop` in the next.
# Limits per part (seconds) come from the environment: TEST_SECONDS, BENCH1_SECONDS, BENCH2_SECONDS.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out}}"
shift || true
parts="${*:-tests fused loop}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
if [[ " $parts " == *" tests "* ]]; then
    timeout "${TEST_SECONDS:-240}" python3 -m pytest tests/engine tests/kernels -m gpu -q -p no:cacheprovider \
        > "$out/gpu_tests.log" 2>&1
    grep -E "FAILED|ERROR" "$out/gpu_tests.log" | head -20; tail -1 "$out/gpu_tests.log"
fi
if [[ " $parts " == *" fused "* ]]; then  # every case with the virtual-expert kernels and CUDA graphs, a profile
    timeout "${BENCH1_SECONDS:-300}" python3 benchmarks/bench_engine.py --modes fused --skip-hf \
        --profile "$out/decode_trace.json" --out "$out/bench_fused.json" > "$out/bench_fused.log" 2>&1
    rc=$?; gzip -f "$out/decode_trace.json" 2>/dev/null; echo "bench fused rc=$rc"
    grep -E "^(a_none|b_one|c_16|d_64)|roofline|adapter load" "$out/bench_fused.log" | cut -c1-330
fi
if [[ " $parts " == *" loop "* ]]; then  # the per-adapter loop, and transformers + PEFT at 8 layers
    timeout "${BENCH2_SECONDS:-300}" python3 benchmarks/bench_engine.py --cases a_none c_16 --modes loop \
        --out "$out/bench_loop.json" > "$out/bench_loop.log" 2>&1
    echo "bench loop rc=$?"; grep -E "^(a_none|c_16)|vs transformers" "$out/bench_loop.log" | cut -c1-600
fi
