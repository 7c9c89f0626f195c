"""The CUDA backend: weights resident in VRAM, every op a kernel on one stream.

- One CUDA context per process (the device's primary context), made current in whichever thread
  calls in. Every byte held (weights, KV cache, step workspace, constants) is accounted in a
  VramBudget that honours `max_vram`; an allocation over it raises ResourceExhausted before any
  memory is touched.
- Activations are float32 CudaTensors carved from a workspace allocated up front (see
  cuda_memory.Workspace); per-step metadata (token ids, positions, slots, block tables...) is
  uploaded once in `begin_step` into one preallocated buffer. So the op sequence of a forward
  pass allocates nothing, copies nothing and never synchronises with the host: a decode step can
  be captured into a CUDA graph.
- Linear layers and embeddings run on the GGUF-format weights through cuda_quant; norms, rope,
  attention (paged, f16 KV cache), activations and sampling are the kernels in cuda/*.cu.
- A CUDA error becomes orcd_grpc.errors.Internal naming the kernel (launch errors directly;
  asynchronous faults at the next synchronisation, with the kernels launched since the last one;
  ORCD_CUDA_SYNC=1 synchronises after every launch to pin a fault on its kernel).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import math
import os
import threading
import weakref

import numpy as np

from .. import logs, quants
from ..errors import Internal, InvalidArgument, OrcdError, ResourceExhausted
from .base import Backend, KVLayout, RopeSpec, StepMeta
from .cuda_memory import ALIGN, MiB, DeviceBuffer, VramBudget, Workspace
from .cuda_tensor import CudaTensor

DEFAULT_WORKSPACE = 512 * MiB
CONTEXT_RESERVE = 384 * MiB  # left to the driver, module images, cuBLAS-free kernels' local memory

log = logs.get_logger("orcd.cuda")

_ATTN_DPL = (1, 2, 3, 4, 5, 6, 8)  # attn_d<DPL> variants in attention.cu: head dims up to 32 * DPL
_ATTN_TARGET_CTAS = 264  # two per SM on an H100: enough decode attention CTAs to use its bandwidth
_ATTN_MAX_SPLITS = 32  # merge_split_row keeps a split per lane: at most 32
_ATTN_DEC_TARGET_CTAS = 528  # attn_dec CTAs are 4 warps: four per SM
_ATTN_COUNTERS = 1 << 16  # (sequence, kv head) pairs attn_dec can merge in-kernel (256 KiB of counters)


def _key_splits(target_ctas: int, pairs: int, most: int = _ATTN_MAX_SPLITS) -> int:
    """Key slices per (sequence, kv head) for a decode step: enough CTAs to reach target_ctas, at
    most `most`. A function of the batch shape only, so a captured graph stays valid as contexts grow."""
    return max(1, min(most, _ATTN_MAX_SPLITS, -(-target_ctas // pairs)))


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


def _pop_all():
    guard = getattr(_tls, "guard", None)
    if guard is not None:
        guard.pop()
        _tls.guard = None


def rope_inv_freq(spec: RopeSpec) -> tuple[np.ndarray, float]:
    """float64 inverse frequencies [dim/2] with freq factors and the YaRN mix folded in, and the
    factor on cos/sin; the same math as the NumPy reference's rope_angles."""
    half = spec.dim // 2
    inv_freq = spec.base ** (-np.arange(0, half, dtype=np.float64) * 2.0 / spec.dim)
    if spec.freq_factors is not None:
        inv_freq = inv_freq / np.asarray(spec.freq_factors, np.float64).ravel()[:half]
    mscale = float(spec.attn_factor)
    if spec.yarn is not None:
        y = spec.yarn

        def corr_dim(n_rot: float) -> float:
            return spec.dim * math.log(y.orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(spec.base))

        low, high = corr_dim(y.beta_fast), corr_dim(y.beta_slow)
        if getattr(y, "truncate", True):  # llama.cpp floors/ceils the ramp ends; gpt-oss does not
            low, high = math.floor(low), math.ceil(high)
        low, high = max(0.0, low), min(spec.dim - 1.0, high)
        ramp = (np.arange(half, dtype=np.float64) - low) / max(0.001, high - low)
        ramp_mix = (1.0 - np.clip(ramp, 0.0, 1.0)) * y.ext_factor
        inv_freq = inv_freq / y.factor * (1 - ramp_mix) + inv_freq * ramp_mix
        mscale *= y.attn_factor
    return inv_freq, mscale


def pack_sampling_row(temperature, top_k, top_p, min_p, seed, repetition_penalty=1.0, presence_penalty=0.0,
                      frequency_penalty=0.0) -> np.ndarray:
    """One row of sample.cu's RowParams (16 32-bit words); the counter (words 6-7) and the
    penalty slice (11-12) are the caller's, per step."""
    row = np.zeros(16, np.uint32)
    f = row.view(np.float32)
    seed = int(seed or 0) & ((1 << 64) - 1)
    f[0], f[2], f[3] = float(temperature), float(top_p), float(min_p)
    row[1] = np.uint32(int(top_k) & 0xFFFFFFFF)
    row[4], row[5] = seed & 0xFFFFFFFF, seed >> 32
    f[8], f[9], f[10] = float(repetition_penalty), float(presence_penalty), float(frequency_penalty)
    return row


def _nvidia_driver() -> str:
    """The kernel driver's version (e.g. 580.159.04); the CUDA API only reports its own."""
    try:
        with open("/proc/driver/nvidia/version") as fh:
            rest = fh.read().split("Kernel Module", 1)
        return rest[1].split()[0] if len(rest) == 2 and rest[1].split() else ""
    except OSError:
        return ""


class _Kernel:
    __slots__ = ("name", "fn")

    def __init__(self, name, fn, signature):
        self.name, self.fn = name, fn
        fn.prepare(signature)


class CudaKV:
    """Paged f16 cache: K [L, slots, Hkv, Dk] then V [L, slots, Hkv, Dv] in one allocation."""

    def __init__(self, backend: "CudaBackend", layout: KVLayout):
        self.layout = layout
        slots = layout.num_blocks * layout.block_size
        self.k_layer = slots * layout.n_kv_heads * layout.head_dim_k * 2
        self.v_layer = slots * layout.n_kv_heads * layout.head_dim_v * 2
        self.buf = backend._persistent(layout.n_layers * (self.k_layer + self.v_layer), "KV cache")
        self.k_base = self.buf.ptr
        self.v_base = self.buf.ptr + layout.n_layers * self.k_layer

    def k_ptr(self, layer: int) -> int:
        return self.k_base + layer * self.k_layer

    def v_ptr(self, layer: int) -> int:
        return self.v_base + layer * self.v_layer

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes


@dataclasses.dataclass
class SampleHandle:
    """A queued sample_packed: its host output view (valid once event has fired), the device
    address of its token ids, and the kernels to name if the wait reports a fault."""
    out: np.ndarray
    R: int
    nt: int
    tok_ptr: int
    event: object
    kernels: tuple = ()


class CudaStep:
    """What ops need of a step: the host meta and device pointers to its uploaded copies."""

    __slots__ = ("meta", "T", "B", "R", "max_q", "max_blocks", "block_size",
                 "token_ids", "positions", "q_starts", "ctx_lens", "slot_mapping", "block_tables", "logits_rows")

    def __getattr__(self, name):  # fall through to StepMeta fields (num_tokens, ...)
        return getattr(object.__getattribute__(self, "meta"), name)


class CudaBackend(Backend):
    name = "cuda"
    kv_elem_size = 2  # f16 KV cache
    memory_name = "VRAM (--max-vram)"
    supports_graphs = True
    pack_sampling_row = staticmethod(pack_sampling_row)  # the engine packs each sequence's row once

    def __init__(self, max_vram: int = 0, device: int = 0, workspace_bytes: int | None = None):
        with _capture_lock:
            self._init(max_vram, device, workspace_bytes)

    def _init(self, max_vram: int, device: int, workspace_bytes: int | None):
        import pycuda.driver as drv

        self._drv = drv
        self.device_index = device
        _context(device)
        self.device = drv.Device(device)
        free, total = drv.mem_get_info()
        limit = max(0, free - CONTEXT_RESERVE)
        if max_vram and max_vram > 0:
            limit = min(limit, int(max_vram))
        self.budget = VramBudget(limit)
        self.stream = drv.Stream()
        # Every kernel module compiled (or found in the cache) now, in parallel, rather than one
        # by one at first use in the middle of a request.
        from .cuda_runtime import device_arch, precompile

        precompile(device_arch())
        self._kernels: dict[str, _Kernel] = {}
        self._owned: "weakref.WeakSet[DeviceBuffer]" = weakref.WeakSet()
        self._weights: list = []
        self._recent = collections.deque(maxlen=16)  # kernels launched since the last sync
        self._sync_each = os.environ.get("ORCD_CUDA_SYNC") == "1"
        # ORCD_ATTN_SPLITS=N: at most N key slices per (sequence, kv head) in decode attention (1: one
        # CTA per head). An A/B knob: at B=1 qwen2.5 runs 32 slices of a few keys each for 2 kv heads
        cap = int(os.environ.get("ORCD_ATTN_SPLITS") or 0)  # 0 or unset: no cap
        self._max_splits = min(cap, _ATTN_MAX_SPLITS) if cap > 0 else _ATTN_MAX_SPLITS
        self._decode_attn = os.environ.get("ORCD_ATTN_DECODE") != "0"  # 0: decode steps use attn_dN (A/B)
        # Fusions: on where an H100 trace measured a gain (2026-11-23: qkv_rope_store -100 us and the
        # in-kernel merge -260 us per phi3-mini step, neither slower on qwen2.5-0.5b); the GLU and
        # norm folds made the GEMVs slower (phi3-mini +240 us, +1200 us) and stay opt-in.
        self._fuse_qkv_rope = os.environ.get("ORCD_FUSE_QKV_ROPE", "1") == "1"  # qkv_rope_store kernel
        self._fuse_glu = os.environ.get("ORCD_FUSE_GLU") == "1"  # the GLU inside the down GEMV (T = 1)
        self._fuse_norm = os.environ.get("ORCD_FUSE_NORM") == "1"  # RMSNorm inside the next GEMV (T = 1)
        # attn_dec serves decode steps of models with at most this many q heads per kv head. It took
        # phi3-mini (MHA) from 4,214 to 3,322 us per step, but GQA models stay on attn_dN + merge:
        # at B=1 (H100 traces, 2026-11-23) attn_dec took 19.1 us per layer against 12.5 + 3.3 for
        # qwen2.5-0.5b (group 7), 22.1 against 14.7 + 3.2 for gpt-oss-20b (group 8), even with
        # 128-key slices and the live-slice merge. ORCD_ATTN_DEC_MAX_GROUP=8: attn_dec for any group.
        self._dec_max_group = int(os.environ.get("ORCD_ATTN_DEC_MAX_GROUP", "1"))
        # ... and for any group when a step has at least this many (sequence, kv head) pairs: at
        # B=64, qwen2.5-0.5b (128 pairs) ran 8,998 tok/s with attn_dec against 8,029 without, and
        # gpt-oss-20b at B=32 (256 pairs) 1,224 against 1,193; at 64 pairs and fewer it was even or
        # slower (gpt-oss B=8: 563 against 574). Two runs of bench/run_all.sh, same day, H100.
        self._dec_min_heads = int(os.environ.get("ORCD_ATTN_DEC_MIN_HEADS", "128"))
        # attn_dN with batched staging loads (attn_dN_b): qwen2.5-0.5b's decode attention 13.0 -> 12.4 us
        # per layer, tg128 651 -> 688 tok/s (H100, 2026-11-23); ORCD_ATTN_BATCH_LOADS=0 turns it off
        self._attn_batch = os.environ.get("ORCD_ATTN_BATCH_LOADS", "1") == "1"
        # single rows out of RMSNorm and the fused GLU also written as int8 + scales, so the int8
        # GEMV that takes them needs no quantize launch: B=1 steps qwen2.5-0.5b 1,318 -> 1,245 us,
        # phi3-mini 2,680 -> 2,568 us (H100 traces, 2026-11-23); ORCD_FUSE_Q8=0 turns it off
        self._fuse_q8 = os.environ.get("ORCD_FUSE_Q8", "1") == "1"
        # a one-row split as views of its input (pointer offsets) instead of a copy kernel; =0 off
        self._split_views = os.environ.get("ORCD_SPLIT_VIEWS", "1") == "1"
        # rows up to which RMSNorm takes a block per row rather than a warp (A/B: 0 = always warps)
        self._norm_block_rows = int(os.environ.get("ORCD_NORM_BLOCK_ROWS", "256"))
        self._rope_cache: dict[int, tuple] = {}
        # Two pinned host twins of the step metadata and of the sampling buffers, used in turn: with
        # one step queued behind another (Engine lookahead) the host fills the next step's twin while
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
        self._merge_in_kernel = os.environ.get("ORCD_ATTN_MERGE", "1") == "1"
        self.closed = False
        if workspace_bytes is None:
            env = os.environ.get("ORCD_WORKSPACE_MB")
            workspace_bytes = int(env) * MiB if env else min(DEFAULT_WORKSPACE, max(64 * MiB, limit // 8))
        self.workspace_bytes = int(workspace_bytes)
        self.ws = Workspace(self._persistent(self.workspace_bytes, "step workspace"))
        self._ensure_meta(4096, 256, 256 * 64)
        self._attr_set: set[str] = set()
        self._graphs: dict = {}   # key -> (CudaGraph, output tensor, workspace top after the step)
        self._graph_warm: set = set()
        self._graph_failed: set = set()

    # ---- infrastructure ----------------------------------------------------------------
    def _persistent(self, nbytes: int, what: str) -> DeviceBuffer:
        buf = DeviceBuffer(self.budget, nbytes, what)
        self._owned.add(buf)
        return buf

    def _k(self, module: str, name: str, signature: str) -> _Kernel:
        k = self._kernels.get(name)
        if k is None:
            from .cuda_runtime import load_module

            k = _Kernel(name, load_module(module).get_function(name), signature)
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

    # ---- information -------------------------------------------------------------------
    def memory_available(self) -> int:
        return self.budget.available

    @_serialised
    def gpu_info(self) -> dict:
        drv = self._drv
        _context(self.device_index)
        free, total = drv.mem_get_info()
        major, minor = self.device.compute_capability()
        dv = drv.get_driver_version()  # e.g. 13000
        cv = drv.get_version()  # the CUDA version PyCUDA was built against, (13, 0, 0)
        return {
            "name": self.device.name(),
            "compute_capability": f"{major}.{minor}",
            "vram_total": int(total),
            "vram_free": int(free),
            "driver_version": _nvidia_driver() or f"{dv // 1000}.{(dv % 1000) // 10}",
            "cuda_version": ".".join(str(x) for x in cv[:2]),
            "multiprocessors": int(self.device.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)),
        }

    # ---- memory ------------------------------------------------------------------------
    def weight_nbytes(self, qtype, shape, raw_nbytes, name: str = ""):
        if len(shape) == 1 or name.endswith(".bias"):
            return max(ALIGN, -(-int(np.prod(shape)) * 4 // ALIGN) * ALIGN)
        try:
            from . import cuda_quant

            fn = getattr(cuda_quant, "weight_nbytes", None)
            if fn is not None:
                return int(fn(qtype, shape, raw_nbytes))
        except ImportError:
            pass
        return -(-(int(raw_nbytes) + 16) // ALIGN) * ALIGN  # QuantWeight pads 16 bytes

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
        return CudaKV(self, layout)

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
            for ev in self._sample_events:
                if ev is not None:
                    ev.close()
            for buf in list(self._owned):
                buf.free()
            self._rope_cache.clear()
        finally:
            self.closed = True

    # ---- per-step metadata ---------------------------------------------------------------
    def _ensure_meta(self, tokens: int, seqs: int, table: int):
        """One device buffer (and a pinned host twin) for every int32 array of a step."""
        need = 4 * tokens + 3 * seqs + table + 8 * 64
        have = self._meta_hosts[0].size if self._meta_buf is not None else 0
        if need <= have:
            return
        if self._meta_buf is not None:
            self.synchronize()  # a queued step may still read the old buffer
            self._drop_graphs()  # they read the metadata at the old buffer's address
            self._meta_buf.free()
        need = max(need, 2 * have)
        self._meta_buf = self._persistent(need * 4, "step metadata")
        self._meta_hosts = [self._drv.pagelocked_empty(need, np.int32) for _ in range(2)]

    def begin_step(self, meta: StepMeta, feed=None, overlap: bool = False):
        """Uploads the step's metadata. overlap: queue it behind the steps already on the stream
        instead of waiting for them (stream order keeps the device buffers safe; the host twins
        alternate). feed: a SampleHandle whose sampled tokens become this step's first token ids,
        copied on the device, so the step can be queued before the host has read them."""
        self._check_open()
        _context(self.device_index)
        T, B = meta.num_tokens, meta.num_seqs
        tables = np.ascontiguousarray(meta.block_tables, np.int32).reshape(B, -1)
        rows = np.asarray(meta.logits_rows, np.int32)
        if not overlap:
            self.synchronize()
        self.ws.reset()
        self._ensure_meta(max(T, rows.size), B + 1, tables.size)
        st = CudaStep()
        st.meta, st.T, st.B, st.R = meta, T, B, int(rows.size)
        qs = np.asarray(meta.q_starts, np.int32)
        st.max_q = int(np.max(np.diff(qs))) if B else 0
        st.max_blocks, st.block_size = int(tables.shape[1]), int(meta.block_size)
        self._meta_turn ^= 1
        host, base, off = self._meta_hosts[self._meta_turn], self._meta_buf.ptr, 0
        for field, arr in (("token_ids", meta.token_ids), ("positions", meta.positions), ("q_starts", qs),
                           ("ctx_lens", meta.ctx_lens), ("slot_mapping", meta.slot_mapping),
                           ("block_tables", tables), ("logits_rows", rows)):
            a = np.asarray(arr, np.int32).ravel()
            host[off: off + a.size] = a
            setattr(st, field, base + off * 4)
            off += -(-max(a.size, 1) // 64) * 64  # 256-byte aligned segments
        self._drv.memcpy_htod_async(base, host[:off], self.stream)
        if feed is not None:
            if feed.R > T:
                raise Internal(f"a step of {T} tokens cannot take {feed.R} fed tokens")
            self._drv.memcpy_dtod_async(st.token_ids, feed.tok_ptr, 4 * feed.R, self.stream)
        return st

    # ---- CUDA graphs ----------------------------------------------------------------------
    def graph_ready(self, key) -> bool:
        """Whether `key` replays a captured graph (what Engine lookahead queues steps on)."""
        return key in self._graphs and not self._sync_each

    def graph_step(self, key, meta: StepMeta, record, feed=None, overlap: bool = False):
        """Runs `record(ctx)` (a forward pass that only launches kernels) for this step's meta,
        replaying a CUDA graph captured for `key`. Every meta given with one key must have the
        same shapes: then the step's metadata and workspace land at the addresses the graph
        was captured with. The first step of a key runs eagerly (loading modules, rope tables
        and kernel attributes, which a capture must not do); the second is captured."""
        from .cuda_graph import CudaGraph

        ctx = self.begin_step(meta, feed=feed, overlap=overlap)
        hit = self._graphs.get(key)
        if hit is None:
            if key not in self._graph_warm or key in self._graph_failed or self._sync_each:
                self._graph_warm.add(key)
                return record(ctx)
            box = []
            try:
                with _capture_lock:
                    graph = CudaGraph(self.stream, lambda: box.append(record(ctx)))
            except OrcdError:
                raise  # e.g. the step workspace ran out: the same eagerly
            except Exception as exc:
                # This bucket runs eagerly from now on rather than failing every step; the
                # metadata is already on the device, so the step itself can still run.
                log.warning("CUDA graph capture failed; running that batch size eagerly",
                            extra={"fields": {"key": str(key), "error": str(exc)}})
                self._graph_failed.add(key)
                self.ws.reset()
                return record(ctx)
            hit = self._graphs[key] = (graph, box[0], self.ws.top)
        graph, out, top = hit
        try:
            graph.launch()
        except Exception as exc:
            raise Internal(f"CUDA graph {key} failed to launch: {exc}") from exc
        self._recent.append(f"graph {key}")
        self.ws.top = max(self.ws.top, top)  # what runs after it in this step must not overlap
        return out

    def _drop_graphs(self) -> None:
        for graph, *_ in self._graphs.values():
            graph.close()
        self._graphs.clear()
        self._graph_warm.clear()

    # ---- ops -----------------------------------------------------------------------------
    def embed(self, w, ctx: CudaStep):
        from . import cuda_quant

        y = self._out((ctx.T, w.k))
        self._quant_call("embed", cuda_quant.embed, ctx.token_ids, w, y.ptr, ctx.T, self.stream)
        return y

    def linear(self, x, w, bias=None):
        from . import cuda_quant

        T = math.prod(x.shape[:-1])
        if x.shape[-1] != w.k:
            raise InvalidArgument(f"linear: input has {x.shape[-1]} features, weight "
                                  f"{getattr(w, '_orcd_name', '?')} expects {w.k}", field="x")
        y = self._out((T, w.n))
        # int8 input: the quantized row and its scales, from x's producer (ORCD_FUSE_Q8) or made here
        x8, ready = None, False
        if cuda_quant.i8_eligible(w, T):
            ready = x.q8 is not None
            xq, xd = x.q8 if ready else self._q8_scratch(w.k)
            x8 = (xq.ptr, xd.ptr)
        self._quant_call("matmul", cuda_quant.matmul, x.ptr, w, y.ptr, T, self.stream,
                         bias_ptr=bias.ptr if bias is not None else None, x8=x8, x8_ready=ready)
        return y

    def rms_norm_linear(self, x, w_norm, eps, residual, w, bias=None):
        from . import cuda_quant

        T, d = math.prod(x.shape[:-1]), x.shape[-1]
        if (T != 1 or not self._fuse_norm or d != w.k or d % 4 or w_norm.size != d
                or (residual is not None and residual.shape != x.shape)):
            return super().rms_norm_linear(x, w_norm, eps, residual, w, bias)
        y = self._out((T, w.n))
        s = self._out(x.shape) if residual is not None else x
        self._quant_call("matmul", cuda_quant.matmul, x.ptr, w, y.ptr, T, self.stream,
                         bias_ptr=bias.ptr if bias is not None else None,
                         norm=(residual.ptr if residual is not None else None, w_norm.ptr, float(eps),
                               s.ptr if residual is not None else None))
        return y, s

    def linear_glu(self, x, w, act: str = "silu"):
        from . import cuda_quant

        T = math.prod(x.shape[:-1])
        if T != 1 or not self._fuse_glu or act not in cuda_quant.GLU_ACTS or x.shape[-1] != 2 * w.k:
            return super().linear_glu(x, w, act)
        y = self._out((T, w.n))
        self._quant_call("matmul", cuda_quant.matmul, x.ptr, w, y.ptr, T, self.stream, act=act)
        return y

    def _quant_call(self, what, fn, *args, **kw):
        if getattr(_tls, "guard", None) is None:
            _context(self.device_index)
        try:
            fn(*args, **kw)
        except self._drv.Error as exc:
            raise Internal(f"CUDA {what} kernel failed: {exc}") from exc
        self._recent.append(what)
        if self._sync_each:
            self.synchronize(what)

    def rms_norm(self, x, w, eps, residual=None):
        d = x.shape[-1]
        rows = x.size // d
        out = self._out(x.shape)
        s = self._out(x.shape) if residual is not None else x
        vec = int(d % 4 == 0)
        args = (x.ptr, residual.ptr if residual is not None else 0, s.ptr if residual is not None else 0,
                out.ptr, w.ptr, np.int32(rows), np.int32(d), np.float32(eps), np.int32(vec))
        if d <= 1024 and rows > self._norm_block_rows:
            k = self._k("norm", "rms_norm_warp", "PPPPPiifi")
            self._launch(k, (-(-rows // 8), 1, 1), (256, 1, 1), *args)
        else:  # few rows: a block per row, or one warp walks the whole row alone (4.5 us at d = 896)
            threads = 512 if d > 4096 else 256 if d > 1024 else max(32, -(-d // 4 // 32) * 32)
            if self._fuse_q8 and rows == 1 and d % 32 == 0:
                out.q8 = self._q8_scratch(d)
                k = self._k("norm", "rms_norm_block_q8", "PPPPPiifPP")
                self._launch(k, (rows, 1, 1), (threads, 1, 1), *args[:-1], out.q8[0].ptr, out.q8[1].ptr)
            else:
                k = self._k("norm", "rms_norm_block", "PPPPPiifi")
                self._launch(k, (rows, 1, 1), (threads, 1, 1), *args)
        return out, s

    def _rope_table(self, spec: RopeSpec):
        hit = self._rope_cache.get(id(spec))
        if hit is not None and hit[0] is spec:
            return hit[1], hit[2]
        inv_freq, mscale = rope_inv_freq(spec)
        arr = np.ascontiguousarray(inv_freq, np.float64)
        buf = self._persistent(arr.nbytes, "rope table")
        self._drv.memcpy_htod(buf.ptr, arr)
        self._rope_cache[id(spec)] = (spec, buf, float(mscale))  # holding spec keeps its id unique
        return buf, float(mscale)

    def rope(self, x, ctx: CudaStep, spec: RopeSpec):
        T, H, D = x.shape
        buf, mscale = self._rope_table(spec)
        y = self._out(x.shape)
        rot = int(spec.dim)
        total = T * H * (D - rot // 2)
        k = self._k("rope", "rope_f32", "PPPPiiiiif")
        self._launch(k, (max(1, -(-total // 256)), 1, 1), (256, 1, 1), x.ptr, y.ptr, ctx.positions, buf.ptr,
                     np.int32(T), np.int32(H), np.int32(D), np.int32(rot), np.int32(1 if spec.neox else 0),
                     np.float32(mscale))
        return y

    def rope_pair(self, q, k, ctx: CudaStep, spec: RopeSpec):
        T, Hq, D = q.shape
        Hk = k.shape[1]
        if k.shape[0] != T or k.shape[2] != D:
            return self.rope(q, ctx, spec), self.rope(k, ctx, spec)
        buf, mscale = self._rope_table(spec)
        yq, yk = self._out(q.shape), self._out(k.shape)
        rot = int(spec.dim)
        total = T * (Hq + Hk) * (D - rot // 2)
        kern = self._k("rope", "rope_pair_f32", "PPPPPPiiiiiif")
        self._launch(kern, (max(1, -(-total // 256)), 1, 1), (256, 1, 1), q.ptr, yq.ptr, k.ptr, yk.ptr,
                     ctx.positions, buf.ptr, np.int32(T), np.int32(Hq), np.int32(Hk), np.int32(D), np.int32(rot),
                     np.int32(1 if spec.neox else 0), np.float32(mscale))
        return yq, yk

    def store_kv(self, k, v, kv: CudaKV, layer, ctx: CudaStep):
        T, Hkv, Dk = k.shape
        Dv = v.shape[2]
        if T:
            kst = self._k("attention", "kv_store_f16", "PPPPPiiii")
            per = Hkv * (Dk + Dv)
            self._launch(kst, (max(1, min(-(-per // 256), 64)), T, 1), (256, 1, 1), k.ptr, v.ptr, ctx.slot_mapping,
                         kv.k_ptr(layer), kv.v_ptr(layer), np.int32(T), np.int32(Hkv), np.int32(Dk), np.int32(Dv))

    def qkv_rope_store(self, qkv, kv: CudaKV, layer, ctx: CudaStep, spec: RopeSpec, n_heads, n_kv_heads, head_dim,
                       head_dim_v):
        """One kernel: the q part roped into a new tensor, k roped and v converted to f16 straight
        into the cache (split + rope + kv store were three launches per layer)."""
        T = qkv.shape[0]
        L = kv.layout
        if (not self._fuse_qkv_rope or qkv.shape[-1] != (n_heads + n_kv_heads) * head_dim + n_kv_heads * head_dim_v
                or (L.n_kv_heads, L.head_dim_k, L.head_dim_v) != (n_kv_heads, head_dim, head_dim_v)):
            return super().qkv_rope_store(qkv, kv, layer, ctx, spec, n_heads, n_kv_heads, head_dim, head_dim_v)
        buf, mscale = self._rope_table(spec)
        q = self._out((T, n_heads, head_dim))
        if T:
            rot = int(spec.dim)
            per = (n_heads + n_kv_heads) * (head_dim - rot // 2) + n_kv_heads * head_dim_v
            kern = self._k("rope", "qkv_rope_store_f32", "PPPPPPPiiiiiiif")
            self._launch(kern, (max(1, min(-(-per // 256), 32)), T, 1), (256, 1, 1), qkv.ptr, q.ptr, kv.k_ptr(layer),
                         kv.v_ptr(layer), ctx.positions, ctx.slot_mapping, buf.ptr, np.int32(T), np.int32(n_heads),
                         np.int32(n_kv_heads), np.int32(head_dim), np.int32(head_dim_v), np.int32(rot),
                         np.int32(1 if spec.neox else 0), np.float32(mscale))
        return q

    def attention(self, q, k, v, kv: CudaKV, layer, ctx: CudaStep, *, scale, window=0, sinks=None, softcap=0.0):
        T, Hq, Dk = q.shape
        L = kv.layout
        Hkv, Dv = L.n_kv_heads, L.head_dim_v
        if Dk != L.head_dim_k or (k is not None and k.shape[1:] != (Hkv, Dk)) or Dk % 2 or Dv % 2 or Hq % Hkv:
            raise InvalidArgument(f"attention shapes q{q.shape} k{None if k is None else k.shape} do not fit the "
                                  f"cache ({Hkv} kv heads, dims {L.head_dim_k}/{Dv})", field="attention")
        if k is not None:
            self.store_kv(k, v, kv, layer, ctx)
        out = self._out((T, Hq * Dv))
        if T == 0:
            return out
        group = Hq // Hkv
        if (ctx.max_q == 1 and self._decode_attn and Dk % 8 == 0 and Dk <= 256 and Dv <= 256 and group <= 8
                and (group <= self._dec_max_group or ctx.B * Hkv >= self._dec_min_heads)):
            return self._decode_attention(q, kv, layer, ctx, out, Hq, Hkv, Dk, Dv, group, scale, window, sinks,
                                          softcap)
        dpl_need = -(-max(Dk, Dv) // 32)
        dpl = next((d for d in _ATTN_DPL if d >= dpl_need), None)
        if dpl is None:
            raise InvalidArgument(f"head dim {max(Dk, Dv)} exceeds the attention kernel's 256", field="attention")
        name = f"attn_d{dpl}_b" if self._attn_batch else f"attn_d{dpl}"
        kern = self._k("attention", name, "PPPPPPPPiiiiiifiPfiP")
        smem = 4 * (32 * Dk + 32 * (Dk + 1) + 32 * Dv)
        if smem > 48 * 1024 and (name, smem) not in self._attr_set:
            kern.fn.set_attribute(self._drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            self._attr_set.add((name, smem))
        tiles = max(1, -(-ctx.max_q * group // 32))
        # Decode (one tile of rows per sequence): B * Hkv CTAs cannot fill the GPU, so the keys
        # are split across CTAs and merged by attn_combine (flash-decoding). The split count
        # depends only on the batch shape, so a captured graph stays valid as contexts grow.
        splits = 1
        if tiles == 1:
            splits = _key_splits(_ATTN_TARGET_CTAS, ctx.B * Hkv, self._max_splits)
        part = self._out((T * Hq, splits, Dv + 2)) if splits > 1 else None
        self._launch(kern, (splits if splits > 1 else tiles, ctx.B, Hkv), (256, 1, 1), q.ptr, kv.k_ptr(layer),
                     kv.v_ptr(layer), out.ptr, ctx.q_starts, ctx.positions, ctx.ctx_lens, ctx.block_tables,
                     np.int32(ctx.max_blocks), np.int32(ctx.block_size), np.int32(Hq), np.int32(Hkv), np.int32(Dk),
                     np.int32(Dv), np.float32(scale), np.int32(window or 0), sinks.ptr if sinks is not None else 0,
                     np.float32(softcap or 0.0), np.int32(splits), part.ptr if part is not None else 0, shared=smem)
        if part is not None:
            self._combine(part, out, sinks, T * Hq, Hq, Dv, splits)
        return out

    def _combine(self, part, out, sinks, rows, Hq, Dv, splits):
        """attn_combine: merges the split-key partials of `rows` (token, q head) rows into out."""
        comb = self._k("attention", "attn_combine", "PPPiiii")
        self._launch(comb, (-(-rows // 8), 1, 1), (256, 1, 1), part.ptr, out.ptr, sinks.ptr if sinks is not None else 0,
                     np.int32(rows), np.int32(Hq), np.int32(Dv), np.int32(splits))

    def _decode_attention(self, q, kv, layer, ctx, out, Hq, Hkv, Dk, Dv, group, scale, window, sinks, softcap):
        """A step of decode tokens only: attn_dec_g<GM>_n<NC>, one 4-warp CTA per (key slice, sequence,
        kv head). As with attn_dN, the split count depends only on the batch shape (graph-safe)."""
        gm = next(g for g in (1, 2, 4, 8) if g >= group)
        kern = self._k("attention", f"attn_dec_g{gm}_n{-(-Dv // 64)}", "PPPPPPPPiiiiiifiPfiPP")
        splits = _key_splits(_ATTN_DEC_TARGET_CTAS, ctx.B * Hkv, self._max_splits)
        part = self._out((ctx.T * Hq, splits, Dv + 2)) if splits > 1 else None
        counters = 0
        if part is not None and self._merge_in_kernel and ctx.B * Hkv <= _ATTN_COUNTERS:
            if self._attn_counters is None:  # first decode step: eager, never inside a graph capture
                self._attn_counters = self._persistent(4 * _ATTN_COUNTERS, "attention counters")
                self._drv.memset_d32(self._attn_counters.ptr, 0, _ATTN_COUNTERS)
            counters = self._attn_counters.ptr
        self._launch(kern, (splits, ctx.B, Hkv), (128, 1, 1), q.ptr, kv.k_ptr(layer), kv.v_ptr(layer), out.ptr,
                     ctx.q_starts, ctx.positions, ctx.ctx_lens, ctx.block_tables, np.int32(ctx.max_blocks),
                     np.int32(ctx.block_size), np.int32(Hq), np.int32(Hkv), np.int32(Dk), np.int32(Dv),
                     np.float32(scale), np.int32(window or 0), sinks.ptr if sinks is not None else 0,
                     np.float32(softcap or 0.0), np.int32(splits), part.ptr if part is not None else 0, counters)
        if part is not None and not counters:
            self._combine(part, out, sinks, ctx.T * Hq, Hq, Dv, splits)
        return out

    def _binary(self, name, a, b, s=0.0):
        if b is not None and a.shape != b.shape:
            raise InvalidArgument(f"{name}: shapes {a.shape} and {b.shape} differ", field=name)
        y = self._out(a.shape)
        n = a.size
        k = self._k("elementwise", name, "PPPqf")
        work = n // 4 if n % 4 == 0 else n
        self._launch(k, (max(1, min(-(-work // 256), 4096)), 1, 1), (256, 1, 1), a.ptr,
                     b.ptr if b is not None else 0, y.ptr, np.int64(n), np.float32(s))
        return y

    def silu_mul(self, gate, up):
        return self._binary("silu_mul_f32", gate, up)

    def gelu_mul(self, gate, up):
        return self._binary("gelu_mul_f32", gate, up)

    def add(self, a, b):
        return self._binary("add_f32", a, b)

    def scale(self, x, s):
        return self._binary("scale_f32", x, None, s)

    def gather_rows(self, x, ctx: CudaStep):
        d = x.size // x.shape[0]
        y = self._out((ctx.R, *x.shape[1:]))
        if ctx.R:
            k = self._k("elementwise", "gather_rows_f32", "PPPii")
            self._launch(k, (max(1, min(-(-d // 256), 16)), ctx.R, 1), (256, 1, 1), x.ptr, ctx.logits_rows, y.ptr,
                         np.int32(ctx.R), np.int32(d))
        return y

    def glu_fused(self, x, act: str = "silu"):
        rows, F = x.size // x.shape[-1], x.shape[-1] // 2
        y = self._out((*x.shape[:-1], F))
        if self._fuse_q8 and rows == 1 and F % 32 == 0:
            y.q8 = self._q8_scratch(F)
            k = self._k("elementwise", "silu_halves_q8" if act == "silu" else "gelu_halves_q8", "PPPPi")
            self._launch(k, (-(-F // 256), 1, 1), (256, 1, 1), x.ptr, y.ptr, y.q8[0].ptr, y.q8[1].ptr, np.int32(F))
            return y
        k = self._k("elementwise", "silu_halves_f32" if act == "silu" else "gelu_halves_f32", "PPii")
        if rows and F:
            self._launch(k, (max(1, min(-(-(rows * F) // 256), 4096)), 1, 1), (256, 1, 1), x.ptr, y.ptr,
                         np.int32(rows), np.int32(F))
        return y

    def split(self, x, sizes):
        rows, width = x.size // x.shape[-1], x.shape[-1]
        if sum(sizes) != width:
            raise InvalidArgument(f"split sizes {sizes} do not add up to {width}", field="sizes")
        if self._split_views and rows == 1 and all(w % 4 == 0 for w in sizes):
            # one row: each piece is contiguous already; 16-byte aligned offsets keep vector loads legal
            offs = np.cumsum([0, *sizes[:-1]])
            return [CudaTensor(x.ptr + 4 * int(o), (*x.shape[:-1], w), x.dtype, x.owner) for o, w in zip(offs, sizes)]
        if 1 < len(sizes) <= 3 and rows:  # one launch for all pieces
            outs = [self._out((*x.shape[:-1], w)) for w in sizes]
            ptrs = [o.ptr for o in outs] + [0] * (3 - len(sizes))
            ws = list(sizes) + [0] * (3 - len(sizes))
            k = self._k("elementwise", "split3_f32", "PPPPiiiii")
            self._launch(k, (max(1, min(-(-max(sizes) // 1024), 8)), rows, len(sizes)), (256, 1, 1), x.ptr, *ptrs,
                         np.int32(rows), np.int32(width), *(np.int32(w) for w in ws))
            return outs
        k = self._k("elementwise", "copy_cols_f32", "PPiiii")
        outs, col = [], 0
        for w in sizes:
            y = self._out((*x.shape[:-1], w))
            if rows and w:
                self._launch(k, (max(1, min(-(-w // 1024), 8)), rows, 1), (256, 1, 1), x.ptr, y.ptr,
                             np.int32(rows), np.int32(width), np.int32(col), np.int32(w))
            outs.append(y)
            col += w
        return outs

    def moe(self, x, router_logits, k, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, *,
            act="silu", alpha=1.702, limit=7.0):
        from . import cuda_quant

        T, d = x.shape
        E = router_logits.shape[-1]
        if not 0 < k <= min(E, 32) or act not in ("silu", "swiglu_oai"):
            raise InvalidArgument(f"moe: k={k} of {E} experts, act={act!r}", field="moe")
        F = w_gate.n
        ids = self._out((T, k), np.int32)
        wts = self._out((T, k))
        self._launch(self._k("moe", "moe_route", "PiiiPP"), (max(1, -(-T // 8)), 1, 1), (256, 1, 1),
                     router_logits.ptr, np.int32(T), np.int32(E), np.int32(k), ids.ptr, wts.ptr)
        g, u = self._out((T, k, F)), self._out((T, k, F))
        bp = lambda b: b.ptr if b is not None else None  # noqa: E731
        # many slots per expert: grouped GEMM (slots sorted by expert once, on the device, into an int32
        # workspace shared by the three projections); few: one GEMV per slot
        ne = w_gate.n_experts or E
        grouped = (cuda_quant.moe_use_grouped(T, k, ne)
                   and all(w.n_experts == ne for w in (w_gate, w_up, w_down)))
        # (kept referenced until the down projection is queued: a dropped block is reused by the next _out)
        gws = self._out((cuda_quant.moe_workspace_ints(T, k, ne),), np.int32) if grouped else None
        gkw = dict(workspace_ptr=gws.ptr if grouped else None, grouped=grouped)
        # int8 input for the per-slot GEMVs (ORCD_MOE_INT8): one quantized copy of x serves gate and up
        x8 = xs = None
        if cuda_quant.moe_i8_eligible(w_gate, grouped) and cuda_quant.moe_i8_eligible(w_up, grouped):
            xs = self._q8_scratch(T * d)
            x8 = (xs[0].ptr, xs[1].ptr)
        self._quant_call("moe_matmul", cuda_quant.moe_matmul, x.ptr, w_gate, ids.ptr, g.ptr, T, k, self.stream,
                         bias_ptr=bp(b_gate), x8=x8, **gkw)
        self._quant_call("moe_matmul", cuda_quant.moe_matmul, x.ptr, w_up, ids.ptr, u.ptr, T, k, self.stream,
                         bias_ptr=bp(b_up), grouped_ready=grouped, x8=x8, x8_ready=x8 is not None, **gkw)
        a = self._out((T, k, F))
        n = T * k * F
        self._launch(self._k("moe", "moe_act", "PPPqiff"), (max(1, min(-(-n // 256), 4096)), 1, 1), (256, 1, 1),
                     g.ptr, u.ptr, a.ptr, np.int64(n), np.int32(act == "swiglu_oai"), np.float32(alpha),
                     np.float32(limit))
        y = self._out((T, k, d))
        a8 = a_s = None
        if cuda_quant.moe_i8_eligible(w_down, grouped):
            a_s = self._q8_scratch(T * k * F)
            a8 = (a_s[0].ptr, a_s[1].ptr)
        self._quant_call("moe_matmul", cuda_quant.moe_matmul, a.ptr, w_down, ids.ptr, y.ptr, T, k, self.stream,
                         bias_ptr=bp(b_down), x_per_slot=True, grouped_ready=grouped, x8=a8, **gkw)
        out = self._out((T, d))
        self._launch(self._k("moe", "moe_combine", "PPPiii"), (max(1, min(-(-d // 256), 8)), T, 1), (256, 1, 1),
                     y.ptr, wts.ptr, out.ptr, np.int32(T), np.int32(k), np.int32(d))
        return out

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, logits, params_per_row, n_top: int = 0):
        """Picks one token per row of logits [R, V] on the GPU; only ids and logprobs come back.

        params_per_row: one object or dict per row with (defaults in brackets) temperature [1.0;
        <= 0 is greedy], top_k [0 = off], top_p [1.0], min_p [0.0], seed [0], counter (the row's
        token index, the Philox counter) [len(output_ids)], repetition_penalty [1.0],
        presence_penalty [0.0], frequency_penalty [0.0], prompt_ids / output_ids (for the
        penalties) [()]. Same seed and counter give the same token.
        Returns (token_ids int32 [R], logprobs float32 [R]) where logprob is the token's log
        probability under the raw (temperature-1, unfiltered) distribution; with n_top > 0 also
        (top_ids int32 [R, n_top], top_logprobs float32 [R, n_top]), most likely first.
        """
        R, V = logits.shape
        if len(params_per_row) != R:
            raise InvalidArgument(f"{len(params_per_row)} sampling rows for {R} rows of logits", field="params")
        if R == 0:
            z = np.zeros(0, np.int32)
            return (z, np.zeros(0, np.float32)) if not n_top else (z, np.zeros(0, np.float32),
                                                                    np.zeros((0, n_top), np.int32),
                                                                    np.zeros((0, n_top), np.float32))

        def get(p, name, default):
            v = p.get(name, default) if isinstance(p, dict) else getattr(p, name, default)
            return default if v is None else v

        prm = np.zeros((R, 16), np.uint32)
        pens = []
        off = 0
        for r, p in enumerate(params_per_row):
            out_ids = list(get(p, "output_ids", ()))
            rep, pres, freq = (float(get(p, "repetition_penalty", 1.0)), float(get(p, "presence_penalty", 0.0)),
                               float(get(p, "frequency_penalty", 0.0)))
            prm[r] = pack_sampling_row(get(p, "temperature", 1.0), get(p, "top_k", 0), get(p, "top_p", 1.0),
                                       get(p, "min_p", 0.0), get(p, "seed", 0), rep, pres, freq)
            ctr = int(get(p, "counter", len(out_ids)))
            prm[r, 6], prm[r, 7] = ctr & 0xFFFFFFFF, (ctr >> 32) & 0xFFFFFFFF
            n = 0
            if rep != 1.0 or pres != 0.0 or freq != 0.0:
                seen = np.unique(np.asarray(list(get(p, "prompt_ids", ())) + out_ids, np.int64))
                gen = np.asarray(out_ids, np.int64)
                counts = np.zeros(seen.size, np.int32)
                if gen.size:
                    u, c = np.unique(gen, return_counts=True)
                    counts[np.searchsorted(seen, u)] = c
                pens.append(np.stack([seen.astype(np.int32), counts], 1))
                n = seen.size
            prm[r, 11], prm[r, 12] = off, n
            off += n
        pen = np.concatenate(pens).astype(np.int32).ravel() if pens else np.zeros(2, np.int32)
        return self.sample_packed(logits, prm, pen, n_top)

    def sample_packed(self, logits, prm: np.ndarray, pen: np.ndarray, n_top: int = 0):
        """`sample` with its rows already packed: prm uint32 [R, 16] (pack_sampling_row, then the
        counter in words 6-7 and the row's penalty slice in words 11-12), pen int32 pairs (token
        id, generated count) back to back."""
        return self.sample_result(self.sample_packed_async(logits, prm, pen, n_top))

    def sample_packed_async(self, logits, prm: np.ndarray, pen: np.ndarray, n_top: int = 0) -> "SampleHandle":
        """Queues sample_packed's upload, kernel and download; sample_result(handle) waits for them.
        The handle's tok_ptr (the sampled ids on the device) can feed a following step (begin_step)."""
        R, V = logits.shape
        nt, ntt = int(n_top), max(int(n_top), 1)
        # One device buffer and its pinned host twin, in 32-bit words:
        #   params [R, 16] | penalties | (64-word aligned) token ids [R] | logprobs [R] | top ids | top logprobs
        # so a step costs one upload and one download, both asynchronous on the stream.
        n_in = prm.size + pen.size
        o_out = -(-n_in // 64) * 64
        n_out = 2 * R + 2 * R * ntt
        words = o_out + n_out
        self._sample_turn ^= 1
        turn = self._sample_turn
        # Sized by the host twin: the device buffer is rounded up to ALIGN bytes, so its nbytes
        # can exceed the host's words and must not be what decides a reallocation.
        host = self._sample_hosts[turn]
        if host is None or host.size < words:
            if self._sample_bufs[turn] is not None:
                self.synchronize()  # a queued step may still use it
                self._sample_bufs[turn].free()
            cap = -(-max(words * 2, 16 << 10) // 64) * 64
            self._sample_bufs[turn] = self._persistent(cap * 4, "sampling buffers")
            host = self._sample_hosts[turn] = self._drv.pagelocked_empty(cap, np.uint32)
        base = self._sample_bufs[turn].ptr
        host[: prm.size] = prm.ravel()
        host[prm.size: n_in] = pen.view(np.uint32)
        self._drv.memcpy_htod_async(base, host[:n_in], self.stream)
        work = self._out((R, V))
        p_out = base + 4 * o_out
        k = self._k("sample", "sample_rows", "PPiPPPPiPP")
        self._launch(k, (R, 1, 1), (1024, 1, 1), logits.ptr, work.ptr, np.int32(V), base, base + 4 * prm.size,
                     p_out, p_out + 4 * R, np.int32(nt), p_out + 8 * R, p_out + 8 * R + 4 * R * ntt)
        self._drv.memcpy_dtoh_async(host[o_out: words], p_out, self.stream)
        ev = self._sample_events[turn]
        if ev is None:
            from .cuda_graph import HostEvent

            ev = self._sample_events[turn] = HostEvent()
        ev.record(self.stream)
        return SampleHandle(out=host[o_out: words], R=R, nt=nt, tok_ptr=p_out, event=ev,
                            kernels=tuple(dict.fromkeys(self._recent)))

    def sample_result(self, h: "SampleHandle"):
        """The token ids and logprobs (and top ids / logprobs when n_top) of a queued sampling."""
        try:
            h.event.wait()
        except Exception as exc:
            raise Internal(f"CUDA error in kernel(s) {', '.join(h.kernels) or '?'}: {exc}") from exc
        R, nt, out = h.R, h.nt, h.out
        toks = out[:R].view(np.int32).copy()
        lps = out[R: 2 * R].view(np.float32).copy()
        if not nt:
            return toks, lps
        tid = out[2 * R: 2 * R + R * nt].view(np.int32).reshape(R, nt).copy()
        tlp = out[2 * R + R * nt: 2 * R + 2 * R * nt].view(np.float32).reshape(R, nt).copy()
        return toks, lps, tid, tlp

    def runner(self, model):
        from .cuda_runner import CudaRunner

        return CudaRunner(self, model)
