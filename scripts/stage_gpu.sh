#!/usr/bin/env bash
# On the GPU machine, one device call per stage: runs stage files written by bench/stage_check.py
# on the CUDA backend (a whole model too large for one call's transfer, see that file).
#   scripts/stage_gpu.sh PLAN.json STAGE-K.gguf [STAGE-J.gguf ...]   -> $OUT/out-K.npz ...
# Carry the wheels (WHEELS, default .dev/whl-min: pycuda and its dependencies, gguf), .dev/kcache
# (cubins from `python3 -m orcd_grpc.backends.cuda_runtime .dev/kcache sm_90`) and a folder with
# the plan and the stage file(s); then, here, `bench/stage_check.py build DIR K+1 out-K.npz`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/orcd-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.dev/whl-min}"/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD ORCD_KERNEL_CACHE=${ORCD_KERNEL_CACHE:-/tmp/orcd-kernels} PYTHONUNBUFFERED=1
mkdir -p "$ORCD_KERNEL_CACHE" && cp -n .dev/kcache/*.cubin "$ORCD_KERNEL_CACHE"/ 2>/dev/null
plan=$1; shift
rc=0
for stage in "$@"; do
  k=$(basename "$stage" .gguf); k=${k#stage-}
  python3 bench/stage_check.py run "$stage" "$plan" "$OUT/out-$k.npz" --backend cuda || rc=1
done
exit $rc
