#!/usr/bin/env bash
# Session 4 device calls (2026-11-28). Usage: benchmarks/gpu_session4.sh OUT PARTS...
#   enginetests  the engine's gpu-marked tests (the kernels did not change since they last passed)
#   final        bench_engine.py: every case with async scheduling ("fused") and without it
#                ("fused_sync") in the same run, a profile of 5 decode steps, transformers + PEFT;
#                FINAL_MODES="fused fused_sync fused_eager_ahead" adds eager steps launched ahead
#   prefill      benchmarks/profile_prefill.py (the prefill phase of case b, per async policy, and
#                with the Triton prefill attention)
#   prefilltests the Triton prefill attention's and the prefill graphs' GPU tests (run before
#                turning either on by default)
#   prefillgraphs bench_engine.py with prefill graphs, and with them set aside, same run
#   kernels      bench_moe_lora.py for the olmoe and mixtral presets at n = 16
source "$(dirname "$0")/gpu_preamble.sh"
shift
for part in "$@"; do
  case "$part" in
    enginetests)
      PYTHONPATH=$PWD timeout "${TEST_SECONDS:-300}" python3 -m pytest tests/engine -m gpu -q -p no:cacheprovider -rfE \
        > "$out/gpu_engine_tests.log" 2>&1
      echo "enginetests rc=$?"; grep -E "^(FAILED|ERROR)" "$out/gpu_engine_tests.log" | head -20; tail -1 "$out/gpu_engine_tests.log" ;;
    final)
      PYTHONPATH=$PWD timeout "${FINAL_SECONDS:-560}" python3 benchmarks/bench_engine.py --modes ${FINAL_MODES:-fused fused_sync} \
        --profile "$out/decode_trace.json" --out "$out/final.json" > "$out/final.log" 2>&1
      echo "final rc=$?"; gzip -f "$out/decode_trace.json" 2>/dev/null
      grep -E "^(a_none|b_one|c_16|d_64)|roofline|adapter load|vs transformers" "$out/final.log" | cut -c1-500 ;;
    prefill)
      PYTHONPATH=$PWD timeout "${PREFILL_SECONDS:-300}" python3 -m benchmarks.profile_prefill --out "$out" \
        > "$out/prefill.log" 2>&1
      echo "prefill rc=$?"; grep -E "^(async|sync)" "$out/prefill.log" | cut -c1-300 ;;
    prefillgraphs)
      PYTHONPATH=$PWD timeout "${PG_SECONDS:-500}" python3 benchmarks/bench_engine.py --prefill-graphs \
        --triton-prefill-attention --modes fused fused_eager_prefill --skip-hf --out "$out/prefill_graphs.json" \
        > "$out/prefill_graphs.log" 2>&1
      echo "prefillgraphs rc=$?"; grep -E "^(a_none|b_one|c_16|d_64)" "$out/prefill_graphs.log" | cut -c1-400 ;;
    prefilltests)
      PYTHONPATH=$PWD timeout 200 python3 -m pytest tests/kernels/test_prefill_attention.py \
        tests/engine/test_prefill_graphs.py -m gpu -q -p no:cacheprovider \
        > "$out/prefill_tests.log" 2>&1
      echo "prefilltests rc=$?"; tail -3 "$out/prefill_tests.log" ;;
    kernels)
      PYTHONPATH=$PWD timeout "${KERNEL_SECONDS:-300}" python3 benchmarks/bench_moe_lora.py --presets olmoe mixtral \
        --adapters 16 --out "$out/kernels.json" > "$out/kernels.log" 2>&1
      echo "kernels rc=$?"; tail -30 "$out/kernels.log" | cut -c1-200 ;;
  esac
done
