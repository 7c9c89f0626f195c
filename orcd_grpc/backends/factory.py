"""Backends by name (--backend auto, cpu, cuda, numpy)."""
from __future__ import annotations

from ..errors import InvalidArgument
from .base import Backend

#: --backend's choices. cpu: quantized weights and numba kernels (what auto picks without a GPU);
#: numpy: the float32 reference the others are tested against (slow: every weight dequantized).
BACKENDS = ("auto", "cpu", "cuda", "numpy")
#: Backends whose memory is host RAM (--max-ram), as ModelInfo.backend names them.
HOST_BACKENDS = frozenset({"cpu", "numpy"})


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
    elif kind not in BACKENDS:
        raise InvalidArgument(f"unknown backend {kind!r} ({', '.join(BACKENDS)})", field="backend")
    from ..admission import ram_limit
    if kind == "numpy":
        from .numpy_backend import NumpyBackend
        return NumpyBackend(max_ram=ram_limit(max_ram))
    from .cpu_backend import CpuBackend
    return CpuBackend(max_ram=ram_limit(max_ram))


def idle_device(kind: str = "auto") -> tuple[str, dict | None]:
    """(device kind, GPU description) of a worker started with --backend kind that holds no model:
    what HardwareInfo reports before the first load. ("cpu", None) where no GPU would be used."""
    if kind in ("auto", "cuda"):
        try:
            from .cuda_context import cuda_present, device_info
            if cuda_present():
                return "cuda", device_info()
        except ImportError:
            pass
    return "cpu", None
