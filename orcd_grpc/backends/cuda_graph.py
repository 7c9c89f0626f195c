"""CUDA graphs for PyCUDA launches, through the driver API (PyCUDA has no graph API).

Kernels launched with `prepared_async_call` on a stream under capture are recorded instead of
run; replaying the instantiated graph costs about 1 µs per kernel instead of ~6 µs per Python
launch. Inside a capture there must be no allocation, no host<->device copy and no
synchronisation: every buffer a captured step touches is allocated before capture, and the
per-step inputs are written into those same buffers before each replay.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import threading

CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1

class _NoCyclicGC:
    """Keeps Python's cyclic collector off while any capture is in progress (on any thread), and
    restores what it was when the last one ends."""
    _lock = threading.Lock()
    _captures = 0
    _was_on = False

    def __enter__(self):
        cls = type(self)
        with cls._lock:
            if cls._captures == 0:
                cls._was_on = gc.isenabled()
                gc.disable()
            cls._captures += 1

    def __exit__(self, *exc):
        cls = type(self)
        with cls._lock:
            cls._captures -= 1
            if cls._captures == 0 and cls._was_on:
                gc.enable()


@functools.lru_cache(maxsize=None)
def _cu():
    lib = ctypes.CDLL("libcuda.so.1")
    for name in ("cuStreamBeginCapture_v2", "cuStreamEndCapture", "cuGraphInstantiateWithFlags",
                 "cuGraphLaunch", "cuGraphExecDestroy", "cuGraphDestroy", "cuGetErrorName", "cuEventCreate",
                 "cuEventRecord", "cuEventSynchronize", "cuEventDestroy_v2"):
        getattr(lib, name)  # fail at first use if the driver lacks one
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _cu().cuGetErrorName(result, ctypes.byref(name))
        from ..errors import Internal

        raise Internal(f"{what} failed: {name.value.decode() if name.value else result}")


class CudaGraph:
    """One captured sequence of launches on `stream`, replayable with `launch()`."""

    def __init__(self, stream, record):
        """Captures every launch `record()` makes on `stream`."""
        self.stream = stream
        h = ctypes.c_void_p(stream.handle)
        # Thread-local mode: other threads (the gRPC server's) may use CUDA meanwhile without
        # invalidating this capture.
        _check(_cu().cuStreamBeginCapture_v2(h, ctypes.c_int(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)),
               "cuStreamBeginCapture")
        graph = ctypes.c_void_p()
        self._graph, self._exec = ctypes.c_void_p(), ctypes.c_void_p()
        # No cyclic collection while capturing: it may free another engine's page-locked buffers
        # on this thread (a swapped-out model, a closed test engine), and cuMemFreeHost inside a
        # capture invalidates it ("operation failed due to a previous error during capture").
        try:
            with _NoCyclicGC():
                record()
        except BaseException:
            _cu().cuStreamEndCapture(h, ctypes.byref(graph))  # the stream must leave capture mode
            if graph:
                _cu().cuGraphDestroy(graph)
            raise
        _check(_cu().cuStreamEndCapture(h, ctypes.byref(graph)), "cuStreamEndCapture")
        self._graph = graph
        try:
            _check(_cu().cuGraphInstantiateWithFlags(ctypes.byref(self._exec), graph, ctypes.c_ulonglong(0)),
                   "cuGraphInstantiate")
        except BaseException:
            self.close()
            raise

    def launch(self) -> None:
        _check(_cu().cuGraphLaunch(self._exec, ctypes.c_void_p(self.stream.handle)), "cuGraphLaunch")

    def close(self) -> None:
        if self._exec:
            _cu().cuGraphExecDestroy(self._exec)
            self._exec = ctypes.c_void_p()
        if self._graph:
            _cu().cuGraphDestroy(self._graph)
            self._graph = ctypes.c_void_p()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class HostEvent:
    """A point on a stream the host can wait for without waiting for what was queued after it
    (stream.synchronize would), and with the GIL released while it waits (a ctypes call), so the
    server's threads run meanwhile."""

    CU_EVENT_DISABLE_TIMING = 2

    def __init__(self):
        self._ev = ctypes.c_void_p()
        _check(_cu().cuEventCreate(ctypes.byref(self._ev), ctypes.c_uint(self.CU_EVENT_DISABLE_TIMING)),
               "cuEventCreate")

    def record(self, stream) -> None:
        _check(_cu().cuEventRecord(self._ev, ctypes.c_void_p(stream.handle)), "cuEventRecord")

    def wait(self) -> None:
        _check(_cu().cuEventSynchronize(self._ev), "cuEventSynchronize")

    def close(self) -> None:
        if self._ev:
            _cu().cuEventDestroy_v2(self._ev)
            self._ev = ctypes.c_void_p()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
