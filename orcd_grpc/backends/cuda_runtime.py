"""Compiles and loads the kernels in cuda/*.cu through PyCUDA.

Modules are built for the card's own architecture (sm_90 on Hopper) with nvcc and cached on disk
by PyCUDA, keyed by source, options and architecture, so a worker restart does not recompile.
"""
from __future__ import annotations

import functools
import os
import pathlib

CUDA_DIR = pathlib.Path(os.environ.get("ORCD_CUDA_DIR", pathlib.Path(__file__).resolve().parents[2] / "cuda"))


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
