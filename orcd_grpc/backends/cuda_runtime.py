"""Compiles and loads the kernels in cuda/*.cu through PyCUDA.

Modules are built for the card's own architecture (sm_90 on Hopper) with nvcc and cached on disk
by PyCUDA, keyed by source, options and architecture, so a worker restart does not recompile.
"""
from __future__ import annotations

import functools
import os
import pathlib


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


@functools.lru_cache(maxsize=None)
def device_arch() -> str:
    import pycuda.driver as drv

    major, minor = drv.Context.get_device().compute_capability()
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def load_module(name: str, options: tuple[str, ...] = ()):
    """Returns the pycuda Module compiled from cuda/<name>.cu (a current context is required)."""
    from pycuda.compiler import SourceModule

    src = (CUDA_DIR / f"{name}.cu").read_text()
    cache_dir = os.environ.get("ORCD_KERNEL_CACHE", str(pathlib.Path.home() / ".cache" / "orcd" / "kernels"))
    os.makedirs(cache_dir, exist_ok=True)
    return SourceModule(
        src,
        no_extern_c=True,  # kernels declare extern "C" themselves so templates can live beside them
        arch=device_arch(),
        options=["-O3", "--use_fast_math", "-std=c++17", f"-I{CUDA_DIR}", *options],
        include_dirs=[str(CUDA_DIR)],
        cache_dir=cache_dir,
    )
