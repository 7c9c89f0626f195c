"""The CUDA backend: weights resident in VRAM, every op a kernel on one stream.

- One CUDA context per process (the device's primary context), made current in whichever thread
  calls in (cuda_context). Every byte held (weights, KV cache, step workspace, constants) is
  accounted in a VramBudget that honours `max_vram`; an allocation over it raises
  ResourceExhausted before any memory is touched.
- Activations are float32 CudaTensors carved from a workspace allocated up front (see
  cuda_memory.Workspace); per-step metadata (token ids, positions, slots, block tables...) is
  uploaded once in `begin_step` into one preallocated buffer (cuda_step). So the op sequence of a
  forward pass allocates nothing, copies nothing and never synchronises with the host: a decode
  step can be captured into a CUDA graph.
- Linear layers and embeddings run on the GGUF-format weights through cuda_quant (cuda_ops), and
  dense matmuls of many tokens on cuBLAS over weights decoded to f16 per call (cuda_blas); norms,
  rope, attention (paged, f16 KV cache; cuda_attention), activations and sampling (cuda_sampling)
  are the kernels in cuda/*.cu.
- The performance switches are one `Tuning` (orcd_grpc/tuning.py), read from the environment once
  when the backend is built unless one is passed; launch sizing uses the device's own SM count.
- A CUDA error becomes orcd_grpc.errors.Internal naming the kernel (launch errors directly;
  asynchronous faults at the next synchronisation, with the kernels launched since the last one;
  ORCD_CUDA_SYNC=1 synchronises after every launch to pin a fault on its kernel).

This module holds the backend's construction, kernel loading and launching, weights and memory;
the op groups are mixins over the same state, one module each.
"""
from __future__ import annotations

import collections
import math
import weakref

import numpy as np

from .. import logs, quants
from ..errors import Internal, InvalidArgument, ResourceExhausted
from ..tuning import Tuning
from .base import Backend, KVLayout
from .cuda_attention import AttentionMixin, CudaKV
from .cuda_context import DeviceLimits, _capture_lock, _context, _serialised, _tls, device_info, free_pinned
from .cuda_memory import ALIGN, MiB, DeviceBuffer, VramBudget, Workspace
from .cuda_ops import OpsMixin
from .cuda_sampling import SamplingMixin
from .cuda_step import StepMixin
from .cuda_tensor import CudaTensor

DEFAULT_WORKSPACE = 512 * MiB
CONTEXT_RESERVE = 384 * MiB  # left to the driver, module images, cuBLAS-free kernels' local memory

log = logs.get_logger("orcd.cuda")


class _Kernel:
    __slots__ = ("name", "fn")

    def __init__(self, name, fn, signature):
        self.name, self.fn = name, fn
        fn.prepare(signature)


class CudaBackend(StepMixin, AttentionMixin, OpsMixin, SamplingMixin, Backend):
    name = "cuda"
    kv_types = ("f16", "q8_0")
    kv_type = "f16"
    memory_name = "VRAM (--max-vram)"

    def __init__(self, max_vram: int = 0, device: int = 0, workspace_bytes: int | None = None,
                 tuning: Tuning | None = None):
        """tuning: the performance switches; None reads them from the environment, once, here."""
        with _capture_lock:
            self._init(max_vram, device, workspace_bytes, Tuning.from_env() if tuning is None else tuning)

    def _init(self, max_vram: int, device: int, workspace_bytes: int | None, tuning: Tuning):
        import pycuda.driver as drv

        self._drv = drv
        self.tuning = tuning
        self.device_index = device
        _context(device)
        self.device = drv.Device(device)
        self.limits = DeviceLimits.of(self.device)
        free, total = drv.mem_get_info()
        limit = max(0, free - CONTEXT_RESERVE)
        if max_vram and max_vram > 0:
            limit = min(limit, int(max_vram))
        self.budget = VramBudget(limit)
        self.stream = drv.Stream()
        # Every kernel module compiled (or found in the cache) now, in parallel, rather than one
        # by one at first use in the middle of a request.
        from .cuda_runtime import device_arch, precompile

        precompile(device_arch(), tuning)
        # pdl_enter()'s griddepcontrol exists from sm_90 on; below it a kernel would not wait on a
        # programmatic edge, so captured graphs keep full edges there.
        self._pdl = tuning.pdl and int(device_arch()[3:]) >= 90
        self._kernels: dict[str, _Kernel] = {}
        self._owned: "weakref.WeakSet[DeviceBuffer]" = weakref.WeakSet()
        self._weights: list = []
        self._recent = collections.deque(maxlen=16)  # kernels launched since the last sync
        self._sync_each = tuning.cuda_sync
        self._rope_cache: dict[int, tuple] = {}
        # Two pinned host twins of the step metadata and of the sampling buffers, used in turn: with
        # one step queued behind another (the CUDA runner's lookahead) the host fills the next step's twin while
        # the previous step's asynchronous copies may still read or fill the other.
        self._meta_buf: DeviceBuffer | None = None
        self._meta_hosts: list = [None, None]
        self._meta_turn = 0
        self._sample_bufs: list = [None, None]
        self._sample_hosts: list = [None, None]
        self._sample_events: list = [None, None]
        self._sample_turn = 0
        # attn_dec's per-(sequence, kv head) arrival counters: the last key-slice CTA merges the
        # partials itself (no attn_combine launch). Zeroed once; each merge resets its counter.
        self._attn_counters: DeviceBuffer | None = None
        self.closed = False
        # Sized by fit_workspace at load unless given (an argument, or ORCD_WORKSPACE_MB)
        self._ws_given = workspace_bytes is not None or bool(tuning.workspace_mb)
        if workspace_bytes is None:
            workspace_bytes = (tuning.workspace_mb * MiB if tuning.workspace_mb
                               else min(DEFAULT_WORKSPACE, max(64 * MiB, limit // 8)))
        self._ws_base = self.workspace_bytes = int(workspace_bytes)
        self.ws = Workspace(self._persistent(self.workspace_bytes, "step workspace"))
        self._ensure_meta(4096, 256, 256 * 64)
        self._blas = self._open_blas()
        self._f16_weights = tuning.gemm_f16_weights and self._blas is not None
        self._attr_set: set[str] = set()
        self._graphs: dict = {}   # key -> (CudaGraph, output tensor, workspace top after the step)
        self._graph_warm: set = set()
        self._graph_failed: set = set()

    # ---- infrastructure ----------------------------------------------------------------
    def _open_blas(self):
        """cuBLAS for the large dense matmuls (cuda_blas), with its workspace and device scalars, or
        None: switched off, or no libcublas here."""
        from . import cuda_blas

        lib = cuda_blas.library() if self.tuning.gemm_blas_min else None
        if lib is None:
            return None
        try:
            ws = self._persistent(cuda_blas.WORKSPACE_BYTES, "cuBLAS workspace")
            scalars = self._persistent(ALIGN, "cuBLAS scalars")
        except ResourceExhausted as exc:  # a small --max-vram: the fused GEMM serves every matmul
            log.warning("no room for cuBLAS's workspace; large matmuls keep the fused GEMM",
                        extra={"fields": {"error": str(exc)}})
            return None
        self._drv.memset_d32(scalars.ptr, 0, ALIGN // 4)  # beta = 0
        # Blas holds both buffers: _owned refers to them only weakly, and a dropped buffer is freed
        return cuda_blas.Blas(lib, self.stream.handle, ws, scalars)

    def _persistent(self, nbytes: int, what: str) -> DeviceBuffer:
        buf = DeviceBuffer(self.budget, nbytes, what)
        self._owned.add(buf)
        return buf

    def _k(self, module: str, name: str, signature: str) -> _Kernel:
        k = self._kernels.get(name)
        if k is None:
            from .cuda_runtime import load_module, module_options

            k = _Kernel(name, load_module(module, module_options(module, self.tuning)).get_function(name), signature)
            self._kernels[name] = k
        return k

    def _launch(self, k: _Kernel, grid, block, *args, shared: int = 0):
        if getattr(_tls, "guard", None) is None:
            _context(self.device_index)
        try:
            k.fn.prepared_async_call(grid, block, self.stream, *args, shared_size=shared)
        except self._drv.Error as exc:
            raise Internal(f"CUDA kernel {k.name} failed to launch: {exc}") from exc
        self._recent.append(k.name)
        if self._sync_each:
            self.synchronize(k.name)

    def synchronize(self, what: str | None = None) -> None:
        try:
            self.stream.synchronize()  # PyCUDA lets go of the GIL while it waits
        except self._drv.Error as exc:
            names = what or ", ".join(dict.fromkeys(self._recent)) or "?"
            raise Internal(f"CUDA error in kernel(s) {names}: {exc}") from exc
        self._recent.clear()

    def _q8_scratch(self, n: int) -> tuple[CudaTensor, CudaTensor]:
        """Room for n values rounded to int8 (n bytes) and their scales (one per 32), as quantize_x8
        and the *_q8 kernels write them. The caller holds both until their launches are queued: a
        dropped workspace block is handed out again at once."""
        return self._out((n // 4,)), self._out((n // 32,))

    def _out(self, shape, dtype=np.float32) -> CudaTensor:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        blk = self.ws.alloc(n)
        return CudaTensor(blk.ptr, shape, dtype, blk)

    def _check_open(self):
        if self.closed:
            raise Internal("CUDA backend is closed")

    def workspace_for(self, vocab_size: int, max_sequences: int) -> int:
        """The default workspace plus what a decode step of every sequence takes of it for logits
        and sampling (two float32 rows a sequence, max_step_tokens' reservation): otherwise many
        sequences of a large vocabulary leave a step's prefill chunk little room beside them."""
        if self._ws_given:
            return self.workspace_bytes
        want = self._ws_base + 2 * 4 * int(vocab_size) * max(1, int(max_sequences))
        return -(-want // MiB) * MiB

    @_serialised
    def fit_workspace(self, nbytes: int) -> None:
        if nbytes == self.workspace_bytes:
            return
        self._check_open()
        _context(self.device_index)
        self.synchronize()
        self._drop_graphs()  # captured at the old workspace's addresses
        old = self.ws.buf
        have = old.nbytes
        old.free()
        self._owned.discard(old)
        try:
            buf = self._persistent(nbytes, "step workspace")
        except BaseException:  # the budget or the device refused: the backend keeps a workspace
            self.ws = Workspace(self._persistent(have, "step workspace"))
            raise
        self.workspace_bytes = nbytes
        self.ws = Workspace(buf)

    # ---- information -------------------------------------------------------------------
    def memory_available(self) -> int:
        return self.budget.available

    def gpu_info(self) -> dict:
        return device_info(self.device_index)

    # ---- memory ------------------------------------------------------------------------
    def weight_nbytes(self, qtype, shape, raw_nbytes, name: str = ""):
        def aligned(n: int) -> int:
            return -(-int(n) // ALIGN) * ALIGN

        if len(shape) == 1 or name.endswith(".bias"):
            return max(ALIGN, aligned(int(np.prod(shape)) * 4))
        held = aligned(int(raw_nbytes) + 16)  # QuantWeight pads 16 bytes
        if self._keeps_f16(qtype, shape):
            from .cuda_blas import f16_nbytes

            held += aligned(f16_nbytes(int(shape[0]), int(shape[1])))
        return held

    def _keeps_f16(self, qtype, shape) -> bool:
        """Whether a weight also gets an f16 copy (ORCD_GEMM_F16_WEIGHTS): a 2-D one cuBLAS may take."""
        from .cuda_blas import takes

        return self._f16_weights and len(shape) == 2 and takes(qtype)

    @_serialised
    def load_weight(self, name, raw, qtype, shape):
        self._check_open()
        _context(self.device_index)
        shape = tuple(int(s) for s in shape)
        if len(shape) == 1 or name.endswith(".bias"):
            # Norm weights, biases (also per-expert [E, n] ones), sinks, rope factors: used
            # elementwise or as GEMV bias rows, so kept as float32.
            arr = quants.dequantize(raw, qtype, shape).astype(np.float32).reshape(shape)
            return self.from_host(arr, what=f"weight {name}")
        from .cuda_quant import QuantWeight

        need = self.weight_nbytes(qtype, shape, int(np.asarray(raw).nbytes), name)
        self.budget.reserve(need, f"weight {name}")  # refuse before QuantWeight allocates
        try:
            if len(shape) == 2:
                w = QuantWeight(raw, qtype, shape[0], shape[1])
                if self._keeps_f16(qtype, shape):
                    from .cuda_blas import keep_f16

                    try:
                        keep_f16(self, w)
                    except BaseException:
                        w.free()
                        raise
            elif len(shape) == 3:
                w = QuantWeight(raw, qtype, shape[1], shape[2], n_experts=shape[0])
            else:
                raise InvalidArgument(f"{len(shape)}-D weights are not supported", field=name)
        except BaseException:
            self.budget.release(need)
            raise
        w._orcd_reserved = need
        w._orcd_name = name
        self._weights.append(w)
        return w

    @_serialised
    def from_host(self, array, what: str = "constant"):
        self._check_open()
        _context(self.device_index)
        arr = np.ascontiguousarray(array, dtype=np.float32)
        buf = self._persistent(arr.nbytes, what)
        if arr.nbytes:
            self._drv.memcpy_htod(buf.ptr, arr)
        return CudaTensor(buf.ptr, arr.shape, np.float32, buf)

    @_serialised
    def to_host(self, x) -> np.ndarray:
        if not isinstance(x, CudaTensor):
            raise InvalidArgument(f"to_host takes a CudaTensor, got {type(x).__name__}", field="x")
        self.synchronize()
        out = np.empty(x.shape, x.dtype)
        if out.nbytes:
            try:
                self._drv.memcpy_dtoh(out, x.ptr)
            except self._drv.Error as exc:
                raise Internal(f"CUDA error copying a tensor to the host: {exc}") from exc
        return out

    @_serialised
    def alloc_kv(self, layout: KVLayout):
        self._check_open()
        return CudaKV(self, layout, self.kv_type)

    @_serialised
    def close(self) -> None:
        if self.closed:
            return
        try:
            _context(self.device_index)
            try:
                self.stream.synchronize()
            except Exception:
                pass
            for w in self._weights:
                free = getattr(w, "free", None)
                if callable(free):
                    free()
                self.budget.release(getattr(w, "_orcd_reserved", 0))
            self._weights.clear()
            self._drop_graphs()
            if getattr(self, "_blas", None) is not None:
                self._blas.close()
                self._blas = None
            for ev in self._sample_events:
                if ev is not None:
                    ev.close()
            for buf in list(self._owned):
                buf.free()
            for host in (*self._meta_hosts, *self._sample_hosts):  # under the capture lock (free_pinned)
                free_pinned(host)
            self._meta_hosts, self._sample_hosts = [None, None], [None, None]
            self._rope_cache.clear()
        finally:
            self.closed = True

    def runner(self, model):
        from .cuda_runner import CudaRunner

        return CudaRunner(self, model)
