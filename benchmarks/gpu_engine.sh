#!/usr/bin/env bash
# Engine and kernel GPU tests, then the engine benchmark, in one call on a CUDA machine.
# Usage: benchmarks/gpu_engine.sh [OUT_DIR]   (needs torch, triton, transformers, peft, pytest)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
timeout "${TEST_SECONDS:-200}" python3 -m pytest tests/engine tests/kernels -m gpu -q -p no:cacheprovider \
    > "$out/gpu_tests.log" 2>&1
tail -4 "$out/gpu_tests.log"
# The virtual-expert path with CUDA graphs over every case first, with a decode profile.
timeout "${BENCH1_SECONDS:-200}" python3 benchmarks/bench_engine.py --modes fused --skip-hf \
    --profile "$out/decode_trace.json" --out "$out/bench_fused.json" > "$out/bench_fused.log" 2>&1
grep -E "^(a_none|b_one|c_16|d_64)" "$out/bench_fused.log"; tail -30 "$out/bench_fused.log" | grep -E "roofline|adapter load|Self CUDA" 
# Then eager and per-adapter-loop modes on the 16-adapter case, and transformers + PEFT.
timeout "${BENCH2_SECONDS:-170}" python3 benchmarks/bench_engine.py --cases a_none c_16 --modes fused_eager loop \
    --out "$out/bench_modes.json" > "$out/bench_modes.log" 2>&1
grep -E "^(a_none|c_16)|vs transformers" "$out/bench_modes.log"
