"""Large dense matmuls through cuBLAS: the weight decoded to f16 a panel of rows at a time, the
activations rounded to f16 under one power-of-two scale, the product on cuBLAS's tensor-core GEMM
with float32 accumulation and output (cuda/dequant.cu makes the operands).

Why: the hand-written tensor-core GEMM (quant_matmul.cu's gemm_*) decodes the weights inside its
tiles and reaches a small share of the tensor cores (pp512 phi3-mini 0.49x llama.cpp's, issue 19).
From `Tuning.gemm_blas_min` tokens on, decoding the weight to f16 once per call (2 bytes a weight
written and read back, ~1-2 % of a 512-token prefill's time) and handing the product to cuBLAS is
cheaper, from 64 tokens on every anchor shape (bench/bench_blas.py), decode steps of that many
sequences included. Smaller steps keep the fused kernels, which read the quantized weight directly.
F32 and BF16 weights keep them always (`takes`): f16 would round F32's mantissa and BF16's range.
With `Tuning.gemm_f16_weights` a weight is decoded once at load (`keep_f16`) instead of per call.

Scaling: `absmax_rows` finds the matrix's largest |x|, `to_half_scaled` multiplies by the power of
two s that brings it into [2^14, 2^15) and writes 1/s where cuBLAS reads alpha (device pointer
mode), so any finite float32 input is safe and no pass over the output undoes the scale.

The library is the CUDA toolkit's or the nvidia-cublas wheel's libcublas, loaded with ctypes; where
none is found the backend keeps the fused GEMM (`library()` returns None). Every call is queued on
the backend's stream with no allocation or synchronisation (cuBLAS gets a workspace of its own up
front), so a step that uses it can still be captured into a CUDA graph.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys

import numpy as np

from gguf import GGMLQuantizationType as Q

from .. import logs
from ..errors import Internal, ResourceExhausted

log = logs.get_logger("orcd.cuda")

WORKSPACE_BYTES = 32 << 20   # cuBLAS's own default on Hopper, given up front: nothing is allocated inside a capture
PANEL_HALVES = 16 << 20      # most weight elements decoded at once (32 MiB of f16 from the step workspace)
_MAX_ROWS = 65535 // 128 * 128
_OP_N, _OP_T = 0, 1
_R_32F, _R_16F = 0, 2
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1
_POINTER_MODE_DEVICE = 1
_LIB_NAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so")
_EXACT_ONLY = frozenset({Q.F32, Q.BF16})  # past 65,504 or below 6e-8 (BF16), or 24-bit mantissas (F32)


def takes(qtype, n_experts=None) -> bool:
    """Whether a weight may take this path: a single matrix (MoE stacks keep the grouped GEMM) of a
    type f16 holds every decoded value of."""
    return n_experts is None and int(qtype) not in _EXACT_ONLY


def _candidates() -> list[str]:
    """Where a libcublas may be: $ORCD_CUBLAS, the nvidia-cublas wheels on sys.path (nvidia/cu13/lib,
    nvidia/cublas/lib, ...), the toolkit ($CUDA_HOME, /usr/local/cuda) and the loader's own search."""
    found = [os.environ["ORCD_CUBLAS"]] if os.environ.get("ORCD_CUBLAS") else []
    for base in sys.path:
        found.extend(sorted(glob.glob(os.path.join(base or ".", "nvidia", "*", "lib", "libcublas.so*"))))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found.extend(os.path.join(home, d, n) for d in ("lib64", "lib") for n in _LIB_NAMES)
    found.extend(_LIB_NAMES)  # the dynamic loader's own path
    return list(dict.fromkeys(found))


def _open() -> ctypes.CDLL | None:
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            continue
        try:
            lt = os.path.join(os.path.dirname(path), os.path.basename(path).replace("libcublas", "libcublasLt"))
            if os.sep in path and os.path.exists(lt):
                ctypes.CDLL(lt, mode=ctypes.RTLD_GLOBAL)  # its dependency, beside it
            lib = ctypes.CDLL(path)
            lib.cublasGemmEx  # noqa: B018  (a library without it is not the one we want)
        except (OSError, AttributeError):
            continue
        _declare(lib)
        log.info("cuBLAS found", extra={"path": path})
        return lib
    return None


def _declare(lib) -> None:
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cublasDestroy_v2.argtypes = [vp]
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasSetPointerMode_v2.argtypes = [vp, i]
    lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
    lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
    for fn in ("cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasSetPointerMode_v2",
               "cublasSetWorkspace_v2", "cublasGemmEx"):
        getattr(lib, fn).restype = i


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The process's libcublas (looked for once), or None."""
    return _open()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise Internal(f"cuBLAS {what} failed with status {status}")


class Blas:
    """One cuBLAS handle bound to the backend's stream, its workspace and the device scalars the
    GEMM reads: [0] the activations' largest |x| (float bits), [1] alpha = 1/s, [2] beta = 0."""

    def __init__(self, lib, stream_handle: int, workspace, scalars):
        """workspace (WORKSPACE_BYTES) and scalars (>= 12 bytes, zeroed): device buffers with a .ptr,
        held here for as long as the handle may use them."""
        self.lib = lib
        self.buffers = (workspace, scalars)
        self.scalars = int(scalars.ptr)
        h = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(h)), "create")
        self.handle = h
        try:
            _check(lib.cublasSetStream_v2(h, ctypes.c_void_p(int(stream_handle))), "set stream")
            _check(lib.cublasSetPointerMode_v2(h, _POINTER_MODE_DEVICE), "set pointer mode")
            _check(lib.cublasSetWorkspace_v2(h, ctypes.c_void_p(int(workspace.ptr)), WORKSPACE_BYTES), "set workspace")
        except BaseException:
            self.close()
            raise

    @property
    def gmax_ptr(self) -> int:
        return self.scalars

    @property
    def alpha_ptr(self) -> int:
        return self.scalars + 4

    @property
    def beta_ptr(self) -> int:
        return self.scalars + 8

    def gemm_wt(self, m: int, T: int, k: int, wh_ptr: int, xh_ptr: int, y_ptr: int, ldy: int) -> None:
        """y[t, 0:m] = alpha * (xh[t, :] . wh[r, :]) for t < T, r < m: f16 row-major wh [m, k] and
        xh [T, k], float32 y with row stride ldy. In cuBLAS's column-major terms: C (m x T, ld ldy) =
        op(A) B with A = wh as k x m (transposed), B = xh as k x T."""
        vp = ctypes.c_void_p
        _check(self.lib.cublasGemmEx(self.handle, _OP_T, _OP_N, m, T, k, vp(self.alpha_ptr), vp(wh_ptr), _R_16F, k,
                                     vp(xh_ptr), _R_16F, k, vp(self.beta_ptr), vp(y_ptr), _R_32F, ldy,
                                     _COMPUTE_32F, _GEMM_DEFAULT), "GemmEx")

    def close(self) -> None:
        if self.handle is not None:
            try:
                self.lib.cublasDestroy_v2(self.handle)
            finally:
                self.handle = None


def panel_rows(n: int, k: int) -> int:
    """Weight rows decoded per GEMM: all of them when n x k fits PANEL_HALVES, else a multiple of 128
    (at least 128) that does; at most 65,408 (dequant_h's grid rows, a multiple of 128)."""
    if n * k <= PANEL_HALVES and n <= _MAX_ROWS:
        return n
    return min(_MAX_ROWS, max(128, PANEL_HALVES // k // 128 * 128))


def matmul(be, x, w, y, T: int, bias=None) -> bool:
    """y[T, n] = x[T, k] @ W^T (+ bias) through cuBLAS on backend `be` (its kernels, stream and step
    workspace). False, with nothing queued, when the workspace has no room for the f16 operands
    (the caller then takes the fused GEMM)."""
    blas = be._blas
    k, n = w.k, w.n
    resident = getattr(w, "f16_ptr", 0)  # keep_f16's copy: no panels, no decode
    rows = n if resident else panel_rows(n, k)
    try:
        xh = be._out((T * k // 2,))
        wh = None if resident else be._out((rows * k // 2,))
    except ResourceExhausted:
        return False
    drv = be._drv
    drv.memset_d32_async(blas.gmax_ptr, 0, 1, be.stream)
    be._launch(be._k("dequant", "absmax_rows", "PiP"), (T, 1, 1), (256, 1, 1), x.ptr, np.int32(k),
               blas.gmax_ptr)
    n4 = T * k // 4
    be._launch(be._k("dequant", "to_half_scaled", "PPqPP"), (max(1, min(-(-n4 // 256), 8192)), 1, 1), (256, 1, 1),
               x.ptr, xh.ptr, np.int64(n4), blas.gmax_ptr, blas.alpha_ptr)
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        if not resident:
            _decode_rows(be, w, r0, m, wh.ptr)
        blas.gemm_wt(m, T, k, resident or wh.ptr, xh.ptr, y.ptr + 4 * r0, n)
        be._recent.append("cublasGemmEx")
        if be._sync_each:
            be.synchronize("cublasGemmEx")
    if bias is not None:
        total = T * n
        be._launch(be._k("dequant", "add_bias_rows", "PPqi"), (max(1, min(-(-total // 256), 8192)), 1, 1),
                   (256, 1, 1), y.ptr, bias.ptr, np.int64(total), np.int32(n))
    del xh, wh  # back to the workspace only now that every launch reading them is queued
    return True


def f16_nbytes(n: int, k: int) -> int:
    """Device bytes of a weight's f16 copy (keep_f16)."""
    return n * k * 2


def _decode_rows(be, w, r0: int, m: int, dst_ptr: int) -> None:
    """Queues dequant_h_<fmt>: rows [r0, r0 + m) of weight w (m <= _MAX_ROWS) to f16 at dst_ptr."""
    from .cuda_quant import _NAME

    be._launch(be._k("dequant", f"dequant_h_{_NAME[w.qtype]}", "PPi"), (-(-(w.k // 8) // 256), m, 1), (256, 1, 1),
               w.ptr + r0 * w.row_bytes, dst_ptr, np.int32(w.k))


def keep_f16(be, w) -> None:
    """Decodes weight w to f16 once, into memory of its own (w.f16_ptr), so matmul reads that instead
    of decoding the weight on every call; the caller has reserved f16_nbytes in the VRAM budget."""
    import pycuda.driver as drv

    n, k = w.n, w.k
    buf = drv.mem_alloc(f16_nbytes(n, k))
    for r0 in range(0, n, _MAX_ROWS):
        _decode_rows(be, w, r0, min(_MAX_ROWS, n - r0), int(buf) + 2 * r0 * k)
    be.synchronize("dequant_h")
    w._f16, w.f16_ptr = buf, int(buf)
