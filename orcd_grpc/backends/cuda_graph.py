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


class _EdgeData(ctypes.Structure):
    """CUgraphEdgeData: which port of the source node the edge leaves from, and its type."""
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


_NODE_KERNEL = 0                # CU_GRAPH_NODE_TYPE_KERNEL
_PORT_PROGRAMMATIC = 1          # CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
_DEPENDENCY_PROGRAMMATIC = 1    # CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC


_EDGE_API = ("cuGraphGetEdges_v2", "cuGraphNodeGetType", "cuGraphKernelNodeGetParams_v2", "cuFuncGetName",
             "cuGraphRemoveDependencies_v2", "cuGraphAddDependencies_v2")


def _kernel_name(node) -> str | None:
    """The name of a kernel node's function, or None (not a kernel node, or a library kernel that the
    driver names by a CUkernel handle only)."""
    cu = _cu()
    kind = ctypes.c_int(-1)
    if cu.cuGraphNodeGetType(node, ctypes.byref(kind)) != 0 or kind.value != _NODE_KERNEL:
        return None
    params = (ctypes.c_ubyte * 256)()  # CUDA_KERNEL_NODE_PARAMS_v2; its first field is the CUfunction
    if cu.cuGraphKernelNodeGetParams_v2(node, params) != 0:
        return None
    func = ctypes.c_void_p.from_buffer(params).value
    if not func:
        return None
    name = ctypes.c_char_p()
    if cu.cuFuncGetName(ctypes.byref(name), ctypes.c_void_p(func)) != 0 or not name.value:
        return None
    return name.value.decode()


def make_programmatic(graph, ours) -> int:
    """Turns every kernel-to-kernel edge of `graph` whose destination is one of our kernels (`ours(name)`:
    a kernel that calls pdl_enter() first, cuda/common.cuh) into a programmatic dependency, so the
    destination is scheduled while its source still runs and waits on the device instead of behind a
    full launch. Edges into other nodes (copies, memsets, library kernels) stay full dependencies.
    Returns how many edges changed (0 where the driver predates edge data, CUDA 12.3)."""
    cu = _cu()
    if not all(hasattr(cu, f) for f in _EDGE_API):
        return 0
    n = ctypes.c_size_t(0)
    _check(cu.cuGraphGetEdges_v2(graph, None, None, None, ctypes.byref(n)), "cuGraphGetEdges")
    if not n.value:
        return 0
    src, dst = (ctypes.c_void_p * n.value)(), (ctypes.c_void_p * n.value)()
    data = (_EdgeData * n.value)()
    _check(cu.cuGraphGetEdges_v2(graph, src, dst, data, ctypes.byref(n)), "cuGraphGetEdges")
    names: dict = {}

    def name_of(node):
        if node not in names:
            names[node] = _kernel_name(ctypes.c_void_p(node))
        return names[node]

    changed = 0
    for i in range(n.value):
        if data[i].type != 0 or name_of(src[i]) is None:
            continue
        to = name_of(dst[i])
        if to is None or not ours(to):
            continue
        a, b = ctypes.c_void_p(src[i]), ctypes.c_void_p(dst[i])
        _check(cu.cuGraphRemoveDependencies_v2(graph, ctypes.byref(a), ctypes.byref(b), ctypes.byref(data[i]),
                                               ctypes.c_size_t(1)), "cuGraphRemoveDependencies")
        edge = _EdgeData(from_port=_PORT_PROGRAMMATIC, to_port=0, type=_DEPENDENCY_PROGRAMMATIC)
        _check(cu.cuGraphAddDependencies_v2(graph, ctypes.byref(a), ctypes.byref(b), ctypes.byref(edge),
                                            ctypes.c_size_t(1)), "cuGraphAddDependencies")
        changed += 1
    return changed


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _cu().cuGetErrorName(result, ctypes.byref(name))
        from ..errors import Internal

        raise Internal(f"{what} failed: {name.value.decode() if name.value else result}")


class CudaGraph:
    """One captured sequence of launches on `stream`, replayable with `launch()`."""

    def __init__(self, stream, record, programmatic=None):
        """Captures every launch `record()` makes on `stream`. programmatic: a predicate on kernel
        names; edges into the kernels it accepts become programmatic (make_programmatic)."""
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
        self.programmatic_edges = 0
        try:
            if programmatic is not None:
                self.programmatic_edges = make_programmatic(graph, programmatic)
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
