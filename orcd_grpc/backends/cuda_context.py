"""The process's CUDA context, the threads that use it, and what the device is.

One context per process (the device's primary context), made current in whichever thread calls
in (`_context`). Graph captures and the synchronous copies of a model loading beside a served
one take turns through `_capture_lock`. `DeviceLimits` holds the device facts that size launches
(SM count, L2), read from the device rather than assumed to be an H100's.
"""
from __future__ import annotations

import atexit
import dataclasses
import threading


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What launch planning needs to know of the device; CPU tests build one by hand."""
    sms: int = 132               # multiprocessors (an H100 SXM's, the default only where no device is asked)
    l2_bytes: int = 50 << 20     # L2 cache

    @classmethod
    def of(cls, device) -> "DeviceLimits":
        """Read from a pycuda Device."""
        import pycuda.driver as drv

        attr = drv.device_attribute
        l2 = getattr(attr, "L2_CACHE_SIZE", None)  # informational: a PyCUDA without it must not stop the start
        return cls(sms=int(device.get_attribute(attr.MULTIPROCESSOR_COUNT)),
                   l2_bytes=int(device.get_attribute(l2)) if l2 is not None else 0)


def cuda_present() -> bool:
    try:
        import pycuda.driver as drv

        drv.init()
        return drv.Device.count() > 0
    except Exception:
        return False



# ---- the process's context --------------------------------------------------------------------
_ctx_lock = threading.Lock()
# While a blocking stream captures a CUDA graph, the legacy default stream is unusable, and the
# synchronous copies, allocations and frees of a model loading or unloading in another thread
# use it (a second model loads beside the served one). Captures and those calls take turns.
_capture_lock = threading.RLock()


def _serialised(fn):
    def inner(*args, **kwargs):
        with _capture_lock:
            return fn(*args, **kwargs)
    inner.__name__, inner.__doc__ = fn.__name__, fn.__doc__
    return inner

_primary = None
_tls = threading.local()


class _Pushed:
    """The primary context pushed on one thread's PyCUDA context stack. PyCUDA aborts the
    process when a thread ends with a context still on its stack, and the worker's threads
    (model loading, the scheduler, gRPC handlers) end at unload and shutdown: the thread-local
    holding this object is cleared as its thread ends, before PyCUDA's check, and pops it."""

    __slots__ = ("active",)

    def __init__(self):
        self.active = True

    def pop(self):
        if self.active:
            self.active = False
            try:
                import pycuda.driver as drv

                drv.Context.pop()
            except Exception:
                pass

    __del__ = pop


def _context(device: int = 0):
    """The device's primary context, current in the calling thread."""
    global _primary
    import pycuda.driver as drv

    with _ctx_lock:
        if _primary is None:
            drv.init()
            _primary = drv.Device(device).retain_primary_context()
            atexit.register(_pop_all)
    if getattr(_tls, "guard", None) is None:
        _primary.push()
        _tls.guard = _Pushed()
    return _primary


def free_pinned(arr) -> None:
    """Frees a page-locked host array's allocation now (callers hold _capture_lock): left to the
    collector, its cuMemFreeHost could land inside another engine's graph capture and void it."""
    while arr is not None and not hasattr(arr, "free"):  # the array's HostAllocation
        arr = getattr(arr, "base", None)
    if arr is not None:
        arr.free()


def _pop_all():
    guard = getattr(_tls, "guard", None)
    if guard is not None:
        guard.pop()
        _tls.guard = None


def device_info(device: int = 0) -> dict:
    """The device as hardware.GPU_FIELDS describes it, free memory included (the process's
    context made current here: the first call creates it)."""
    import pycuda.driver as drv

    with _capture_lock:
        _context(device)
        free, total = drv.mem_get_info()
        dev = drv.Device(device)
        major, minor = dev.compute_capability()
        dv = drv.get_driver_version()  # e.g. 13000
        return {
            "name": dev.name(),
            "compute_capability": f"{major}.{minor}",
            "vram_total": int(total),
            "vram_free": int(free),
            "driver_version": _nvidia_driver() or f"{dv // 1000}.{(dv % 1000) // 10}",
            "cuda_version": ".".join(str(x) for x in drv.get_version()[:2]),  # what PyCUDA was built against
            "multiprocessors": DeviceLimits.of(dev).sms,
        }


def _nvidia_driver() -> str:
    """The kernel driver's version (e.g. 580.159.04); the CUDA API only reports its own."""
    try:
        with open("/proc/driver/nvidia/version") as fh:
            rest = fh.read().split("Kernel Module", 1)
        return rest[1].split()[0] if len(rest) == 2 and rest[1].split() else ""
    except OSError:
        return ""
