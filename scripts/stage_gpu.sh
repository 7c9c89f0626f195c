#!/usr/bin/env bash
# On the GPU machine: runs stage files written by bench/stage_check.py on the CUDA backend (a whole
# model too large for one call's 64 MiB transfer, see that file).
#   scripts/stage_gpu.sh DIR [DIR ...]   each DIR holds plan.json and stage-K.gguf (or .gguf.xz,
#                                        since one call's transfer is the limit) -> $OUT/NAME-out-K.npz
# Carry the wheels (WHEELS, default .dev/whl-min: pycuda and its dependencies, gguf), .dev/carry
# (scripts/device_env.sh) and the DIRs; then, here, `bench/stage_check.py build DIR K+1 NAME-out-K.npz`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/orcd-out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-.dev/whl-min}
. scripts/device_env.sh
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
