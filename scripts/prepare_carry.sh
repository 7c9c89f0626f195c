#!/usr/bin/env bash
# What a scripts/gpu_check.sh call carries to the GPU machine, made here from a fresh checkout (all
# of it is git-ignored, so every new machine needs it once):   bash scripts/prepare_carry.sh [PART ...]
#   wheels   .whl: ../shared/device-wheels (PyCUDA, gguf, grpcio tools) plus llguidance, jsonschema and
#            its dependencies for CPython 3.12 (the constrained-output GPU tests import them)
#   kcache   .dev/carry/kcache.tar.xz: this tree's cuda/ compiled for sm_90 (redo after any cuda/ change;
#            a stale cubin is never used there, it only costs the first load's compile)
#   vocab    .dev/carry/bv.tar.xz: the shared vocabularies (bench/synth_gguf.py writes the anchor files from them)
#   tiny     .dev/carry/tiny.tar.xz: the tiny architecture models (tests/gpu/test_cuda_architectures.py;
#            needs transformers here: pip install -e '.[reference]')
#   anchors  .dev/anchors/llamacpp-src.tgz: llama.cpp's source for BUILD_LLAMA (scripts/build_llama.sh, run
#            apart because it takes most of an hour here, makes .dev/llama/llama-bin.tar.xz: the built tools,
#            41 MiB. The 64 MiB counts the checkout's own files too (about 3 MB), so a call that carries it
#            takes ".whl .dev/carry .dev/llama" with tiny.tar.xz moved out of .dev/carry (the last line below
#            prints that sum), and carries the tiny models in another call)
#   tools    .dev/tools/py-spy: the sampling profiler SERVE_PROFILE=1 runs the worker under (carry ".dev/tools")
# No PART: all of them. Then: run(carry=[".whl", ".dev/carry", ".dev/anchors", ".dev/tools"]) under the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${ORCD_SHARED_DIR:-../shared}
parts=${*:-wheels kcache vocab tiny anchors tools}
mkdir -p .whl .dev/carry .dev/anchors
for part in $parts; do
  case $part in
    wheels)
      cp "$shared"/device-wheels/*.whl .whl/
      # llguidance is published for manylinux_2_31 (abi3); rpds-py (jsonschema's) per CPython version
      python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "llguidance>=1.9.1,<2" "jsonschema>=4.20" 2>&1 | grep -v "^WARNING" || true ;;
    kcache)
      rm -rf .dev/kcache
      python3 -m orcd_grpc.backends.cuda_runtime .dev/kcache sm_90 > /dev/null
      (cd .dev && tar cJf carry/kcache.tar.xz kcache) ;;
    vocab)
      rm -rf .dev/bv && mkdir -p .dev/bv && cp -r "$shared/vocab" .dev/bv/
      (cd .dev && tar cJf carry/bv.tar.xz bv) && rm -rf .dev/bv ;;
    tiny)
      mkdir -p .dev/tiny
      python3 tests/gpu/test_cuda_architectures.py .dev/tiny > /dev/null
      (cd .dev && tar cJf carry/tiny.tar.xz tiny) ;;
    anchors)
      cp "$shared/anchors/llamacpp-src.tgz" .dev/anchors/ ;;
    tools)
      rm -rf .dev/tools /tmp/orcd-pyspy && mkdir -p .dev/tools /tmp/orcd-pyspy
      python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/orcd-pyspy "py-spy>=0.4,<0.5" 2>&1 | grep -v "^WARNING" || true
      python3 -m zipfile -e /tmp/orcd-pyspy/py_spy-*.whl /tmp/orcd-pyspy/x
      install -m 755 "$(find /tmp/orcd-pyspy/x -name py-spy -type f | head -1)" .dev/tools/py-spy ;;
    *) echo "unknown part $part (wheels kcache vocab tiny anchors tools)" >&2; exit 2 ;;
  esac
done
du -ch .whl .dev/carry .dev/anchors .dev/tools 2>/dev/null | tail -1
# what a call carrying llama.cpp sends: the tracked files and .whl, .dev/carry, .dev/llama
if [ -d .dev/llama ]; then
  echo "with .dev/llama: $(( ($(git ls-files -z | xargs -0 cat | wc -c) + $(du -sb .whl .dev/carry .dev/llama | awk '{s += $1} END {print s}')) >> 20 )) MiB of 64"
fi
