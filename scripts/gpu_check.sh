#!/usr/bin/env bash
# THE GPU-machine check, in one device call (run from the repo root, with .whl carried):
#   installs the wheels, regenerates the gRPC stubs, prints the GPU, runs the GPU tests (then the
#   rest of the suite if time is left) and the benchmark. Logs go to $OUT (or /tmp/orcd-out).
#   GPU_TESTS=...   pytest selection for the GPU part (default: -m gpu tests/)
#   SKIP_SUITE=1    skip the non-GPU suite;  SKIP_BENCH=1  skip the benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/orcd-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
export ORCD_KERNEL_CACHE=${ORCD_KERNEL_CACHE:-/tmp/orcd-kernels}
# ../shared does not travel to the GPU machine; a shared/ copied into the checkout does.
if [ -z "${ORCD_SHARED_DIR:-}" ] && [ -d shared/vocab ]; then export ORCD_SHARED_DIR=$PWD/shared; fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import orcd_grpc.proto" || echo "stub generation failed"
rc=0
start=$(date +%s)
echo "== GPU tests"
python3 -m pytest -q -x -m gpu ${GPU_TESTS:-tests/} -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/pytest-gpu.log" | tail -60
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
echo "== gpu_check done in $(( $(date +%s) - start ))s, rc=$rc"
exit $rc
