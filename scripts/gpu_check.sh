#!/usr/bin/env bash
# THE GPU-machine check, in one device call (run from the repo root, with .whl carried):
#   installs the wheels, regenerates the gRPC stubs, prints the GPU, runs the GPU tests (then the
#   rest of the suite if time is left) and the benchmark. Logs go to $OUT (or /tmp/orcd-out).
#   GPU_TESTS=...   pytest selection for the GPU part (default: -m gpu tests/gpu); GPU_K: its -k expression
#   SKIP_SUITE=1    skip the non-GPU suite;  SKIP_BENCH=1  skip the benchmark
#   BENCH_MODELS="qwen2.5-0.5b ..."  the synthetic anchor files to benchmark (default: all four);
#                   with SKIP_BENCH=1 they are still written (for a later call on the warm machine)
#   BASE_TREE=DIR   the benchmark is an A/B instead: bench/bench_engine.py on each file for the tree
#                   in DIR (an export of the commit to compare with) and for this one, alternating,
#                   with BENCH_ARGS (default "--batches 8,64"; "A;B": under each option set in turn); rows go to $OUT/ab.md
#   FIRST_TESTS="FILES" FIRST_K="EXPR"  a pytest selection run first; the stages wait on it (FIRST_TIMEOUT: its
#                   cap in seconds, default 200; cut off there it does not stop the stages, a failure does)
#   STAGE_DIRS="DIR ..."  first run the staged whole-model check of each DIR (scripts/stage_gpu.sh)
#   PROFILE_MODELS="qwen2.5-0.5b:1,64 phi3-mini:p512 ..."  where a decode step's time goes
#                   (bench/profile_decode.py) at those batch sizes (pN: a prefill of N, trace_decode.py only;
#                   BmN: a step of B decoding sequences and a new N-token prompt, always trace_decode.py); PREFILL_MODELS="phi3-mini ..." prefill tok/s alone;
#                   AB="VAR=VALUE A=1,B=2 --kv-cache-type=q8_0 A=1,--ctx=64 ..." repeats the profiles under each
#                   (comma-separated parts starting with -- are script options); PROFILE_ARGS="--ctx 1024": options for every profile,
#                   PREFILL_AB the prefill runs (README, GPU notes); PROFILE_SCRIPT=bench/trace_decode.py
#                   gives each kernel's time inside the graph instead (PROFILE_CUT: characters kept in
#                   $OUT/profile.txt, default 2000; the console shows 300)
#   NCU="MODEL:KERNEL_REGEX[:SKIP[:BATCH]] ..."  Nsight Compute sections for a few of those kernels (see the end)
#   SERVE="qwen2.5-0.5b gpt-oss-20b"  bench/serve_bench.py on those synthetic files: an orcd worker
#                   (gRPC, SERVE_SLOTS sequences, default 256), then llama-server when /tmp/anchor holds its
#                   build (anchors README), same clients (SERVE_CLIENTS), restarted per level with as many
#                   slots as clients, a KV stream each (no -kvu) and no prompt cache (see the loop); rows to $OUT/serve.jsonl,
#                   orcd's with what the worker did meanwhile (its metrics); SERVE_ARGS: more serve_bench.py options;
#                   SERVE_REQUESTS (default 12): requests per client and level (4 made 5 s levels at 64 clients);
#                   SERVE_LEVEL_S (default 30): no request is sent after that many seconds of a level (a
#                   slow server's row counts the rest as unsent instead of running out the call);
#                   SERVE_AB="ORCD_GIL_SWITCH_US=300": orcd's levels again with those variables (rows "orcd+AB");
#                   SERVE_AB_ARGS="--frontends 8": that run's extra `orcd serve` flags (with or without SERVE_AB);
#                   SERVE_LLAMA=0: no llama-server rows; SERVE_BACKEND=cpu: both servers on the CPU (a dry run of
#                   this flow off the GPU machine: ORCD_DEVICE_ENV=1, a small FILE as $ORCD_BENCH_DIR/NAME.gguf); SERVE_PROFILE=1: the worker under py-spy (.dev/tools/py-spy carried), to $OUT/serve-prof-*.txt
#   BUILD_LLAMA=1   start building llama.cpp (bench tools and llama-server; LLAMA_JOBS, default 10) from .dev/anchors/llamacpp-src.tgz
#                   into /tmp/anchor in the background (../shared/anchors/README.md), for a later call. Where
#                   .dev/llama/llama-bin.tar.xz is carried (scripts/build_llama.sh made it on the development VM) and
#                   its llama-bench starts here, those binaries are used at once and nothing is built
#   LLAMA_BENCH="qwen2.5-0.5b ..."  llama.cpp's same-lease figures on those files: llama-bench pp512/tg128
#                   and llama-batched-bench at 1, 8, 32 and 64 sequences (waits for the build); to $OUT/llama.md
#   CONSTRAINT="qwen2.5-0.5b ..."  bench/constraint_cost.py (JSON schema against free decode, B=1,64;
#                   --trace: where a constrained step's host time goes); run before BUILD_LLAMA's build
#                   starts, which would take the cores the masks are filled on
#   MASK_FILL="qwen2.5-0.5b ..."  bench/mask_fill.py: llguidance's mask fill on this host's cores
#                   (B=1,64; 1-16 threads), to $OUT/mask_fill.md
#   SPEC_COST="qwen2.5-0.5b ..."  bench/spec_bench.py --step-reps: a verify step of 1+k tokens against a plain one
#   LONG="qwen2.5-0.5b:8192,32768 ..."  prefill of N tokens and decode at depth N, orcd (bench_engine.py)
#                   and llama-bench -d N when built (LONG_LLAMA_WAIT: seconds to wait for the build, default
#                   400); LONG_AB="kv=q8_0 ORCD_ATTN_SPLITS=32": orcd again under each; rows to $OUT/long.txt
#   KVQ8="phi3-mini:64 ..."  the Q8_0 KV cache against f16 (bench_engine.py --kv-cache-type, each in turn):
#                   pp512, tg128 and the aggregate at those batch sizes with KVQ8_PROMPT-token prompts
#                   (default 128); llama-batched-bench -ctk/-ctv f16 and q8_0 when built; rows to $OUT/kvq8.txt;
#                   KVQ8_AB="ORCD_ATTN_SPLITS=64 ...": orcd's rows again under each (alternating with the default)
#   BLAS_BENCH=1    bench/bench_blas.py: the fused GEMM against the cuBLAS path at the anchor models' dense
#                   shapes and T = 64..2048 (BLAS_BENCH_ARGS: more options), to $OUT/blas.txt
#   HOST_BENCH=1    the serving host without a GPU: bench/host_ceiling.py (8 client processes, 64 and
#                   256 clients; again through HOST_FRONTENDS front ends, default 4) and bench/stream_rate.py
#                   (sync against grpc.aio, 8 client processes); $OUT/host.txt
#   SKIP_TESTS=1    no GPU tests;  WHEELS=DIR  the wheels to install (default .whl)
#   The carried archives, wheels and kernel cache are made by scripts/prepare_carry.sh (here) and
#   unpacked there by scripts/device_env.sh.
#   Real models (SmolLM2, Gemma 3) are used when $ORCD_MODEL_DIR holds them (no network there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/orcd-out}; mkdir -p "$OUT"
rc=0
echo "== $(date +%T) start"
. scripts/device_env.sh
echo "== $(date +%T) wheels and carried files ready"
# ../shared does not travel to the GPU machine; a shared/ copied into the checkout does.
if [ -z "${ORCD_SHARED_DIR:-}" ] && [ -d shared/vocab ]; then export ORCD_SHARED_DIR=$PWD/shared; fi
# Tiny architecture models exported where transformers is installed (tests/gpu/test_cuda_architectures.py).
if [ -z "${ORCD_TINY_GGUF_DIR:-}" ] && [ -d .dev/tiny ]; then export ORCD_TINY_GGUF_DIR=$PWD/.dev/tiny; fi
[ -z "${ORCD_SHARED_DIR:-}" ] && [ -d .dev/bv/vocab ] && export ORCD_SHARED_DIR=$PWD/.dev/bv
# No network there: the real-model tests run on models carried into $ORCD_MODEL_DIR, else skip.
export ORCD_TEST_NO_PULL=1
data=${ORCD_BENCH_DIR:-/tmp/orcd-bench}; mkdir -p "$data"
start_llama_build() {
  if [ -n "${BUILD_LLAMA:-}" ] && [ ! -d /tmp/anchor/src/llama.cpp ] && [ ! -d /tmp/anchor/prebuilt ]; then
    mkdir -p /tmp/anchor/src && tar xzf .dev/anchors/llamacpp-src.tgz -C /tmp/anchor/src
    (cd /tmp/anchor/src/llama.cpp && setsid nohup bash -c "cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release && nice cmake --build build -j${LLAMA_JOBS:-10} \
      --target llama-bench llama-batched-bench llama-server; echo \$? > /tmp/anchor/build.rc" \
      > /tmp/anchor/build.log 2>&1 < /dev/null &)
  fi
}
# llama.cpp built elsewhere from the same source (scripts/build_llama.sh): used when it starts here (the
# image's libraries may differ from the development VM's), which leaves the cores to the measurements
# Its RUNPATH names only its own folder: libcudart/libcublas come from the loader's path, else from the
# toolkit's or the nvidia wheels' folders (kept in /tmp/anchor/ld_path for later calls on this machine).
prebuilt_ok() {  # it starts and its CUDA backend finds the GPU
  LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" /tmp/anchor/prebuilt/bin/llama-bench --list-devices \
    > /tmp/anchor/prebuilt.log 2>&1 && grep -q "CUDA0" /tmp/anchor/prebuilt.log
}
if [ -f .dev/llama/llama-bin.tar.xz ] && [ ! -f /tmp/anchor/build.rc ]; then
  mkdir -p /tmp/anchor/prebuilt && tar xJf .dev/llama/llama-bin.tar.xz -C /tmp/anchor/prebuilt
  libs=$(python3 -c "import glob, sys; print(':'.join(['/usr/local/cuda/lib64'] + sorted(glob.glob(sys.prefix + '/lib/python3*/site-packages/nvidia/cu13/lib') + glob.glob('/usr/local/lib/python3*/dist-packages/nvidia/cu13/lib'))))" 2>/dev/null)
  for p in "" "$libs"; do
    if prebuilt_ok "$p"; then
      echo "$p" > /tmp/anchor/ld_path; echo 0 > /tmp/anchor/build.rc
      echo "llama.cpp: the carried build ($(cat /tmp/anchor/prebuilt/bin/BUILD 2>/dev/null)${p:+; libraries from $p})"; break
    fi
  done
  [ -f /tmp/anchor/build.rc ] || { echo "llama.cpp: the carried build does not start here: $(tail -2 /tmp/anchor/prebuilt.log)"; rm -rf /tmp/anchor/prebuilt; }
fi
if [ -s /tmp/anchor/ld_path ] && [ -d /tmp/anchor/prebuilt ]; then
  export LD_LIBRARY_PATH="$(cat /tmp/anchor/ld_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# the build takes ten cores for minutes: after the CPU-bound measurements when there are some
[ -z "${CONSTRAINT:-}${MASK_FILL:-}" ] && start_llama_build
llama_bin=/tmp/anchor/src/llama.cpp/build/bin
[ -x /tmp/anchor/prebuilt/bin/llama-bench ] && llama_bin=/tmp/anchor/prebuilt/bin
# waits (at most LLAMA_WAIT seconds) for the background build; true when it succeeded
llama_ready() {
  local t=0; while [ -d /tmp/anchor/src ] && [ ! -f /tmp/anchor/build.rc ] && [ $t -lt "${LLAMA_WAIT:-400}" ]; do sleep 5; t=$((t + 5)); done
  [ "$(cat /tmp/anchor/build.rc 2>/dev/null)" = 0 ] || { echo "llama.cpp not built: $(tail -2 /tmp/anchor/build.log 2>/dev/null)"; return 1; }
}
# The synthetic files the profiles and the benchmark need, written while the tests run (16 cores there).
NCU=${NCU:-}
bench_models=${BENCH_MODELS:-}; [ -z "${SKIP_BENCH:-}" ] && bench_models=${BENCH_MODELS:-qwen2.5-0.5b phi3-mini phi3-mini-q4_0 gpt-oss-20b}
for m in $(for mb in ${SERVE:-} ${KVQ8:-} ${CONSTRAINT:-} ${MASK_FILL:-} ${SPEC_COST:-} ${LONG:-} ${LLAMA_BENCH:-} ${PROFILE_MODELS:-} ${PREFILL_MODELS:-} $(for x in $NCU; do echo "${x%%:*}"; done) $bench_models; do echo "${mb%%:*}"; done | sort -u); do
  [ -s "$data/$m.gguf" ] || (python3 bench/synth_gguf.py "$m" "$data/$m.tmp" "$ORCD_SHARED_DIR/vocab" >/dev/null \
    && mv "$data/$m.tmp" "$data/$m.gguf") &
done
# FIRST_TESTS="FILES" [FIRST_K="expr"]: a quick pytest selection that must pass before the stages run
if [ -n "${FIRST_TESTS:-}" ]; then
  echo "== first tests"
  # FIRST_TIMEOUT (default 200 s): a selection still running then is cut off, which is not a failure
  timeout "${FIRST_TIMEOUT:-200}" python3 -m pytest -q -m gpu $FIRST_TESTS -k "${FIRST_K:-}" -p no:cacheprovider \
    -o console_output_style=count >"$OUT/first-tests.txt" 2>&1
  first_rc=$?
  tail -5 "$OUT/first-tests.txt"
  # the progress lines of a cut-off run: "....F.. [ 120/480]"
  if [ "$first_rc" = 124 ] && ! grep -E '^[.sxXFE]+ +\[' "$OUT/first-tests.txt" | grep -q '[FE]'; then
    echo "first tests cut off at ${FIRST_TIMEOUT:-200} s, $(grep -E '^[.sxXFE]+ +\[' "$OUT/first-tests.txt" | tr -cd . | wc -c) passed, none failed"
  elif [ "$first_rc" != 0 ]; then
    rc=1; STAGE_DIRS=; echo "first tests failed (rc $first_rc): stages skipped"
  fi
fi
if [ -n "${STAGE_DIRS:-}" ]; then echo "== staged whole models"; WHEELS=${WHEELS:-.whl} bash scripts/stage_gpu.sh $STAGE_DIRS || rc=1; fi
echo "== $(date +%T) GPU"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,temperature.gpu --format=csv
python3 -c "import orcd_grpc.proto" || echo "stub generation failed"
start=$(date +%s)
echo "== $(date +%T) GPU tests"
if [ -z "${SKIP_TESTS:-}" ]; then
  # SIGINT at the limit: pytest stops and still prints the failures so far (a plain kill loses them)
  timeout -s INT -k 20 ${GPU_TEST_TIMEOUT:-480} python3 -m pytest -q -rf --tb=short -m gpu ${GPU_TESTS:-tests/gpu} -k "${GPU_K:-}" -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/pytest-gpu.log" | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ -z "${SKIP_SUITE:-}" ]; then
  echo "== rest of the suite"
  timeout 240 python3 -m pytest -q -m "not gpu" tests/ -p no:cacheprovider 2>&1 | tee "$OUT/pytest-rest.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== benchmark"
  wait
  if [ -n "${BASE_TREE:-}" ]; then
    # Each tree imports its own package and finds its own cuda/; both share the kernel cache.
    # BENCH_ARGS="A;B": each file under option set A (base, new), then B (base, new)
    IFS=';' read -ra arg_sets <<< "${BENCH_ARGS:---batches 8,64}"
    for m in $bench_models; do
      for bargs in "${arg_sets[@]}"; do
        for tree in "$BASE_TREE" .; do
          label=$([ "$tree" = . ] && echo new || echo base)
          row=$(cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 240 python3 bench/bench_engine.py "$data/$m.gguf" \
            --backend cuda $bargs 2>>"$OUT/ab-$label-$m.err" | tail -1)
          echo "$label $row" | tee -a "$OUT/ab.md"
        done
      done
    done
  elif [ -f bench/run_all.sh ]; then timeout 300 bash bench/run_all.sh ${BENCH_MODELS:-} 2>&1 | tee "$OUT/bench.md"
  elif [ -f bench/bench_decode.py ]; then timeout 300 python3 bench/bench_decode.py 2>&1 | tee "$OUT/bench.md"
  else echo "no benchmark under bench/"; fi
fi
if [ -n "${PROFILE_MODELS:-}${PREFILL_MODELS:-}" ]; then
  wait  # the synthetic files started above
  # AB="ORCD_FUSE_Q8=0 ORCD_GEMM_PIPE=0": each measurement again under each switch (graph_replay_gpu
  # is the GPU time per decode step to compare; prefill tok/s from a short bench_engine run)
  for ab in default ${AB:-}; do
    # an AB entry's comma-separated parts are variables, or options of the profile script where they
    # start with --: AB="ORCD_ATTN_SPLITS=64 --kv-cache-type=q8_0 ORCD_ATTN_SPLITS=64,--kv-cache-type=q8_0"
    envs=""; pargs=${PROFILE_ARGS:-}
    if [ "$ab" != default ]; then
      for part in ${ab//,/ }; do [[ $part == --* ]] && pargs="$pargs $part" || envs="$envs $part"; done
    fi
    for mb in ${PROFILE_MODELS:-}; do
      bs=${mb#*:}; [ "$bs" = "$mb" ] && bs=1
      for b in ${bs//,/ }; do
        args="--batch $b"; [[ $b == p* ]] && args="--prefill ${b#p}"  # p512: a prefill (trace_decode.py)
        script=${PROFILE_SCRIPT:-bench/profile_decode.py}
        # 64m512: a serving step of 64 decoding sequences and a new 512-token prompt (trace_decode.py)
        [[ $b == *m* ]] && args="--batch ${b%m*} --mixed ${b#*m}" && script=bench/trace_decode.py
        echo "$ab ${mb%%:*} B=$b $(env $envs timeout 120 python3 $script \
          "$data/${mb%%:*}.gguf" $args $pargs 2>&1 | tail -1 | cut -c1-${PROFILE_CUT:-2000})" | tee -a "$OUT/profile.txt" | cut -c1-300
      done
    done
  done
  for ab in default ${PREFILL_AB:-}; do
    envs=$([ "$ab" = default ] || echo "${ab//,/ }")
    for m in ${PREFILL_MODELS:-}; do
      echo "$ab $m $(env $envs timeout 120 python3 bench/bench_engine.py "$data/$m.gguf" --backend cuda --gen 16 \
        --batches "" --reps 3 2>&1 | tail -1)" | tee -a "$OUT/profile.txt"
    done
  done
fi
# KERNEL_AB="default ORCD_GEMV_KSPLIT=1 ...": bench/bench_kernels.py ${KERNEL_ARGS:---quick --ts 1,8} under
# each setting, alternating; KERNEL_BASE=DIR (an export of another commit, carried) also runs that
# tree's copy first in each round; KERNEL_ROUNDS rounds (default 1). Rows to $OUT/kernels.txt. The export:
#   mkdir -p .dev/base && git archive REV cuda orcd_grpc bench tests/gpu | tar -x -C .dev/base
#   cp bench/bench_kernels.py .dev/base/bench/   # the same benchmark on both trees
if [ -n "${KERNEL_AB:-}" ]; then
  for round in $(seq "${KERNEL_ROUNDS:-1}"); do
    for ab in ${KERNEL_BASE:+base} ${KERNEL_AB}; do
      envs=$([ "$ab" = default ] || [ "$ab" = base ] || echo "${ab//,/ }"); tree=.; [ "$ab" = base ] && tree=$KERNEL_BASE
      echo "== $(date +%T) kernels $ab (round $round)" | tee -a "$OUT/kernels.txt"
      (cd "$tree" && env $envs timeout 150 python3 bench/bench_kernels.py ${KERNEL_ARGS:---quick --ts 1,8} 2>&1) \
        | grep -E "T=|ceiling" | sed "s/^/$ab /" | tee -a "$OUT/kernels.txt"
    done
  done
fi
if [ -n "${BLAS_BENCH:-}" ]; then  # the fused GEMM against the cuBLAS path per token count (ORCD_GEMM_BLAS_MIN)
  echo "== $(date +%T) GEMM against cuBLAS"
  timeout 240 python3 bench/bench_blas.py --reps 10 ${BLAS_BENCH_ARGS:-} 2>&1 | tee -a "$OUT/blas.txt" | tail -40
fi
for m in ${CONSTRAINT:-}; do
  wait
  echo "== $(date +%T) constraint cost $m"
  timeout 300 python3 bench/constraint_cost.py "$data/$m.gguf" --backend cuda --batches 1,64 --reps 3 --trace \
    --json "$OUT/constraint.jsonl" 2>&1 | tail -6
done
for m in ${MASK_FILL:-}; do
  wait
  echo "== $(date +%T) mask fill $m"
  timeout 200 python3 bench/mask_fill.py "$data/$m.gguf" --batches 1,64 --threads 1,4,8,12,16 2>&1 | tee -a "$OUT/mask_fill.md" | tail -8
done
start_llama_build
for m in ${SPEC_COST:-}; do
  wait
  echo "== verify step cost $m"
  timeout 200 python3 bench/spec_bench.py "$data/$m.gguf" --backend cuda --tasks "" --step-reps 50 \
    --json "$OUT/spec-$m.json" 2>&1 | tail -2
done
for m in ${LLAMA_BENCH:-}; do
  wait
  llama_ready || break
  echo "== llama.cpp $m" | tee -a "$OUT/llama.md"
  timeout 200 "$llama_bin/llama-bench" -m "$data/$m.gguf" -p 512 -n 128 -ngl 99 -fa 1 -r 3 -o md 2>&1 | grep "^|" | tee -a "$OUT/llama.md"
  timeout 200 "$llama_bin/llama-batched-bench" -m "$data/$m.gguf" -c 32768 -b 2048 -ub 512 -npp 128 -ntg 128 \
    -npl 1,8,32,64 -ngl 99 -fa on 2>&1 | grep "^|" | tee -a "$OUT/llama.md"
done
for ml in ${LONG:-}; do
  wait
  m=${ml%%:*}
  for n in $(echo "${ml#*:}" | tr , ' '); do
    # LONG_AB="kv=q8_0 ORCD_ATTN_SPLITS=32 ...": each run again with that KV cache type or switch
    for ab in default ${LONG_AB:-}; do
      envs=; kva=; case $ab in default) ;; kv=*) kva="--kv-cache-type ${ab#kv=}" ;; *) envs=${ab//,/ } ;; esac
      echo "orcd $m N=$n $ab $(env $envs timeout 200 python3 bench/bench_engine.py "$data/$m.gguf" --backend cuda --prompt "$n" \
        --gen 64 --batches "" --reps 1 --context-length $((n + 256)) $kva 2>&1 | tail -1)" | tee -a "$OUT/long.txt"
    done
    if LLAMA_WAIT=${LONG_LLAMA_WAIT:-400} llama_ready; then
      timeout 200 "$llama_bin/llama-bench" -m "$data/$m.gguf" -p "$n" -n 0 -ngl 99 -fa 1 -r 1 -o md 2>&1 | grep "^|" | tee -a "$OUT/long.txt"
      timeout 200 "$llama_bin/llama-bench" -m "$data/$m.gguf" -p 0 -n 64 -d "$n" -ngl 99 -fa 1 -r 1 -o md 2>&1 | grep "^|" | tee -a "$OUT/long.txt"
    fi
  done
done
if [ -n "${HOST_BENCH:-}" ]; then
  echo "== $(date +%T) serving host alone"
  timeout 200 python3 bench/host_ceiling.py --step-ms 5 --clients 64,256 --procs 8 2>&1 | tail -6 | tee -a "$OUT/host.txt"
  # the same through front-end processes with cores of their own (HOST_FRONTENDS, default 4)
  timeout 200 python3 bench/host_ceiling.py --step-ms 5 --clients 64,256 --procs 8 --frontends "${HOST_FRONTENDS:-4}" \
    --port 50371 2>&1 | tail -6 | sed -u "s/^/frontends=${HOST_FRONTENDS:-4} /" | tee -a "$OUT/host.txt"
  timeout 150 python3 bench/stream_rate.py --procs 8 2>&1 | tail -6 | tee -a "$OUT/host.txt"
fi
for mb in ${KVQ8:-}; do
  wait
  m=${mb%%:*}; bs=${mb#*:}; [ "$bs" = "$mb" ] && bs=64
  np=${KVQ8_PROMPT:-128}
  # KVQ8_AB="ORCD_ATTN_SPLITS=64": each cache type again under those variables, alternating
  for kvt in f16 q8_0; do
    for ab in default ${KVQ8_AB:-}; do
      envs=$([ "$ab" = default ] || echo "${ab//,/ }")
      echo "orcd $m kv=$kvt $ab $(env $envs timeout 240 python3 bench/bench_engine.py "$data/$m.gguf" --backend cuda \
        --kv-cache-type $kvt --batches "$bs" --batch-prompt "$np" --reps 2 --context-length $((np + 512)) 2>&1 | tail -1)" \
        | tee -a "$OUT/kvq8.txt"
    done
  done
  if LLAMA_WAIT=${KVQ8_LLAMA_WAIT:-0} llama_ready; then
    most=$(echo "$bs" | tr , '\n' | sort -n | tail -1)
    for kvt in f16 q8_0; do
      timeout 240 "$llama_bin/llama-batched-bench" -m "$data/$m.gguf" -c $(((np + 128) * most + 1024)) -b 2048 -ub 512 \
        -npp "$np" -ntg 128 -npl "1,$bs" -ngl 99 -fa on -ctk $kvt -ctv $kvt 2>&1 | grep "^|" | sed "s/^/$kvt /" | tee -a "$OUT/kvq8.txt"
    done
  fi
done
for m in ${SERVE:-}; do
  wait
  slots=${SERVE_SLOTS:-256} clients=${SERVE_CLIENTS:-1,8,32,64,128,256}
  echo "== serve $m (slots $slots, clients $clients)"
  # SERVE_PROFILE=1: the worker runs under py-spy (carried as .dev/tools/py-spy), sampling only
  # threads that hold the GIL, for SERVE_PROFILE_S seconds; raw stacks to $OUT/serve-prof-$m.txt
  prof=(); [ -n "${SERVE_PROFILE:-}" ] && [ -x .dev/tools/py-spy ] && prof=(.dev/tools/py-spy record --gil --threads -r 200 \
    -d "${SERVE_PROFILE_S:-40}" -f raw -o "$OUT/serve-prof-$m.txt" --)
  # SERVE_AB="VAR=VALUE ...": the orcd levels once more with those variables set (row "orcd+AB")
  # SERVE_AB_ARGS="--frontends 8": orcd serve flags of that A/B run (with SERVE_AB, or alone)
  ab_env=${SERVE_AB:-}; [ -z "$ab_env" ] && [ -n "${SERVE_AB_ARGS:-}" ] && ab_env="ORCD_AB=1"  # a run by flags alone
  for ab in "" ${ab_env:+"$ab_env"}; do
    [ -n "$ab" ] && prof=()  # the profile is of the baseline
    abargs=(); [ -n "$ab" ] && abargs=(${SERVE_AB_ARGS:-})
    label="${ab:+$ab${abargs[*]:+ ${abargs[*]}}}"
    env $ab "${prof[@]}" python3 -m orcd_grpc serve --model "$data/$m.gguf" --backend "${SERVE_BACKEND:-cuda}" --port 50061 --max-sequences "$slots" \
      --max-context 2048 --metrics-port 50071 "${abargs[@]}" > "$OUT/serve-orcd-$m${ab:+-ab}.log" 2>&1 & sp=$!
    timeout ${SERVE_TIMEOUT:-420} python3 bench/serve_bench.py grpc 127.0.0.1:50061 --vocab-from "$data/$m.gguf" \
      --clients "$clients" --procs 8 --level-seconds "${SERVE_LEVEL_S:-30}" --requests-per-client "${SERVE_REQUESTS:-12}" --metrics http://127.0.0.1:50071/metrics ${SERVE_ARGS:-} | sed -u "s/^/{\"server\": \"orcd${ab:++AB}\", \"ab\": \"$label\", \"model\": \"$m\", \"row\": /; s/\$/}/" | tee -a "$OUT/serve.jsonl"
    if [ ${#prof[@]} -gt 0 ]; then  # py-spy writes its profile on SIGINT; the worker is its child
      kill -INT "$sp"; sleep 3; pkill -f "orcd_grpc serve --model $data/$m.gguf"
    fi
    kill "$sp" 2>/dev/null; wait "$sp" 2>/dev/null
  done
  ls_bin=$llama_bin/llama-server
  if [ "${SERVE_LLAMA:-1}" != 0 ] && llama_ready && [ -x "$ls_bin" ]; then
    # llama-server in the configuration that serves it best: restarted per level with as many slots as
    # clients (-np C, 2048 cells a slot, each slot its own KV stream: its default with -np given) and no
    # prompt cache (--cache-ram 0). With more slots than clients and its default prompt cache, every new
    # request clears each idle slot's KV over the whole pool on its main loop (llama_kv_cache::seq_rm;
    # session 20's CPU perf), which stalls every running slot; the random prompts never hit that cache
    # anyway. One unified pool (-kvu) made every slot's attention span the whole pool's used cells:
    # 50 ms steps at 64 slots on qwen2.5-0.5b (session 22), where llama-batched-bench steps in 6.
    # SERVE_LLAMA_ARGS: more flags (e.g. -kvu).
    ngl=99; [ "${SERVE_BACKEND:-cuda}" = cpu ] && ngl=0
    for c in ${clients//,/ }; do
      "$ls_bin" -m "$data/$m.gguf" -ngl "$ngl" -fa on -np "$c" -c $((c * 2048)) --cache-ram 0 ${SERVE_LLAMA_ARGS:-} \
        --host 127.0.0.1 --port 50062 >> "$OUT/serve-llama-$m.log" 2>&1 & sp=$!
      timeout ${SERVE_TIMEOUT:-420} python3 bench/serve_bench.py openai http://127.0.0.1:50062 --vocab-from "$data/$m.gguf" \
        --clients "$c" --procs 8 --level-seconds "${SERVE_LEVEL_S:-30}" --requests-per-client "${SERVE_REQUESTS:-12}" ${SERVE_ARGS:-} | sed -u "s/^/{\"server\": \"llama-server\", \"model\": \"$m\", \"row\": /; s/\$/}/" | tee -a "$OUT/serve.jsonl"
      kill "$sp"; wait "$sp" 2>/dev/null
    done
  else
    [ "${SERVE_LLAMA:-1}" = 0 ] && echo "no llama-server rows (SERVE_LLAMA=0)" || echo "llama-server not built: no comparison rows"
  fi
done
# NCU="MODEL:KERNEL_REGEX[:SKIP[:BATCH]] ...": Nsight Compute's throughput, occupancy and warp-stall
# sections for NCU_COUNT (default 6) launches of those kernels in MODEL's decode at BATCH (default 1;
# bench/profile_decode.py), after SKIP (default 100) of them; clocks left alone (METHOD.md). Each
# spec into $OUT/ncu-N.txt.
n=0
for spec in $NCU; do
  wait
  n=$((n + 1))
  IFS=: read -r nm kre skip nb <<< "$spec"
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  echo "== ncu $n: $nm B=${nb:-1} $kre"
  timeout ${NCU_TIMEOUT:-240} "$ncu_bin" --clock-control none --kernel-name "regex:$kre" --launch-skip "${skip:-100}" \
    --launch-count "${NCU_COUNT:-6}" --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 bench/profile_decode.py "$data/$nm.gguf" --batch "${nb:-1}" > "$OUT/ncu-$n.txt" 2>&1
  echo "ncu rc=$? $(grep -c '' "$OUT/ncu-$n.txt") lines"
done
wait  # synthetic files still being written (SKIP_BENCH=1 with BENCH_MODELS)
echo "== gpu_check done in $(( $(date +%s) - start ))s, rc=$rc"
exit $rc
