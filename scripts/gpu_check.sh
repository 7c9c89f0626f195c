#!/usr/bin/env bash
# THE GPU-machine check, in one device call (run from the repo root, with .whl carried):
#   installs the wheels, regenerates the gRPC stubs, prints the GPU, runs the GPU tests (then the
#   rest of the suite if time is left) and the benchmark. Logs go to $OUT (or /tmp/orcd-out).
#   GPU_TESTS=...   pytest selection for the GPU part (default: -m gpu tests/)
#   SKIP_SUITE=1    skip the non-GPU suite;  SKIP_BENCH=1  skip the benchmark
#   BENCH_MODELS="qwen2.5-0.5b ..."  the synthetic anchor files to benchmark (default: all four)
#   PROFILE_MODEL=FILE.gguf  also print where a decode step's time goes (bench/profile_decode.py);
#                   AB="VAR=VALUE ..." repeats it under each tuning switch (README, GPU notes)
#   Real models (SmolLM2, Gemma 3) are used when $ORCD_MODEL_DIR holds them (no network there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/orcd-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The wheels install once per machine (a warm machine keeps /tmp between calls).
[ -f /tmp/site/.orcd-installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  .whl/*.whl 2>&1 | tail -2; touch /tmp/site/.orcd-installed; }
export PYTHONPATH=/tmp/site:$PWD
export ORCD_KERNEL_CACHE=${ORCD_KERNEL_CACHE:-/tmp/orcd-kernels}
# Cubins compiled beforehand without a GPU (python3 -m orcd_grpc.backends.cuda_runtime .dev/kcache)
# save the first load's nvcc time; a stale one is never used (the key covers sources and nvcc).
if [ -d .dev/kcache ]; then mkdir -p "$ORCD_KERNEL_CACHE" && cp -n .dev/kcache/*.cubin "$ORCD_KERNEL_CACHE"/ 2>/dev/null; fi
# ../shared does not travel to the GPU machine; a shared/ copied into the checkout does.
if [ -z "${ORCD_SHARED_DIR:-}" ] && [ -d shared/vocab ]; then export ORCD_SHARED_DIR=$PWD/shared; fi
# Tiny architecture models exported where transformers is installed (tests/gpu/test_cuda_architectures.py).
if [ -z "${ORCD_TINY_GGUF_DIR:-}" ] && [ -d .dev/tiny ]; then export ORCD_TINY_GGUF_DIR=$PWD/.dev/tiny; fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import orcd_grpc.proto" || echo "stub generation failed"
rc=0
start=$(date +%s)
echo "== GPU tests"
timeout ${GPU_TEST_TIMEOUT:-480} python3 -m pytest -q -m gpu ${GPU_TESTS:-tests/} -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/pytest-gpu.log" | tail -60
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
if [ -z "${SKIP_SUITE:-}" ]; then
  echo "== rest of the suite"
  timeout 240 python3 -m pytest -q -m "not gpu" tests/ -p no:cacheprovider 2>&1 | tee "$OUT/pytest-rest.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== benchmark"
  if [ -f bench/run_all.sh ]; then timeout 300 bash bench/run_all.sh ${BENCH_MODELS:-} 2>&1 | tee "$OUT/bench.md"
  elif [ -f bench/bench_decode.py ]; then timeout 300 python3 bench/bench_decode.py 2>&1 | tee "$OUT/bench.md"
  else echo "no benchmark under bench/"; fi
fi
if [ -n "${PROFILE_MODEL:-}" ]; then
  echo "== decode profile ($PROFILE_MODEL)"
  # AB="ORCD_FUSE_QKV_ROPE=0 ORCD_GEMM_PIPE=64": the profile again under each switch (graph_replay_gpu
  # is the GPU time per step to compare)
  for ab in default ${AB:-}; do
    for b in ${PROFILE_BATCHES:-1 64}; do
      echo "$ab $(env $([ "$ab" = default ] || echo "$ab") timeout 120 python3 bench/profile_decode.py "$PROFILE_MODEL" \
        --batch "$b" 2>&1 | tail -1 | cut -c1-400)" | tee -a "$OUT/profile.txt"
    done
  done
fi
echo "== gpu_check done in $(( $(date +%s) - start ))s, rc=$rc"
exit $rc
