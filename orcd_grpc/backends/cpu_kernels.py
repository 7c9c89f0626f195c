"""Matrix products on GGUF weights kept in their stored format, for the CPU backend.

`matmul(x, w)` is y = x @ W.T with W one of the block formats in cpu_formats.FORMATS (or F32,
F16, BF16), its bytes left as they are in the file. Output rows are spread over Numba's threads
(prange); within a row, each block is decoded into vector registers and used at once. For the
block formats x is first rounded to 16 bits per 32 values, so that a block's integer levels
multiply x's in integers (cpu_llvm.row_dot_x16) and nothing is converted to float per value:

* m < GEMM_MIN_M (decode): one x row at a time. The whole weight matrix is read once per row
  of x at its stored size, which is what bounds decode speed.
* m >= GEMM_MIN_M (prefill, batched decode): x is taken 8 rows at a time (padded with zero
  rows), each decoded block multiplied with all 8, so a block is decoded m/8 times, not m times.
  Each row's arithmetic is the 1-row kernel's, in the same order (a row's bits do not depend on
  the rows beside it). This beat decoding chunks to float32 for BLAS sgemm here
  (bench/cpu_kernels.py, BENCHMARKS.md), and keeps to one thread pool: OpenBLAS's threads and
  Numba's fought over the cores.

F32 weights go to NumPy (BLAS). F16/BF16 rows of whole 32-value groups use the same kernels (as
64-byte "blocks"); other row lengths have a plain Numba loop for m == 1 and decoded chunks
through BLAS otherwise.

Compiled code is cached on disk by Numba (cache=True); the cache key includes a hash of the
decoder sources (cpu_llvm.py, cpu_formats.py), which Numba's own key does not see.
"""
from __future__ import annotations

import mmap
import os
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# Numba's default thread pool here is OpenMP (libgomp), whose idle workers spin ~300k turns after
# each parallel loop. On a machine with more runnable threads than cores that spinning starves
# the thread doing the work: SmolLM2's 211 decode products took 4.9 s instead of 0.1 s at 2
# threads on this 2-core host under load (BENCHMARKS.md). Passive waiting costs a futex wake per
# loop when idle; the CPU backend bounds the spinning instead (Tuning.cpu_spin, GOMP_SPINCOUNT,
# which libgomp takes over the policy). Read by libgomp when Numba first loads it, so set before
# any parallel call; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a main dependency; tests skip without it
    numba = None

#: rows of x from which matmul takes x 8 rows at a time (below: one row at a time; at m = 2 two
#: passes over W cost less than the 8-row kernel, at m = 4 more; tests run both paths)
GEMM_MIN_M = 3
#: rows of x per pass of the 8-row kernel (what its accumulators are sized for)
GEMM_ROWS = 8
#: F16/BF16 with m > 1: float32 elements per decoded chunk (256 KiB, stays in L2 for sgemm)
CHUNK_ELEMS = 64 * 1024

_PLAIN = (T.F32, T.F16, T.BF16)

if numba is not None:
    from .cpu_formats import FLOAT_FORMATS, FORMATS
    from .cpu_llvm import X16_MAX, row_dequant, row_dot, row_dot_rows, row_dot_x16, source_key

    _ALL = {**FORMATS, **FLOAT_FORMATS}
    _X1 = {qt: row_dot_x16(*f, 1) for qt, f in FORMATS.items()}
    _X8 = {qt: row_dot_x16(*f, GEMM_ROWS) for qt, f in FORMATS.items()}
    _DEQ = {qt: row_dequant(*f) for qt, f in _ALL.items()}
    _dot_f16, _dot_bf16 = (row_dot(*FLOAT_FORMATS[t]) for t in (T.F16, T.BF16))
    _dot8_f16, _dot8_bf16 = (row_dot_rows(*FLOAT_FORMATS[t], GEMM_ROWS) for t in (T.F16, T.BF16))
    _deq_f16, _deq_bf16 = (_DEQ[t] for t in (T.F16, T.BF16))
    # Numba resolves callees as module globals, not through a dict
    _x1_q4_0, _x1_q4_1, _x1_q5_0, _x1_q5_1, _x1_q8_0, _x1_mxfp4 = (
        _X1[t] for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4))
    _x1_q2_k, _x1_q3_k, _x1_q4_k, _x1_q5_k, _x1_q6_k = (_X1[t] for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K))
    _x8_q4_0, _x8_q4_1, _x8_q5_0, _x8_q5_1, _x8_q8_0, _x8_mxfp4 = (
        _X8[t] for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4))
    _x8_q2_k, _x8_q3_k, _x8_q4_k, _x8_q5_k, _x8_q6_k = (_X8[t] for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K))
    _deq_q4_0, _deq_q4_1, _deq_q5_0, _deq_q5_1, _deq_q8_0, _deq_mxfp4 = (
        _DEQ[t] for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4))
    _deq_q2_k, _deq_q3_k, _deq_q4_k, _deq_q5_k, _deq_q6_k = (_DEQ[t] for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K))

_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _MXFP4 = (int(t) for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(t) for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K))
_F16, _BF16 = int(T.F16), int(T.BF16)


if numba is not None:
    # a module global, not a closure cell: Numba's cache key pickles closure cells, and a
    # dispatcher pickles differently in every process (the caller's cache never hit)
    @njit(nogil=True, cache=True, inline="always")
    def _quantize_row(x, i, xq, xd, xs):
        # x[i] -> xq[i] int16 (xq * xd ~ x, one xd per 32 values), xs[i]: the rounded x's sums per
        # 16 values (xd * sum xq), not x's own. A format's offset (Q4_1's m, a K-quant's min) then
        # multiplies the same x as its levels do, and the product's error is sum w_j e_j; with x's
        # own sums it is sum (w_j - offset) e_j, several times larger where the offset is large.
        # A group holding an infinity or a NaN gets a NaN scale and sums, so that the products
        # it enters are NaN as with float x (what the non-finite checks on logits look for), not
        # levels rounded from garbage.
        k = x.shape[1]
        for g in range(k // 32):
            amax = np.float32(0.0)
            probe = np.float32(0.0)  # NaN if any value is not finite
            for j in range(32):
                v = x[i, g * 32 + j]
                amax = max(amax, abs(v))
                probe += v * np.float32(0.0)
            if probe != probe:
                xd[i, g] = np.float32(np.nan)
                for j in range(32):
                    xq[i, g * 32 + j] = 0
                xs[i, 2 * g] = np.float32(np.nan)
                xs[i, 2 * g + 1] = np.float32(np.nan)
                continue
            d = amax / np.float32(X16_MAX)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            xd[i, g] = d
            for h in range(2):
                t = 0
                for j in range(16):
                    v = x[i, g * 32 + h * 16 + j]
                    q = np.int16(np.trunc(v * inv + np.copysign(np.float32(0.5), v)))
                    t += np.int32(q)
                    xq[i, g * 32 + h * 16 + j] = q
                xs[i, 2 * g + h] = np.float32(t) * d


def _make_drivers(deps: tuple):
    """The parallel drivers. `deps` only lands in the closure, where Numba's cache key sees it."""

    @njit(parallel=True, nogil=True, cache=True)
    def gemv(qt, w, nb, x, y):
        # y [m, n] from the caller: an array made here would be boxed on return, which costs a
        # few microseconds of every call (there are ~120 a SmolLM2 token). x is rounded to 16
        # bits here, on the calling thread (m is small), before the parallel loop.
        n, rb = w.shape
        m, k = x.shape
        if len(deps) == 0:
            return
        if qt == _F16 or qt == _BF16:
            for r in prange(n):
                for i in range(m):
                    if qt == _F16:
                        y[i, r] = _dot_f16(w, r * rb, nb, x, i * k)
                    else:
                        y[i, r] = _dot_bf16(w, r * rb, nb, x, i * k)
            return
        kd, ks = k // 32, k // 16
        xq = np.empty((m, k), np.int16)
        xd = np.empty((m, kd), np.float32)
        xs = np.empty((m, ks), np.float32)
        for i in range(m):
            _quantize_row(x, i, xq, xd, xs)
        for r in prange(n):
            o = r * rb
            for i in range(m):
                if qt == _Q4_0:
                    _x1_q4_0(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q4_1:
                    _x1_q4_1(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q5_0:
                    _x1_q5_0(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q5_1:
                    _x1_q5_1(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q8_0:
                    _x1_q8_0(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _MXFP4:
                    _x1_mxfp4(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q2_K:
                    _x1_q2_k(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q3_K:
                    _x1_q3_k(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q4_K:
                    _x1_q4_k(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q5_K:
                    _x1_q5_k(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                elif qt == _Q6_K:
                    _x1_q6_k(w, o, nb, xq, i * k, k, xd, i * kd, kd, xs, i * ks, ks, y, i * n + r, n)
                else:
                    y[i, r] = np.float32(np.nan)

    @njit(parallel=True, nogil=True, cache=True)
    def gemm8(qt, w, nb, x, y):
        # x [m, k] with m a multiple of GEMM_ROWS; y [m, n]
        if len(deps) == 0:
            return
        n, rb = w.shape
        m, k = x.shape
        if qt == _F16 or qt == _BF16:
            for r in prange(n):
                for t in range(m // GEMM_ROWS):
                    if qt == _F16:
                        _dot8_f16(w, r * rb, nb, x, t * GEMM_ROWS * k, k, y, t * GEMM_ROWS * n + r, n)
                    else:
                        _dot8_bf16(w, r * rb, nb, x, t * GEMM_ROWS * k, k, y, t * GEMM_ROWS * n + r, n)
            return
        kd, ks = k // 32, k // 16
        xq = np.empty((m, k), np.int16)
        xd = np.empty((m, kd), np.float32)
        xs = np.empty((m, ks), np.float32)
        for i in prange(m):
            _quantize_row(x, i, xq, xd, xs)
        for r in prange(n):
            o = r * rb
            for t in range(m // GEMM_ROWS):
                a = t * GEMM_ROWS
                if qt == _Q4_0:
                    _x8_q4_0(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q4_1:
                    _x8_q4_1(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q5_0:
                    _x8_q5_0(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q5_1:
                    _x8_q5_1(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q8_0:
                    _x8_q8_0(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _MXFP4:
                    _x8_mxfp4(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q2_K:
                    _x8_q2_k(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q3_K:
                    _x8_q3_k(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q4_K:
                    _x8_q4_k(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q5_K:
                    _x8_q5_k(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)
                elif qt == _Q6_K:
                    _x8_q6_k(w, o, nb, xq, a * k, k, xd, a * kd, kd, xs, a * ks, ks, y, a * n + r, n)

    @njit(parallel=True, nogil=True, cache=True)
    def dequant_rows(qt, w, nb, rows, out):
        if len(deps) == 0:
            return
        rb = w.shape[1]
        k = out.shape[1]
        for i in prange(rows.shape[0]):
            o = rows[i] * rb
            oo = i * k
            if qt == _Q4_0:
                _deq_q4_0(w, o, nb, out, oo)
            elif qt == _Q4_1:
                _deq_q4_1(w, o, nb, out, oo)
            elif qt == _Q5_0:
                _deq_q5_0(w, o, nb, out, oo)
            elif qt == _Q5_1:
                _deq_q5_1(w, o, nb, out, oo)
            elif qt == _Q8_0:
                _deq_q8_0(w, o, nb, out, oo)
            elif qt == _MXFP4:
                _deq_mxfp4(w, o, nb, out, oo)
            elif qt == _Q2_K:
                _deq_q2_k(w, o, nb, out, oo)
            elif qt == _Q3_K:
                _deq_q3_k(w, o, nb, out, oo)
            elif qt == _Q4_K:
                _deq_q4_k(w, o, nb, out, oo)
            elif qt == _Q5_K:
                _deq_q5_k(w, o, nb, out, oo)
            elif qt == _Q6_K:
                _deq_q6_k(w, o, nb, out, oo)
            elif qt == _F16:
                _deq_f16(w, o, nb, out, oo)
            elif qt == _BF16:
                _deq_bf16(w, o, nb, out, oo)

    @njit(parallel=True, nogil=True, cache=True, fastmath=True)
    def gemv_half(bf16, w, x, y):
        # w: uint16 [n, k] holding F16 or BF16 bits; one long loop per row, which LLVM vectorizes
        if len(deps) == 0:
            return
        n, k = w.shape
        m = x.shape[0]
        for r in prange(n):
            for i in range(m):
                s = np.float32(0.0)
                if bf16:
                    for j in range(k):
                        s += np.uint32(np.uint32(w[r, j]) << np.uint32(16)).view(np.float32) * x[i, j]
                else:
                    for j in range(k):
                        h = np.uint32(w[r, j])
                        bits = np.uint32(((h & np.uint32(0x8000)) << np.uint32(16))
                                         | ((h & np.uint32(0x7FFF)) << np.uint32(13)))
                        s += bits.view(np.float32) * np.float32(5.192296858534828e33) * x[i, j]
                y[i, r] = s

    return gemv, gemm8, dequant_rows, gemv_half


if numba is not None:
    _gemv, _gemm8, _dequant_rows, _gemv_half = _make_drivers(source_key("cpu_llvm.py", "cpu_formats.py"))


def supported(qtype) -> bool:
    """Whether matmul/embed_rows/dequantize handle weights stored as `qtype` (needs Numba)."""
    try:
        t = T(int(qtype))
    except ValueError:
        return False
    return numba is not None and (t in _PLAIN or t in FORMATS)


class QWeight:
    """A weight matrix [n_out, n_in] in its GGUF storage format.

    `raw` is uint8 [n_out, row_bytes]: each output row's blocks, back to back, exactly as in the
    file (a view of the file's bytes where they are contiguous, as a memory map's are).
    """

    __slots__ = ("raw", "qtype", "shape", "_code", "_nb", "_blocks")

    def __init__(self, raw, qtype, shape):
        t = T(int(qtype))
        if not supported(t):
            raise ValueError(f"cpu_kernels: no kernel for {t.name} weights" + ("" if numba else " (numba missing)"))
        n, k = (int(s) for s in shape)
        bs, ts = GGML_QUANT_SIZES[t]
        if n < 1 or k < 1 or k % bs:
            raise ValueError(f"cpu_kernels: shape {(n, k)} is not whole {t.name} rows (block of {bs} values)")
        row_bytes = k // bs * ts
        b = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if b.size != n * row_bytes:
            raise ValueError(f"cpu_kernels: {t.name} {(n, k)} needs {n * row_bytes} bytes, got {b.size}")
        self.raw = b.reshape(n, row_bytes)
        # Always read-only (a memory-mapped file's bytes are): Numba types read-only arrays apart
        # and would compile and cache every driver a second time for writable ones.
        self.raw.flags.writeable = False
        self.qtype = t
        self.shape = (n, k)
        self._code = int(t)  # what the drivers branch on
        # F16/BF16 rows of whole 32-value groups go through the block kernels too
        self._blocks = t in FORMATS or (t in (T.F16, T.BF16) and k % 32 == 0)
        self._nb = k // bs if t in FORMATS else k // 32  # blocks per row

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def __repr__(self):
        return f"QWeight({self.qtype.name}, {self.shape})"

    def _plain(self) -> np.ndarray:
        """F32 as float32 [n, k], F16/BF16 as uint16 [n, k] bits."""
        return self.raw.view(np.float32 if self.qtype == T.F32 else np.uint16)


def _half_to_f32(bits: np.ndarray, bf16: bool) -> np.ndarray:
    if bf16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def _rows_f32(w: QWeight, rows: np.ndarray) -> np.ndarray:
    k = w.shape[1]
    if not w._blocks:
        p = w._plain()[rows]
        return p.astype(np.float32) if w.qtype == T.F32 else _half_to_f32(p, w.qtype == T.BF16)
    out = np.empty((rows.shape[0], k), np.float32)
    if rows.shape[0]:
        _dequant_rows(w._code, w.raw, w._nb, rows, out)
    return out


def embed_rows(w: QWeight, ids) -> np.ndarray:
    """float32 [len(ids), n_in]: rows `ids` of W decoded (token embeddings)."""
    rows = np.asarray(ids, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= w.shape[0]):
        raise IndexError(f"cpu_kernels.embed_rows: ids must be in [0, {w.shape[0]})")
    return _rows_f32(w, rows)


def dequantize(w: QWeight) -> np.ndarray:
    """float32 [n_out, n_in]: all of W decoded."""
    return _rows_f32(w, np.arange(w.shape[0], dtype=np.int64))


def matmul(x: np.ndarray, w: QWeight) -> np.ndarray:
    """float32 [m, n_out] = x @ W.T for float32 x [m, n_in].

    For the block formats x is rounded to 16 bits per 32 values first (cpu_llvm.row_dot_x16):
    each value off by at most amax(its 32)/65534, about 1.5e-5 of the group's largest, and levels
    times x summed exactly in integers. F16/BF16 rows multiply float x (row_dot).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = w.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"cpu_kernels.matmul: x is {x.shape}, W is {w.shape}: x must be [m, {k}]")
    m = x.shape[0]
    if w.qtype == T.F32:
        return x @ w._plain().T
    if m == 0:
        return np.empty((0, n), np.float32)
    if not w._blocks:
        return _matmul_half(x, w)
    if m < GEMM_MIN_M:
        y = np.empty((m, n), np.float32)
        _gemv(w._code, w.raw, w._nb, x, y)
        return y
    mp = -(-m // GEMM_ROWS) * GEMM_ROWS
    if mp != m:
        x = np.concatenate([x, np.zeros((mp - m, k), np.float32)])
    y = np.empty((mp, n), np.float32)
    _gemm8(w._code, w.raw, w._nb, x, y)
    return y[:m] if mp != m else y


def _matmul_half(x: np.ndarray, w: QWeight) -> np.ndarray:
    m, (n, k) = x.shape[0], w.shape
    if m == 1:
        y = np.empty((1, n), np.float32)
        _gemv_half(w.qtype == T.BF16, w._plain(), x, y)
        return y
    # y.T in row chunks, each decoded once and multiplied by BLAS
    yt = np.empty((n, m), np.float32)
    step = max(1, CHUNK_ELEMS // k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        np.matmul(_rows_f32(w, np.arange(r0, r1, dtype=np.int64)), x.T, out=yt[r0:r1])
    return np.ascontiguousarray(yt.T)


def start_and_page_out_compiler() -> int:
    """Starts Numba's CPU target with one tiny product, then pages LLVM's code back out.

    Every kernel here comes from Numba's disk cache, and linking a cached kernel touches little
    of LLVM; starting the target, though, reads tens of MiB of libllvmlite.so's code, which would
    then stay resident in a process that compiles nothing more. Those pages are the file's, so
    MADV_PAGEOUT loses nothing: a later compile (a cold cache, a kernel first used later) faults
    them back in. Call before the weights load, so that the pages never sit beside them (peak
    RSS). Returns the bytes of the mappings advised (0 without Numba or MADV_PAGEOUT)."""
    if numba is None:
        return 0
    matmul(np.ones((1, 32), np.float32), QWeight(np.zeros(4 * 20, np.uint8), T.Q4_1, (4, 32)))
    # Linux's value (5.4 on; an older kernel refuses it); Python builds made against older
    # headers lack the name
    advice = getattr(mmap, "MADV_PAGEOUT", 21 if sys.platform.startswith("linux") else None)
    if advice is None:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return 0
    for line in maps:
        head = line.split()
        # read-only and code mappings only: a written (copied-on-write) page would be swap's
        if len(head) < 6 or not head[5].endswith("libllvmlite.so") or "w" in head[1]:
            continue
        lo, hi = (int(v, 16) for v in head[0].split("-"))
        if libc.madvise(lo, hi - lo, advice) == 0:
            done += hi - lo
    return done
