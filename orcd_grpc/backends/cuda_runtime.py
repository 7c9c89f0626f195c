"""Compiles the kernels in cuda/*.cu with nvcc and loads them through PyCUDA.

Modules are built for the card's own architecture (sm_90 on Hopper) into cubins cached on disk,
keyed by the module's source, every header beside it, the options, the architecture and nvcc's
version, so a worker restart does not recompile and a changed kernel never loads stale code.
A cache can be filled without a GPU (`python3 -m orcd_grpc.backends.cuda_runtime DIR`), for
images and for machines where compile time is dear.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from ..tuning import DEFAULT, Tuning

MODULES = ("attention", "attention_decode", "attention_mma", "dequant", "elementwise", "mma_i8", "moe", "norm", "quant_matmul", "rope", "sample", "score")
BASE_OPTIONS = ("-O3", "--use_fast_math", "-std=c++17")


def kernel_dir() -> pathlib.Path:
    """Where the kernel sources are: $ORCD_CUDA_DIR if set; else orcd_grpc/cuda/ inside an
    installed package (setup.py copies them there at build time); else cuda/ at the root of a
    source checkout. The packaged copy is tried first: beside an installed package, the
    checkout's location would be site-packages/cuda, which may well be another project's."""
    env = os.environ.get("ORCD_CUDA_DIR")
    if env:
        return pathlib.Path(env)
    here = pathlib.Path(__file__).resolve()
    packaged = here.parents[1] / "cuda"
    if any(packaged.glob("*.cu")):
        return packaged
    return here.parents[2] / "cuda"


CUDA_DIR = kernel_dir()


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("ORCD_KERNEL_CACHE", pathlib.Path.home() / ".cache" / "orcd" / "kernels"))


@functools.lru_cache(maxsize=None)
def nvcc() -> str:
    found = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    return found


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    try:
        return subprocess.run([nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        from ..errors import Internal

        raise Internal(f"nvcc ({nvcc()}) does not run: {exc}; the CUDA backend builds its kernels with the "
                       "CUDA toolkit's nvcc (set $NVCC to its path)") from exc


@functools.lru_cache(maxsize=None)
def device_arch() -> str:
    import pycuda.driver as drv

    major, minor = drv.Context.get_device().compute_capability()
    return f"sm_{major}{minor}"


def cubin_path(name: str, arch: str, options: tuple[str, ...] = ()) -> pathlib.Path:
    h = hashlib.sha256()
    h.update((CUDA_DIR / f"{name}.cu").read_bytes())
    for header in sorted(CUDA_DIR.glob("*.cuh")):
        h.update(header.name.encode() + b"\0" + header.read_bytes())
    h.update("\0".join((*BASE_OPTIONS, *options, arch, nvcc_version())).encode())
    return cache_dir() / f"{name}-{arch}-{h.hexdigest()[:20]}.cubin"


def compile_cubin(name: str, arch: str, options: tuple[str, ...] = ()) -> pathlib.Path:
    """The cached cubin of cuda/<name>.cu, compiling it first when absent."""
    path = cubin_path(name, arch, options)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = pathlib.Path(tmp) / path.name
        cmd = [nvcc(), "-cubin", f"-arch={arch}", *BASE_OPTIONS, f"-I{CUDA_DIR}", *options, "-o", str(out),
               str(CUDA_DIR / f"{name}.cu")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            from ..errors import Internal

            raise Internal(f"nvcc failed on cuda/{name}.cu: {done.stderr[-2000:]}")
        os.replace(out, path)  # atomic: a concurrent loader sees the whole file or none
    return path


def module_options(name: str, tuning: Tuning = DEFAULT) -> tuple[str, ...]:
    """The nvcc options of a module under `tuning`'s compile-time switches (Tuning fields marked
    compile_time): quant_matmul's GEMM tiles up to BM tuning.gemm_pipe take the unrolled k-step;
    mma_i8's k-windows unroll where tuning.gemm_i8_unroll;
    attention_decode's attn_dec scores Q8_0 keys with dp4a where tuning.attn_q8_dp4a; attn_dec's and
    attn_decm's merges can write the int8 rounding of their output where tuning.fuse_attn_q8.
    Always spelled out, so the cache key names the value rather than relying on the .cu's own
    default. Loading and precompiling both ask here, so a precompiled cubin is the one loaded."""
    if name == "quant_matmul":
        return (f"-DORCD_GEMM_PIPE={int(tuning.gemm_pipe)}",)
    if name == "mma_i8":
        return (f"-DORCD_GEMM_I8_UNROLL={int(tuning.gemm_i8_unroll)}",)
    fuse = f"-DORCD_FUSE_ATTN_Q8={int(tuning.fuse_attn_q8)}"
    if name == "attention_decode":
        return (f"-DORCD_ATTN_Q8_DP4A={int(tuning.attn_q8_dp4a)}", fuse)
    if name == "attention_mma":
        return (fuse,)
    return ()


@functools.lru_cache(maxsize=None)
def load_module(name: str, options: tuple[str, ...] = ()):
    """The pycuda Module of cuda/<name>.cu built with `options` (module_options) for this device
    (a current context is required)."""
    import pycuda.driver as drv

    return drv.module_from_buffer(compile_cubin(name, device_arch(), options).read_bytes())


def precompile(arch: str, tuning: Tuning = DEFAULT, names=MODULES) -> list[pathlib.Path]:
    """Fills the cache for `arch` without a GPU, modules in parallel (nvcc is single-threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(n, module_options(n, tuning)) for n in names]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda j: compile_cubin(j[0], arch, j[1]), jobs))


if __name__ == "__main__":  # python3 -m orcd_grpc.backends.cuda_runtime CACHE_DIR [ARCH]
    os.environ["ORCD_KERNEL_CACHE"] = sys.argv[1]
    for p in precompile(sys.argv[2] if len(sys.argv) > 2 else "sm_90", Tuning.from_env()):
        print(p, p.stat().st_size)
