"""Backends by name (--backend auto, cpu, cuda)."""
from __future__ import annotations

from ..errors import InvalidArgument
from .base import Backend


def make_backend(kind: str = "auto", max_vram: int = 0, max_ram: int = 0) -> Backend:
    if kind in ("auto", "cuda"):
        try:
            from .cuda import CudaBackend
            from .cuda_context import cuda_present
            if cuda_present():
                return CudaBackend(max_vram=max_vram)
            if kind == "cuda":
                raise InvalidArgument("no CUDA GPU is visible to this process", field="backend")
        except ImportError as exc:
            if kind == "cuda":
                raise InvalidArgument(f"the CUDA backend is unavailable: {exc}", field="backend") from exc
    elif kind != "cpu":
        raise InvalidArgument(f"unknown backend {kind!r} (auto, cpu, cuda)", field="backend")
    from ..admission import ram_limit
    from .numpy_backend import NumpyBackend
    return NumpyBackend(max_ram=ram_limit(max_ram))
