#!/usr/bin/env bash
# One runner for the lent GPU machine. Usage, from the repository root:
#   benchmarks/gpu.sh PART [PART...]        results under $OUT (default ./out), one table per part
# Parts (names are stable; each fits one 10-minute device call unless said otherwise):
#   tests      pytest -m gpu over tests/engine and tests/kernels (+ tests/deployments with Ray)
#   engine     benchmarks/bench_engine.py (ENGINE_ARGS, default "--modes fused --skip-hf": one call)
#   kernels    benchmarks/bench_moe_lora.py                    (KERNELS_ARGS adds options)
#   serve8     bench_serve.py, dummy:qwen3-30b-a3b at 8 layers, 16 adapters rank 16 on every
#              expert, 16 tenants, 64 concurrent, 256 requests of 512 -> 128 tokens, burst 500
#   serve48    the same at 48 layers (adapters 1.7 GB each: ~56 GB of disk for the store and
#              the replica's cache; SERVE48_ARGS="--adapters 8" if the call runs out of time)
#   coldstart  bench_coldstart.py: 14 GB OLMoE checkpoint, disk read rate, engine start
#              (+ Serve start when Ray is installed)
#   wheels1    Ray + FastAPI wheels, call 1 of 2: parks .whl1 outside the tree (carry [".whl1"])
#   wheels2    call 2, made AT ONCE after wheels1 (carry [".whl2"]): joins, installs into
#              /tmp/site, which the serve parts then use on the same warm machine
#   prepare-wheels   HERE, not on the GPU: download and split the wheels into .whl1/ .whl2/
#              (listed in .git/info/exclude) with ../shared/tools/gpu_ray_wheels.sh
# Per-part time limits (seconds) come from the environment: TEST_SECONDS, ENGINE_SECONDS,
# KERNELS_SECONDS, SERVE_SECONDS, COLDSTART_SECONDS. Every part returns 0; its rc is printed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD
out=${OUT:-$root/out}
site=${SITE_DIR:-/tmp/site}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
SERVE_COMMON="--model dummy:qwen3-30b-a3b --adapters 16 --rank 16 --tenants 16 --concurrency 64
  --requests 256 --prompt-tokens 512 --max-tokens 128 --sequential 16 --burst 500 --burst-tokens 8"

have_ray() {
  python3 -c "import ray, fastapi, pydantic, starlette, uvicorn, multipart" 2>/dev/null && return 0
  echo "no Ray/FastAPI here: run the parts wheels1 and wheels2 first (same warm machine)"
  return 1
}

card() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader \
    | tee "$out/card.txt"
}

part_tests() {
  local dirs="tests/engine tests/kernels"
  python3 -c "import ray, fastapi" 2>/dev/null && dirs="$dirs tests/deployments"
  timeout "${TEST_SECONDS:-500}" python3 -m pytest $dirs -m gpu -q -p no:cacheprovider -rfE \
    > "$out/gpu_tests.log" 2>&1
  echo "tests rc=$? ($dirs)"
  grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20; tail -1 "$out/gpu_tests.log"
}

part_engine() {
  timeout "${ENGINE_SECONDS:-570}" python3 benchmarks/bench_engine.py ${ENGINE_ARGS:---modes fused --skip-hf} \
    --out "$out/bench_engine.json" > "$out/bench_engine.log" 2>&1
  echo "engine rc=$?"; tail -25 "$out/bench_engine.log" | cut -c1-300
}

part_kernels() {
  timeout "${KERNELS_SECONDS:-570}" python3 benchmarks/bench_moe_lora.py ${KERNELS_ARGS:-} \
    --out "$out/bench_moe_lora.json" > "$out/bench_moe_lora.log" 2>&1
  echo "kernels rc=$?"; tail -30 "$out/bench_moe_lora.log" | cut -c1-300
}

part_serve() {  # $1 = layers, $2 = extra options
  have_ray || return 0
  local name="serve$1"
  df -h /tmp | tail -1 > "$out/$name.disk.txt"
  timeout "${SERVE_SECONDS:-580}" python3 benchmarks/bench_serve.py $SERVE_COMMON \
    --hf-overrides "{\"num_hidden_layers\": $1}" $2 --out "$out/bench_$name.json" \
    > "$out/bench_$name.log" 2>&1
  echo "$name rc=$?"
  # the lent machine runs nothing else: stopping every Ray process of this user is safe there
  ray stop --force > /dev/null 2>&1
  grep -E "Traceback|Error" "$out/bench_$name.log" | sort | uniq -c | sort -rn | head -5
  tail -9 "$out/bench_$name.log" | cut -c1-300
}

part_coldstart() {
  local serve=""
  python3 -c "import ray, fastapi" 2>/dev/null && serve="--serve"
  timeout "${COLDSTART_SECONDS:-570}" python3 benchmarks/bench_coldstart.py $serve ${COLDSTART_ARGS:-} \
    --out "$out/bench_coldstart.json" > "$out/bench_coldstart.log" 2>&1
  echo "coldstart rc=$?"
  [[ -n $serve ]] && ray stop --force > /dev/null 2>&1
  tail -12 "$out/bench_coldstart.log" | cut -c1-300
}

part_wheels() {  # $1 = 1 or 2
  local dir=".whl$1"
  if ! command -v nvidia-smi > /dev/null; then  # it writes outside the tree (/root/wheels)
    echo "wheels$1 runs on the lent GPU machine only"; return 0
  fi
  if [[ ! -f $dir/gpu_ray_wheels.sh ]]; then
    echo "$dir/ is missing: run 'benchmarks/gpu.sh prepare-wheels' here and carry [\"$dir\"]"
    return 0
  fi
  bash "$dir/gpu_ray_wheels.sh" "device$1" 2>&1 | tee "$out/wheels$1.log" | tail -15
}

if [[ $# -eq 0 ]]; then
  sed -n '2,22p' "$0"; exit 2
fi
if [[ $1 == prepare-wheels ]]; then
  exec bash "${RAY_WHEELS_TOOL:-$root/../shared/tools/gpu_ray_wheels.sh}" prepare
fi
mkdir -p "$out"
card
for part in "$@"; do
  echo "=== $part"
  case "$part" in
    tests) part_tests ;;
    engine) part_engine ;;
    kernels) part_kernels ;;
    serve8) part_serve 8 "${SERVE8_ARGS:-}" ;;
    serve48) part_serve 48 "${SERVE48_ARGS:-}" ;;
    coldstart) part_coldstart ;;
    wheels1) part_wheels 1 ;;
    wheels2) part_wheels 2 ;;
    *) echo "unknown part $part: tests engine kernels serve8 serve48 coldstart wheels1 wheels2" ;;
  esac
done
exit 0
