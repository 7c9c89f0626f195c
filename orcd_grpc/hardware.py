"""HardwareInfo: what this worker runs on (machine, accelerator, libraries, build).

Everything here is read from the OS and package metadata on each call, so the numbers that change
(free RAM, free VRAM) are current. GPU details come from the CUDA backend as a plain dict, which
keeps this module free of any PyCUDA import.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Mapping

from .buildinfo import build_info
from .proto import pb

# Distribution names (as pip knows them) reported in library_versions, under these keys.
LIBRARIES = {
    "grpcio": "grpcio",
    "protobuf": "protobuf",
    "numpy": "numpy",
    "gguf": "gguf",
    "tokenizers": "tokenizers",
    "jinja2": "jinja2",
    "pycuda": "pycuda",
}

GPU_FIELDS = ("name", "compute_capability", "vram_total", "vram_free", "driver_version",
              "cuda_version", "multiprocessors")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                # x86 says "model name"; some ARM kernels only give "Hardware" or "Processor".
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    # Affinity, not os.cpu_count(): a container limited to a few cores sees all of the host's.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def memory(meminfo: str = "/proc/meminfo") -> tuple[int, int]:
    """(total, available) system memory in bytes; zeros when /proc/meminfo is unreadable."""
    values: dict[str, int] = {}
    try:
        with open(meminfo) as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    scale = 1024 if parts[1:2] == ["kB"] else 1
                    values[key] = int(parts[0]) * scale
    except OSError:
        return 0, 0
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", 0))


def os_description() -> str:
    return f"{platform.system()} {platform.release()} {platform.machine()}".strip()


def library_versions() -> dict[str, str]:
    out = {}
    for key, dist in LIBRARIES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue  # optional ones (pycuda) are simply absent
    return out


def gpu_message(gpu: Mapping[str, Any], vram_used_by_worker: int = 0, vram_limit: int = 0) -> pb.GpuInfo:
    unknown = set(gpu) - set(GPU_FIELDS)
    if unknown:
        raise ValueError(f"gpu: unknown keys {sorted(unknown)}; expected some of {list(GPU_FIELDS)}")
    return pb.GpuInfo(
        name=str(gpu.get("name", "")),
        compute_capability=str(gpu.get("compute_capability", "")),
        vram_total_bytes=int(gpu.get("vram_total", 0)),
        vram_free_bytes=int(gpu.get("vram_free", 0)),
        vram_used_by_worker_bytes=int(vram_used_by_worker),
        vram_limit_bytes=int(vram_limit),
        driver_version=str(gpu.get("driver_version", "")),
        cuda_version=str(gpu.get("cuda_version", "")),
        multiprocessors=int(gpu.get("multiprocessors", 0)),
    )


def hardware_info(backend_name: str = "cpu", gpu: Mapping[str, Any] | None = None,
                  vram_used_by_worker: int = 0, vram_limit: int = 0) -> pb.HardwareInfoResponse:
    """Fills a HardwareInfoResponse for this process. `gpu` is the CUDA backend's description of
    its device (keys: GPU_FIELDS); None on the CPU backend, which leaves the gpu field empty."""
    if backend_name not in ("cpu", "cuda"):
        raise ValueError(f"backend_name: must be 'cpu' or 'cuda', got {backend_name!r}")
    total, available = memory()
    build = build_info()
    resp = pb.HardwareInfoResponse(
        backend=backend_name,
        cpu=pb.CpuInfo(model=cpu_model(), cores=cpu_cores()),
        ram_total_bytes=total,
        ram_available_bytes=available,
        os=os_description(),
        python_version=platform.python_version(),
        library_versions=library_versions(),
        build=pb.BuildInfo(version=build.version, git_commit=build.git_commit,
                           build_date=build.build_date),
    )
    if gpu is not None:
        resp.gpu.CopyFrom(gpu_message(gpu, vram_used_by_worker, vram_limit))
    return resp


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def _build_suffix(build: pb.BuildInfo) -> str:
    details = [d for d in (f"commit {build.git_commit[:12]}" if build.git_commit else "",
                           f"built {build.build_date}" if build.build_date else "") if d]
    return f" ({', '.join(details)})" if details else ""


def format_hardware_info(info: pb.HardwareInfoResponse) -> str:
    """Human-readable lines for `orcd info`."""
    lines = [
        f"backend:      {info.backend}",
        f"cpu:          {info.cpu.model} ({info.cpu.cores} cores available)",
        f"ram:          {format_bytes(info.ram_available_bytes)} available of {format_bytes(info.ram_total_bytes)}",
    ]
    if info.HasField("gpu") and info.gpu.name:
        g = info.gpu
        lines += [
            f"gpu:          {g.name} (compute {g.compute_capability}, {g.multiprocessors} SMs)",
            f"vram:         {format_bytes(g.vram_free_bytes)} free of {format_bytes(g.vram_total_bytes)}; "
            f"worker holds {format_bytes(g.vram_used_by_worker_bytes)}"
            + (f", limit {format_bytes(g.vram_limit_bytes)}" if g.vram_limit_bytes else ""),
            f"driver:       {g.driver_version} (CUDA {g.cuda_version})",
        ]
    lines += [
        f"os:           {info.os}",
        f"python:       {info.python_version}",
        "libraries:    " + ", ".join(f"{k} {v}" for k, v in sorted(info.library_versions.items())),
        f"orcd:         {info.build.version}" + _build_suffix(info.build),
    ]
    return "\n".join(lines)


def detect_gpu() -> dict | None:
    """The first CUDA device as a GPU_FIELDS dict, for `orcd info --local` (no worker, so no
    CUDA backend to ask); None when PyCUDA is missing or sees no GPU."""
    try:
        from .backends.cuda_context import cuda_present, device_info

        return device_info() if cuda_present() else None
    except Exception:  # no PyCUDA, no driver, or no device: all mean "no GPU here"
        return None
