#!/usr/bin/env bash
# Session 3 device calls (2026-11-28). Usage: benchmarks/gpu_session3.sh OUT PARTS...
#   ab      engine a_none + c_16 (fused, graphs) for this tree and for the tree in ab_old/ (an older
#           commit exported with `git archive`, carried), same machine, back to back
#   tests   every gpu-marked test
#   router  benchmarks/bench_router.py
#   kab     kernel benchmark, qwen3 n = 16, MOEPLEX_EXPAND=tiles vs blocks
#   final   bench_engine.py: every case with the fused kernels, a profile, and transformers + PEFT
#   loopbd  bench_engine.py: cases b and d with the per-adapter loop (LOOPBD_MODES="fused loop" adds the
#           fused kernels in the same run, for a side-by-side ratio)
source "$(dirname "$0")/gpu_preamble.sh"
shift
for part in "$@"; do
  case "$part" in
    ab)
      for tree in . ab_old; do
        tag=$([[ $tree == . ]] && echo new || echo old)
        (cd "$tree" && PYTHONPATH=$PWD MOEPLEX_EXPAND=${AB_EXPAND:-tiles} timeout "${AB_SECONDS:-110}" python3 benchmarks/bench_engine.py \
          --cases a_none c_16 --modes fused --skip-hf --out "$out/ab_$tag.json" > "$out/ab_$tag.log" 2>&1)
        echo "ab $tag rc=$?"; grep -E "^(a_none|c_16) " "$out/ab_$tag.log" | cut -c1-260
      done ;;
    tests)
      PYTHONPATH=$PWD timeout "${TEST_SECONDS:-240}" python3 -m pytest tests/engine tests/kernels -m gpu -q -p no:cacheprovider -rfE \
        > "$out/gpu_tests.log" 2>&1
      echo "tests rc=$?"; grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20; tail -1 "$out/gpu_tests.log" ;;
    router)
      PYTHONPATH=$PWD timeout 60 python3 benchmarks/bench_router.py --out "$out/router.json" > "$out/router.log" 2>&1
      echo "router rc=$?"; tail -8 "$out/router.log" ;;
    kab)
      for path in tiles blocks; do
        PYTHONPATH=$PWD MOEPLEX_EXPAND=$path timeout "${KAB_SECONDS:-120}" python3 benchmarks/bench_moe_lora.py \
          --presets qwen3-30b-a3b --adapters 16 --out "$out/kab_$path.json" > "$out/kab_$path.log" 2>&1
        echo "kab $path rc=$?"; tail -14 "$out/kab_$path.log" | cut -c1-200
      done ;;
    final)
      PYTHONPATH=$PWD timeout "${FINAL_SECONDS:-400}" python3 benchmarks/bench_engine.py --modes fused \
        --profile "$out/decode_trace.json" --out "$out/final.json" > "$out/final.log" 2>&1
      echo "final rc=$?"; gzip -f "$out/decode_trace.json" 2>/dev/null
      grep -E "^(a_none|b_one|c_16|d_64)|roofline|adapter load|vs transformers" "$out/final.log" | cut -c1-400 ;;
    loopbd)
      PYTHONPATH=$PWD timeout "${LOOPBD_SECONDS:-540}" python3 benchmarks/bench_engine.py --cases b_one d_64_over_16 \
        --modes ${LOOPBD_MODES:-loop} --skip-hf --out "$out/loopbd.json" > "$out/loopbd.log" 2>&1
      echo "loopbd rc=$?"; grep -E "^(b_one|d_64)" "$out/loopbd.log" | cut -c1-300 ;;
  esac
done
