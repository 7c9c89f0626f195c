#!/usr/bin/env bash
# Compile-checks every cuda/*.cu for sm_90 with the options the runtime loader uses (no GPU needed;
# CI runs this). Prints each kernel's registers / spills; fails on any error or on a stack frame
# (local memory) in a kernel, which is almost always an accidental dynamically indexed array.
set -uo pipefail
cd "$(dirname "$0")/.."
arch=${ARCH:-sm_90}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
for f in cuda/*.cu; do
  log="$tmp/$(basename "$f").log"
  if nvcc -arch="$arch" -std=c++17 -O3 --use_fast_math -Icuda -cubin -o "$tmp/$(basename "$f" .cu).cubin" \
       --resource-usage "$f" >"$log" 2>&1; then
    spills=$(grep -E "bytes stack frame" "$log" | grep -vc "^ *0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
    echo "ok    $f  ($(grep -c 'Compiling entry' "$log") kernels, $spills with stack/spills)"
    if grep -qi "warning" "$log"; then grep -i warning "$log" | head -5; fi
  else
    echo "FAIL  $f"; cat "$log"; fail=1
  fi
done
# the other settings of the compile-time switches (orcd_grpc/tuning.py, compile_time fields; the .cu
# files' own defaults are the plain builds above) compile too
for v in "quant_matmul -DORCD_GEMM_PIPE=0" "attention_decode -DORCD_ATTN_Q8_DP4A=1" \
         "attention_decode -DORCD_FUSE_ATTN_Q8=1" "attention_mma -DORCD_FUSE_ATTN_Q8=1" \
         "mma_i8 -DORCD_GEMM_I8_UNROLL=1"; do
  set -- $v
  if nvcc -arch="$arch" -std=c++17 -O3 --use_fast_math -Icuda -cubin -o "$tmp/variant.cubin" "$2" "cuda/$1.cu" >"$tmp/v.log" 2>&1; then
    echo "ok    cuda/$1.cu $2"
  else
    echo "FAIL  cuda/$1.cu $2"; cat "$tmp/v.log"; fail=1
  fi
done
exit $fail
