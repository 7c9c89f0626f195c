#!/usr/bin/env bash
# Cuts the real model files (SmolLM2-135M, Gemma 3 270M: 335 MiB) into pieces that fit the device
# tool's 64 MiB carry limit beside the wheels, for several back-to-back calls on one warm machine
# (it keeps /tmp between calls). Run here, once:   bash scripts/stage_models.sh
# Then: a first call carries .whl (and runs the kernel tests); call i carries .dev/s<i> alone
# (61 MiB + the tree) and starts with: mkdir -p /tmp/stage && cp .dev/s<i>/* /tmp/stage/
# Last call, before the tests:                     bash scripts/stage_models.sh --assemble /tmp/stage /tmp/models
# and run scripts/gpu_check.sh with ORCD_MODEL_DIR=/tmp/models (model_store checks the sha256s).
set -euo pipefail
cd "$(dirname "$0")/.."
names=(smollm2-135m-instruct gemma-3-270m)
if [ "${1:-}" = "--assemble" ]; then
  src=$2 dst=$3; mkdir -p "$dst"
  cat "$src"/c* > "$dst/all.bin"
  n=$(cat "$src/sizes" | head -1)
  head -c "$n" "$dst/all.bin" > "$dst/${names[0]}.gguf"
  tail -c +$((n + 1)) "$dst/all.bin" > "$dst/${names[1]}.gguf"
  rm "$dst/all.bin"; ls -l "$dst"; exit 0
fi
dir=${ORCD_MODEL_DIR:-$HOME/.cache/orcd/models}
python3 -m orcd_grpc models pull "${names[0]}" >/dev/null && python3 -m orcd_grpc models pull "${names[1]}" >/dev/null
rm -rf .dev/s[0-9]; mkdir -p .dev
cat "$dir/${names[0]}.gguf" "$dir/${names[1]}.gguf" | split -b 61M -d -a 1 - .dev/piece.
i=0; for f in .dev/piece.*; do mkdir -p ".dev/s$i"; mv "$f" ".dev/s$i/c$i"; i=$((i + 1)); done
stat -c %s "$dir/${names[0]}.gguf" > .dev/s0/sizes
du -sm .dev/s[0-9]
