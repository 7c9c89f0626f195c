#!/usr/bin/env bash
# On the GPU machine: runs stage files written by bench/stage_check.py on the CUDA backend (a whole
# model too large for one call's 64 MiB transfer, see that file).
#   scripts/stage_gpu.sh DIR [DIR ...]   each DIR holds plan.json and stage-K.gguf (or .gguf.xz,
#                                        since one call's transfer is the limit) -> $OUT/NAME-out-K.npz
# Carry the wheels (WHEELS, default .dev/whl-min: pycuda and its dependencies, gguf), the kernel
# cache (.dev/kcache, or .dev/kcache.tar.xz: `python3 -m orcd_grpc.backends.cuda_runtime DIR sm_90`)
# and the DIRs; then, here, `bench/stage_check.py build DIR K+1 NAME-out-K.npz`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/orcd-out}; mkdir -p "$OUT"
[ -f /tmp/site/.orcd-installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  "${WHEELS:-.dev/whl-min}"/*.whl 2>&1 | tail -2; touch /tmp/site/.orcd-installed; }
export PYTHONPATH=/tmp/site:$PWD ORCD_KERNEL_CACHE=${ORCD_KERNEL_CACHE:-/tmp/orcd-kernels} PYTHONUNBUFFERED=1
mkdir -p "$ORCD_KERNEL_CACHE"
[ -d .dev/kcache ] && cp -n .dev/kcache/*.cubin "$ORCD_KERNEL_CACHE"/ 2>/dev/null
[ -f .dev/kcache.tar.xz ] && tar xJf .dev/kcache.tar.xz -C "$ORCD_KERNEL_CACHE" --strip-components=1
rc=0
for dir in "$@"; do
  name=$(basename "$dir")
  for z in "$dir"/stage-*.gguf.xz; do [ -f "$z" ] && { xz -dc "$z" > "/tmp/$name-$(basename "$z" .xz)" || rc=1; }; done
  for stage in "$dir"/stage-*.gguf "/tmp/$name"-stage-*.gguf; do
    [ -f "$stage" ] || continue
    k=$(basename "$stage" .gguf); k=${k##*stage-}
    python3 bench/stage_check.py run "$stage" "$dir/plan.json" "$OUT/$name-out-$k.npz" --backend cuda || rc=1
  done
done
exit $rc
