# Sourced by scripts/gpu_check.sh and scripts/stage_gpu.sh on the GPU machine (from the repo root):
# unpacks the carried archives, installs the wheels once per machine and points Python and the
# kernel cache at them. WHEELS: the wheel folder (default .whl).
[ -n "${ORCD_DEVICE_ENV:-}" ] && return 0
# Packed folders (.dev/carry/*.tar.xz: the kernel cache, tiny models, vocabularies) unpack into
# .dev/, since one call's transfer is capped at 64 MiB.
for t in .dev/carry/*.tar.xz; do [ -f "$t" ] && tar xJf "$t" -C .dev; done
# The wheels install once per machine (a warm machine keeps /tmp between calls).
[ -f /tmp/site/.orcd-installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  "${WHEELS:-.whl}"/*.whl 2>&1 | tail -2; touch /tmp/site/.orcd-installed; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export ORCD_KERNEL_CACHE=${ORCD_KERNEL_CACHE:-/tmp/orcd-kernels}
# Cubins compiled beforehand without a GPU (python3 -m orcd_grpc.backends.cuda_runtime .dev/kcache
# sm_90) save the first load's nvcc time; a stale one is never used (the key covers sources and nvcc).
mkdir -p "$ORCD_KERNEL_CACHE"
[ -d .dev/kcache ] && cp -n .dev/kcache/*.cubin "$ORCD_KERNEL_CACHE"/ 2>/dev/null
export ORCD_DEVICE_ENV=1
