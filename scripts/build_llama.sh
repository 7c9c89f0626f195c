#!/usr/bin/env bash
# llama.cpp's bench tools and llama-server for the GPU machine, built on the development VM from the
# anchors' source (../shared/anchors/llamacpp-src.tgz, the same build flags as its README and
# gpu_check's BUILD_LLAMA, sm_90), packed as .dev/llama/llama-bin.tar.xz for `carry`:
#     bash scripts/build_llama.sh            (about 40-60 minutes on 2 cores; run it in the background)
# gpu_check.sh uses the carried build when its llama-bench starts on the GPU machine and builds there
# otherwise (BUILD_LLAMA=1), so a lease spends neither the build's minutes nor its cores.
#
# This VM has nvcc but neither cuBLAS nor the driver library. cuBLAS comes from NVIDIA's wheel
# (nvidia-cublas, CUDA 13 like the toolkit) into the toolkit's include/ and lib/; the driver is a
# stub with libcuda.so.1's soname and every cu* entry point of cuda.h, linked against and never run
# (the GPU machine loads its real libcuda.so.1). The C++ runtime stays the GPU machine's own: a static
# libstdc++ from this VM's GCC 12 would take arc4random from glibc 2.36 (std::random_device), newer than
# some images have. The CPU code is built for AVX2 rather than this VM's own instruction set.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
shared=$(cd "${ORCD_SHARED_DIR:-../shared}" && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
work=${LLAMA_WORK:-/tmp/orcd-llama}
jobs=${LLAMA_JOBS:-$(nproc)}
mkdir -p "$work"
if [ ! -e "$cuda/include/cublas_v2.h" ] || [ ! -e "$cuda/lib64/libcublas.so" ]; then
  python3 -m pip download -q --no-deps -d "$work/wheel" nvidia-cublas 2>&1 | grep -v "^WARNING" || true
  rm -rf "$work/cublas" && python3 -m zipfile -e "$work"/wheel/nvidia_cublas-*.whl "$work/cublas"
  for h in "$work"/cublas/nvidia/cu13/include/*.h; do [ -e "$cuda/include/${h##*/}" ] || cp "$h" "$cuda/include/"; done
  for l in "$work"/cublas/nvidia/cu13/lib/libcublas*.so.13; do
    b=${l##*/}; cp "$l" "$cuda/lib64/"; ln -sf "$b" "$cuda/lib64/${b%.13}"
  done
fi
if [ ! -e "$cuda/lib64/stubs/libcuda.so" ]; then
  echo '#include <cuda.h>' > "$work/stub.c"
  gcc -E -I"$cuda/include" "$work/stub.c" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed 's/\s*(//' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$work/libcuda_stub.c"
  mkdir -p "$cuda/lib64/stubs"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib64/stubs/libcuda.so" "$work/libcuda_stub.c"
fi
# the executables' link resolves libggml-cuda's libcuda.so.1 there (-rpath-link is not kept in them)
ln -sf libcuda.so "$cuda/lib64/stubs/libcuda.so.1"
# an existing tree of the same source is built on (incrementally), not unpacked again
[ -d "$work/src/llama.cpp" ] || { mkdir -p "$work/src" && tar xzf "$shared/anchors/llamacpp-src.tgz" -C "$work/src"; }
cd "$work/src/llama.cpp"
cmake -B build-cuda -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DGGML_AVX=ON \
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH='$ORIGIN' \
  -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$cuda/lib64/stubs" -DCMAKE_SHARED_LINKER_FLAGS="" \
  > "$work/cmake.log"
nice cmake --build build-cuda -j"$jobs" --target llama-bench llama-batched-bench llama-server
out=$work/pack/bin && rm -rf "$work/pack" && mkdir -p "$out"
cp -P build-cuda/bin/llama-bench build-cuda/bin/llama-batched-bench build-cuda/bin/llama-server build-cuda/bin/*.so* "$out/"
find "$out" -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
echo "llama.cpp $(sha256sum "$shared/anchors/llamacpp-src.tgz" | cut -c1-12) (anchors source), $(nvcc --version | tail -1), sm_90, built $(date -u +%F)" > "$out/BUILD"
# its own carry path: with it, the call's other carried parts must stay under carry's 64 MiB (see
# prepare_carry.sh: the tiny models and py-spy are carried apart for the same reason)
cd "$root" && mkdir -p .dev/llama && XZ_OPT="-9 -T${jobs}" tar cJf .dev/llama/llama-bin.tar.xz -C "$work/pack" bin
du -h .dev/llama/llama-bin.tar.xz
