#!/usr/bin/env bash
# One runner for the lent GPU machine. Usage, from the repository root, in a device call:
#   MOEPLEX_COMMIT=<sha> bash benchmarks/gpu.sh PART [PART...]     results under $OUT (default ./out)
# MOEPLEX_COMMIT: the commit of the tree the call carries, written out by the caller as a literal
# (the GPU machine's copied .git is stale, so `git rev-parse HEAD` there names an older commit);
# append "-dirty" when the tree carries uncommitted changes. benchmarks/provenance.py records it in
# every result JSON. Without it, gpu.sh records "unknown" plus what the stale git says.
# Parts (names are stable; each fits one 10-minute device call unless said otherwise):
#   deps       Ray Serve, FastAPI, pydantic, boto3 into $SITE_DIR (/tmp/site): carry [".gpu"], made
#              here first by `bash benchmarks/gpu_deps.sh prepare`; put it before the parts that need
#              it in the same call (serve8, serve48, coldstart's Serve start)
#   tests      pytest -m gpu over tests/engine and tests/kernels (TEST_DIRS: other paths, e.g. tests/engine
#              where the kernels did not change since their last GPU run)
#   kernels    bench_moe_lora.py (KERNELS_ARGS, e.g. "--presets olmoe mixtral --adapters 16" or
#              "--paths rows split-tiles split-blocks": each LoRA path side by side)
#   router     bench_router.py: the one-launch router against torch's softmax + top-k
#   dense      bench_dense_lora.py: attention q/k/v + o LoRA by row against the split path (DENSE_ARGS,
#              e.g. "--sweep --tokens 1 64" for the row path's tile configs)
#   engine     bench_engine.py (ENGINE_ARGS, default "--modes fused": every case, the roofline, the
#              slot load and transformers + PEFT at 8 layers)
#   prefill    profile_prefill.py: where case b's prefill phase goes, per engine config (PREFILL_ARGS)
#   profile    per-kernel profile of one MoE layer (bench_moe_lora.py --profile-only KERNEL_PROFILE_ARGS, e.g.
#              "--presets qwen3-30b-a3b olmoe --tokens 1 32 512 --adapters 16 64"; JSON) and 5 decode
#              steps of case c through graphs and eagerly (bench_engine.py --profile)
#   serve8     bench_serve.py, dummy:qwen3-30b-a3b at 8 layers, 16 adapters rank 16 on every
#              expert, 16 tenants, 64 concurrent, 1024 requests of 512 -> 128 tokens, burst 500
#   serve48    the same at 48 layers (adapters 1.7 GB each: ~56 GB of disk for the store and
#              the replica's cache); a whole call: 16 adapters take ~1-3 min to make and store, so
#              it runs 512 requests (SERVE48_ARGS adds to them, e.g. "--burst 200")
#   coldstart  bench_coldstart.py: 14 GB OLMoE checkpoint, disk read rate, engine start
#              (+ Serve start when Ray is installed)
#   workload   bench_workload.py: 256 adapters of mixed ranks and targets, Zipf popularity, Poisson
#              arrivals at 0.8x the no-adapter capacity, with and without adapters; 2000 requests at
#              48 layers take two calls: WORKLOAD_ARGS="--runs none", then (its JSON copied into the
#              tree) WORKLOAD_ARGS="--runs adapters --baseline <that JSON>"
#   floods     bench_floods.py, the engine on this host's CPUs by default: one tenant's floods against the
#              app, another tenant's latency and the front processes' memory, Serve's Python
#              proxy then its HAProxy mode (the app's default where the binary is installed);
#              FLOODS_ARGS="--device cuda" puts the engine replica on the GPU
#   pinning    bench_host_pinning.py (a CUDA-graph loop beside fresh 280 MiB images: torch's pinned
#              allocator against the host arena), then bench_slot_hog.py --from-disk with the arena and
#              with --torch-pinned (the host tier's loads during the hog, on the engine alone)
#   parallel   bench_engine.py over several GPUs (needs a kind of 2+ GPUs: nvidia-h200-x2 / -x4): EP=1 vs
#              EP=2 at Qwen3-30B-A3B shapes, batch 128, 16 adapters; with 4+ GPUs also Qwen3-235B-A22B
#              shapes at tp=4, ep=4
#   ab         AB_SCRIPT (default bench_engine.py) with AB_ARGS (default "--cases a_none c_16 --modes
#              fused --skip-hf") on the commit in ab_old/ (AB_OLD_COMMIT), then on this tree: results
#              ab_old.json and ab_new.json; `git worktree add --detach ab_old <sha>` here, carry it
# Per-part time limits (seconds) come from the environment: TEST_SECONDS, KERNELS_SECONDS,
# ENGINE_SECONDS, PREFILL_SECONDS, PROFILE_SECONDS, SERVE_SECONDS, COLDSTART_SECONDS, WORKLOAD_SECONDS,
# FLOODS_SECONDS (each of the two runs), DENSE_SECONDS, AB_SECONDS (each side), PARALLEL_SECONDS (each run),
# PINNING_SECONDS (each of its two bench_slot_hog runs).
# Every part returns 0; its rc is printed. benchmarks/README.md has recipes (A/B of two commits).
set -uo pipefail
if [[ $# -eq 0 ]]; then
  sed -n '2,53p' "$0"; exit 2
fi
cd "$(dirname "$0")/.." || exit 1
root=$PWD
out=${OUT:-$root/out}
site=${SITE_DIR:-/tmp/site}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled SITE_DIR=$site
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
if [[ -z ${MOEPLEX_COMMIT:-} ]]; then
  MOEPLEX_COMMIT="unknown (no MOEPLEX_COMMIT; git here: $(git rev-parse --short HEAD 2>/dev/null))"
  echo "warning: MOEPLEX_COMMIT is not set; results record: $MOEPLEX_COMMIT" >&2
fi
export MOEPLEX_COMMIT
# 1024 requests: at 64 streams 256 of them last ~3 s, so the first wave (64 prompts at once)
# weighs on the ratio; 1024 run ~12 s per path
SERVE_COMMON="--model dummy:qwen3-30b-a3b --adapters 16 --rank 16 --tenants 16 --concurrency 64
  --requests 1024 --prompt-tokens 512 --max-tokens 128 --sequential 16 --burst 500 --burst-tokens 8"

have_ray() {
  python3 -c "import ray, fastapi, pydantic, starlette, uvicorn, multipart" 2>/dev/null && return 0
  echo "no Ray/FastAPI here: run the part deps first in the same call (carry [\".gpu\"])"
  return 1
}

card() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader \
    | tee "$out/card.txt"
  echo "$MOEPLEX_COMMIT" > "$out/commit.txt"
}

bench() {  # bench NAME SECONDS SCRIPT ARGS...: one benchmark, its log under $out, its rc printed
  local name=$1 seconds=$2; shift 2
  timeout "$seconds" python3 "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$?"
}

part_deps() {
  if [[ ! -d .gpu ]]; then
    echo ".gpu/ is missing: run 'bash benchmarks/gpu_deps.sh prepare' here and carry [\".gpu\"]"
    return 0
  fi
  bash benchmarks/gpu_deps.sh install 2>&1 | tee "$out/deps.log" | tail -5
}

part_tests() {
  # tests/deployments holds no GPU-marked test (the served path on the GPU is bench_serve's
  # greedy equality), and its modules import the openai client, which the image lacks
  local dirs="${TEST_DIRS:-tests/engine tests/kernels}"
  timeout "${TEST_SECONDS:-500}" python3 -m pytest $dirs -m gpu -q -p no:cacheprovider -rfE \
    > "$out/gpu_tests.log" 2>&1
  echo "tests rc=$? ($dirs)"
  grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20; tail -1 "$out/gpu_tests.log"
}

part_kernels() {
  bench bench_moe_lora "${KERNELS_SECONDS:-570}" benchmarks/bench_moe_lora.py ${KERNELS_ARGS:-} \
    --out "$out/bench_moe_lora.json"
  tail -30 "$out/bench_moe_lora.log" | cut -c1-300
}

part_router() {
  bench bench_router 120 benchmarks/bench_router.py --out "$out/bench_router.json"
  tail -8 "$out/bench_router.log" | cut -c1-300
}

part_dense() {
  bench bench_dense_lora "${DENSE_SECONDS:-300}" benchmarks/bench_dense_lora.py ${DENSE_ARGS:-} \
    --out "$out/bench_dense_lora.json"
  tail -22 "$out/bench_dense_lora.log" | cut -c1-300
}

part_engine() {
  bench bench_engine "${ENGINE_SECONDS:-570}" benchmarks/bench_engine.py ${ENGINE_ARGS:---modes fused} \
    --out "$out/bench_engine.json"
  grep -E "^(a_none|b_one|c_16|d_64)|roofline|adapter load|vs transformers" "$out/bench_engine.log" \
    | cut -c1-500 | tail -30
}

part_parallel() {
  # replicas over several GPUs (a kind of 2+ GPUs): Qwen3-30B-A3B, batch 128, 16 adapters, EP=1 then
  # EP=2 (decode step ratio: the target is <= 0.60); then Qwen3-235B-A22B shapes on 4 GPUs, a_none
  # and c_16 (as many layers as 4 GPUs hold: the JSON's "layers")
  local common="--cases a_none c_16 --modes fused --skip-hf"
  bench parallel_ep1 "${PARALLEL_SECONDS:-280}" benchmarks/bench_engine.py $common --requests 128 \
    --out "$out/bench_engine_ep1.json"
  bench parallel_ep2 "${PARALLEL_SECONDS:-280}" benchmarks/bench_engine.py $common --requests 128 --ep 2 \
    --out "$out/bench_engine_ep2.json"
  if [[ $(nvidia-smi -L | wc -l) -ge 4 ]]; then
    bench parallel_235b "${PARALLEL_SECONDS:-280}" benchmarks/bench_engine.py $common --preset qwen3-235b-a22b \
      --tp 4 --ep 4 --out "$out/bench_engine_235b_tp4_ep4.json"
  fi
  grep -hE "^(a_none|c_16)" "$out"/parallel_*.log | cut -c1-300
}

part_ab() {
  # the same benchmark on the commit checked out in ab_old/ (carry ["ab_old"]), then on this tree
  if [[ ! -d ab_old ]]; then
    echo "ab_old/ is missing: 'git worktree add --detach ab_old <sha>' here, carry [\"ab_old\"]"
    return 0
  fi
  local script=${AB_SCRIPT:-benchmarks/bench_engine.py} args=${AB_ARGS:---cases a_none c_16 --modes fused --skip-hf}
  (cd ab_old && MOEPLEX_COMMIT=${AB_OLD_COMMIT:-unknown} PYTHONPATH="$site:$PWD" \
    timeout "${AB_SECONDS:-240}" python3 "$script" $args --out "$out/ab_old.json" > "$out/ab_old.log" 2>&1
   echo "ab old rc=$?")
  timeout "${AB_SECONDS:-240}" python3 "$script" $args --out "$out/ab_new.json" > "$out/ab_new.log" 2>&1
  echo "ab new rc=$?"
  for side in old new; do echo "-- $side"; tail -"${AB_TAIL:-12}" "$out/ab_$side.log" | cut -c1-300; done
}

part_workload() {
  bench bench_workload "${WORKLOAD_SECONDS:-570}" benchmarks/bench_workload.py ${WORKLOAD_ARGS:-} \
    --out "$out/bench_workload.json"
  tail -6 "$out/bench_workload.log" | cut -c1-300
}

part_floods() {
  RAY_SERVE_ENABLE_HA_PROXY=0 bench bench_floods "${FLOODS_SECONDS:-280}" benchmarks/bench_floods.py \
    ${FLOODS_ARGS:-} --out "$out/bench_floods.json"
  RAY_SERVE_ENABLE_HA_PROXY=1 bench bench_floods_haproxy "${FLOODS_SECONDS:-280}" \
    benchmarks/bench_floods.py ${FLOODS_ARGS:-} --out "$out/bench_floods_haproxy.json"
  grep -A9 "victim unloaded" "$out/bench_floods.log" "$out/bench_floods_haproxy.log" | cut -c1-300
}

part_pinning() {
  bench host_pinning 120 benchmarks/bench_host_pinning.py --out "$out/host_pinning.json"
  bench slot_hog_arena "${PINNING_SECONDS:-190}" benchmarks/bench_slot_hog.py --from-disk \
    --out "$out/slot_hog_from_disk_arena.json"
  bench slot_hog_torch_pinned "${PINNING_SECONDS:-190}" benchmarks/bench_slot_hog.py --from-disk --torch-pinned \
    --out "$out/slot_hog_from_disk_torch_pinned.json"
  grep -E "^(alone|hog|torch_pinned|arena)" "$out"/host_pinning.log "$out"/slot_hog_*.log | cut -c1-400
}

part_prefill() {
  bench profile_prefill "${PREFILL_SECONDS:-500}" benchmarks/profile_prefill.py ${PREFILL_ARGS:-} \
    --out "$out/prefill"
  grep -E "^(async|sync|graphs)" "$out/profile_prefill.log" | cut -c1-300
}

part_profile() {
  bench kernel_profile 180 benchmarks/bench_moe_lora.py --profile-only \
    ${KERNEL_PROFILE_ARGS:---presets qwen3-30b-a3b --tokens 1 64 512 2048} --out "$out/kernel_profile.json"
  tail -20 "$out/kernel_profile.log" | cut -c1-200
  bench engine_profile "${PROFILE_SECONDS:-420}" benchmarks/bench_engine.py --cases c_16 \
    --modes fused fused_eager --skip-hf --profile "$out/decode_trace.json" --out "$out/bench_profile.json"
  gzip -f "$out"/decode_trace*.json 2>/dev/null
  grep -E "^c_16" "$out/engine_profile.log" | cut -c1-400
}

part_serve() {  # $1 = layers, $2 = extra options
  have_ray || return 0
  local name="serve$1"
  df -h /tmp | tail -1 > "$out/$name.disk.txt"
  bench "bench_$name" "${SERVE_SECONDS:-580}" benchmarks/bench_serve.py $SERVE_COMMON \
    --hf-overrides "{\"num_hidden_layers\": $1}" $2 --out "$out/bench_$name.json"
  # the lent machine runs nothing else: stopping every Ray process of this user is safe there
  ray stop --force > /dev/null 2>&1
  grep -E "Traceback|Error" "$out/bench_$name.log" | sort | uniq -c | sort -rn | head -5
  tail -9 "$out/bench_$name.log" | cut -c1-300
}

part_coldstart() {
  local serve=""
  python3 -c "import ray, fastapi" 2>/dev/null && serve="--serve"
  bench bench_coldstart "${COLDSTART_SECONDS:-570}" benchmarks/bench_coldstart.py $serve \
    ${COLDSTART_ARGS:-} --out "$out/bench_coldstart.json"
  [[ -n $serve ]] && ray stop --force > /dev/null 2>&1
  tail -12 "$out/bench_coldstart.log" | cut -c1-300
}

mkdir -p "$out"
card
for part in "$@"; do
  echo "=== $part"
  case "$part" in
    deps) part_deps ;;
    tests) part_tests ;;
    kernels) part_kernels ;;
    router) part_router ;;
    dense) part_dense ;;
    engine) part_engine ;;
    prefill) part_prefill ;;
    profile) part_profile ;;
    serve8) part_serve 8 "${SERVE8_ARGS:-}" ;;
    serve48) part_serve 48 "--requests 512 ${SERVE48_ARGS:-}" ;;
    coldstart) part_coldstart ;;
    workload) part_workload ;;
    ab) part_ab ;;
    floods) part_floods ;;
    pinning) part_pinning ;;
    parallel) part_parallel ;;
    *) echo "unknown part $part: deps tests kernels router dense engine prefill profile serve8 serve48 coldstart workload floods pinning ab parallel" ;;
  esac
done
exit 0
