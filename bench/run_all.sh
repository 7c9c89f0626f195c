#!/usr/bin/env bash
# Writes the synthetic anchor files (once) and benchmarks the engine on each, in the shape of
# shared/bench/ANCHORS.md. Run on the GPU machine (scripts/gpu_check.sh calls it).
#   bench/run_all.sh [MODEL ...]      MODEL in qwen2.5-0.5b phi3-mini phi3-mini-q4_0 gpt-oss-20b
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${ORCD_SHARED_DIR:-$here/../../shared}
data=${ORCD_BENCH_DIR:-/tmp/orcd-bench}
out=${OUT:-/tmp}
mkdir -p "$data"
models=("$@"); [ ${#models[@]} -gt 0 ] || models=(qwen2.5-0.5b phi3-mini phi3-mini-q4_0 gpt-oss-20b)
echo "| model | prefill pp512 tok/s | decode tg128 tok/s | B=1 | B=8 | B=32 | B=64 | TTFT 512 ms | KV MiB/seq@4096 |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
# All missing files at once (the GPU machine has 16 cores; gpt-oss alone takes about a minute).
for m in "${models[@]}"; do
  f="$data/$m.gguf"
  [ -s "$f" ] || (python3 "$here/synth_gguf.py" "$m" "$f.tmp" "$shared/vocab" >/dev/null && mv "$f.tmp" "$f") &
done
wait
for m in "${models[@]}"; do
  f="$data/$m.gguf"
  [ -s "$f" ] || { echo "| $m | synth failed |"; continue; }
  python3 "$here/bench_engine.py" "$f" --backend "${ORCD_BENCH_BACKEND:-cuda}" --json "$out/bench.jsonl" 2>"$out/bench-$m.err" | tail -1 \
    || { echo "| $m | failed: $(tail -1 "$out/bench-$m.err") |"; }
done
# The same single stream end to end through the gRPC server (GRPC_MODELS, default qwen2.5-0.5b).
for m in ${GRPC_MODELS-qwen2.5-0.5b}; do
  f="$data/$m.gguf"
  [ -s "$f" ] || continue
  python3 "$here/bench_grpc.py" "$f" --backend "${ORCD_BENCH_BACKEND:-cuda}" --json "$out/bench.jsonl" \
    2>"$out/bench-grpc-$m.err" || echo "grpc $m failed: $(tail -1 "$out/bench-grpc-$m.err")"
done
