"""VRAM accounting, persistent buffers and the per-step workspace arena.

Every byte the CUDA backend holds goes through a `VramBudget`: weights, the KV cache, the step
workspace and small constants. A request that would exceed the budget raises ResourceExhausted
*before* anything is allocated, so a refused model load leaves the backend as it was.

The workspace is one allocation made up front. Ops take their outputs from it through a caching
allocator (exact-size free lists, then a bump pointer), and a tensor's block returns to its free
list when its last view is dropped (CPython frees deterministically). Layers repeat the same
sizes, so after the first layer every op reuses blocks: a step does no cudaMalloc, and the same
step shape yields the same addresses, which is what CUDA-graph capture of a decode step needs.
`reset()` at the start of each step forgets everything handed out in the previous one.

Ownership is implicit: a block is handed out again as soon as its last Python reference goes
(Block.__del__), which is what keeps a step's footprint to its live tensors and its addresses
reproducible for graph capture. The device side is safe by stream order (a later writer of a
reused block is queued after its readers); the host side is the caller's: scratch that a launch
reads must stay referenced until that launch is queued (cuda_ops holds it in locals). This relies
on CPython's reference counting; a reference cycle through a tensor would only delay reuse.
"""
from __future__ import annotations

import threading

from ..errors import ResourceExhausted

ALIGN = 256  # bytes; keeps every tensor aligned for 16-byte vector loads (and cuBLAS-style 256)

MiB = 1 << 20


def _round(n: int) -> int:
    return (int(n) + ALIGN - 1) // ALIGN * ALIGN


class VramBudget:
    """How much VRAM this backend may hold, and how much it does."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0
        self._lock = threading.Lock()

    @property
    def available(self) -> int:
        return max(0, self.limit - self.used)

    def reserve(self, nbytes: int, what: str) -> None:
        with self._lock:
            if self.used + nbytes > self.limit:
                raise ResourceExhausted(
                    f"{what} needs {nbytes / MiB:.1f} MiB of VRAM but only {self.available / MiB:.1f} MiB "
                    f"of the {self.limit / MiB:.0f} MiB budget is left", field="max_vram")
            self.used += int(nbytes)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - int(nbytes))


class DeviceBuffer:
    """One accounted cudaMalloc; freed by `free()` (idempotent) or by the backend's close()."""

    __slots__ = ("alloc", "nbytes", "budget", "what", "__weakref__")

    def __init__(self, budget: VramBudget, nbytes: int, what: str):
        import pycuda.driver as drv

        nbytes = max(ALIGN, _round(nbytes))
        budget.reserve(nbytes, what)  # refuse before touching the driver
        try:
            self.alloc = drv.mem_alloc(nbytes)
        except drv.Error as exc:
            budget.release(nbytes)
            raise ResourceExhausted(f"{what}: cudaMalloc of {nbytes / MiB:.1f} MiB failed: {exc}",
                                    field="max_vram") from exc
        self.nbytes, self.budget, self.what = nbytes, budget, what

    @property
    def ptr(self) -> int:
        return int(self.alloc) if self.alloc is not None else 0

    def free(self) -> None:
        if self.alloc is not None:
            alloc, self.alloc = self.alloc, None
            try:
                alloc.free()
            finally:
                self.budget.release(self.nbytes)

    def __del__(self):  # a dropped constant returns its bytes to the budget too
        try:
            self.free()
        except Exception:
            pass


class Block:
    """A piece of the workspace; returns itself to the arena's free list when garbage."""

    __slots__ = ("arena", "ptr", "nbytes", "gen")

    def __init__(self, arena: "Workspace", ptr: int, nbytes: int, gen: int):
        self.arena, self.ptr, self.nbytes, self.gen = arena, ptr, nbytes, gen

    def __del__(self):
        arena = self.arena
        if arena is not None and arena.gen == self.gen:  # blocks of an earlier step are stale
            arena.free_lists.setdefault(self.nbytes, []).append(self.ptr)


class Workspace:
    def __init__(self, buf: DeviceBuffer):
        self.buf = buf
        self.base = buf.ptr
        self.size = buf.nbytes
        self.top = 0
        self.high_water = 0
        self.gen = 0
        self.free_lists: dict[int, list[int]] = {}

    def alloc(self, nbytes: int) -> Block:
        n = max(ALIGN, _round(nbytes))
        lst = self.free_lists.get(n)
        if lst:
            return Block(self, lst.pop(), n, self.gen)
        if self.top + n > self.size:
            # Fall back to any larger free block before giving up (sizes of a step are few).
            for size in sorted(s for s, l in self.free_lists.items() if l and s > n):
                return Block(self, self.free_lists[size].pop(), size, self.gen)
            raise ResourceExhausted(
                f"step workspace exhausted: {n / MiB:.1f} MiB more needed, {self.size / MiB:.0f} MiB "
                f"reserved; run fewer tokens per step or raise workspace_bytes", field="workspace")
        ptr = self.base + self.top
        self.top += n
        self.high_water = max(self.high_water, self.top)
        return Block(self, ptr, n, self.gen)

    def reset(self) -> None:
        """Forget the previous step's blocks (their memory is reused from the bottom again)."""
        self.gen += 1
        self.top = 0
        self.free_lists = {}

    def free(self) -> None:
        self.reset()
        self.buf.free()
