"""Quantized matrix kernels on GGUF weights kept in their file layout in VRAM (cuda/quant_matmul.cu).

Shapes: a weight is an [n, k] matrix (n output rows, k inputs; GGUF ne = [k, n]) stored as the raw
GGUF bytes, row-major, ``k // block_size * type_size`` bytes per row. Activations are float32
[T, k], outputs float32 [T, n], both contiguous.

Every launch is a ``prepared_async_call`` on the caller's stream, with no allocation, host copy or
synchronisation, so a sequence of calls can be captured into a CUDA graph.

Kernel choice: T <= 8 uses the GEMV kernel (f32 math, weights streamed once through shared memory
with 16-byte copies, each weight used for all T tokens); larger T uses the tensor-core GEMM (weights
and activations rounded to f16, f32 accumulation: relative error ~1e-3, see docs/kernels.md; each
activation row is scaled by a power of two before rounding, so any finite float32 input is fine).

MoE (``moe_matmul``): few slots use one GEMV per (token, slot); many slots (``moe_use_grouped``) use the
grouped path: ``moe_group`` sorts the slots by expert on the device into a caller-provided int32
workspace (``moe_workspace_ints``), then one tensor-core GEMM launch covers all experts, each expert's
matrix read once per 128 output rows instead of once per slot. The grid depends only on T, top_k and E.
"""
from __future__ import annotations

import functools

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..tuning import DEFAULT, Tuning

Q = GGMLQuantizationType

#: kernel-name suffix of each supported storage type
_NAME = {
    Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q5_0: "q5_0", Q.Q5_1: "q5_1", Q.Q8_0: "q8_0", Q.MXFP4: "mxfp4",
    Q.Q4_K: "q4_k", Q.Q5_K: "q5_k", Q.Q6_K: "q6_k", Q.F32: "f32", Q.F16: "f16", Q.BF16: "bf16",
}
SUPPORTED: set[GGMLQuantizationType] = set(_NAME)

GEMV_MAX_T = 8          # largest T served by the GEMV kernel (NT = 1, 2, 4 or 8)
_GEMV_WARPS, _GEMV_R = 4, 2   # must match GEMV_WARPS / GEMV_R in quant_matmul.cu
_GEMM_BN, _GEMM_THREADS = 128, 256
_EMBED_THREADS = 128
MOE_GROUPED_MIN_SLOTS = 16   # grouped MoE needs T*top_k >= this ...
MOE_GROUPED_MIN_PER_EXPERT = 2  # ... and >= this many slots per expert on average (else GEMV reads about as little)
MOE_MAX_EXPERTS_GROUPED = 1024  # moe_group's block size / shared counters (MOE_MAX_E in quant_matmul.cu)
_MOE_GROUP_THREADS = 1024
_PAD = 16               # GEMV copies whole 16-byte vectors, reading up to 15 bytes past a row's end


def row_bytes(qtype, k: int) -> int:
    bs, ts = GGML_QUANT_SIZES[Q(qtype)]
    return k // bs * ts


def _check_k(qtype, k: int) -> None:
    bs, _ = GGML_QUANT_SIZES[Q(qtype)]
    # the kernels cut rows into 8-weight parts and F32/F16/BF16 rows into 32-element pseudo-blocks
    if k % bs or k % 32:
        raise ValueError(f"{Q(qtype).name}: k={k} must be a multiple of {max(bs, 32)}")


class QuantWeight:
    """A device-resident weight matrix (or a stack of expert matrices) in its raw GGUF layout."""

    def __init__(self, raw: np.ndarray, qtype, n: int, k: int, n_experts: int | None = None):
        import pycuda.driver as drv

        self.qtype = Q(int(qtype))
        if self.qtype not in SUPPORTED:
            raise ValueError(f"no CUDA kernel for {self.qtype.name}")
        _check_k(self.qtype, k)
        self.n, self.k, self.n_experts = int(n), int(k), n_experts
        self.row_bytes = row_bytes(self.qtype, k)
        self.expert_bytes = self.n * self.row_bytes
        buf = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
        want = self.expert_bytes * (n_experts or 1)
        if buf.nbytes != want:
            raise ValueError(f"{self.qtype.name} [{n_experts or 1}x{n}x{k}]: expected {want} bytes, got {buf.nbytes}")
        self.nbytes = want
        self._mem = drv.mem_alloc(want + _PAD)
        drv.memcpy_htod(self._mem, buf)
        drv.memset_d8(int(self._mem) + want, 0, _PAD)
        self.ptr = int(self._mem)
        self._f16 = None  # cuda_blas.keep_f16: the weight decoded to f16 [n, k] (ORCD_GEMM_F16_WEIGHTS)
        self.f16_ptr = 0

    def free(self) -> None:
        if self._mem is not None:
            self._mem.free()
            self._mem = None
            self.ptr = 0
        if self._f16 is not None:
            self._f16.free()
            self._f16, self.f16_ptr = None, 0


class _Kernels:
    """Prepared functions of one module (quant_matmul, mma_i8), looked up once per name; smem: the
    dynamic shared memory a kernel launches with, its limit raised once when it passes 48 KiB."""

    def __init__(self, module: str, options: tuple[str, ...] = ()):
        from .cuda_runtime import load_module

        self.mod = load_module(module, options)
        self.fns: dict[str, object] = {}

    def get(self, name: str, sig: str, smem: int = 0):
        f = self.fns.get(name)
        if f is None:
            f = self.mod.get_function(name)
            f.prepare(sig)
            if smem > 48 * 1024:
                import pycuda.driver as drv

                f.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            self.fns[name] = f
        return f


_K: dict[tuple, _Kernels] = {}  # by module and the values of its compile-time switches
_GEMV_SIG = "PPPPPiiiqiii"
_GEMM_SIG = "PPPPiiiii"
#: multiprocessors assumed where a caller names none (an H100's); they only size split-K and the GEMV
#: layout, so a wrong count costs speed, not correctness. The backend passes its device's own.
DEFAULT_SMS = 132


def loaded_kernel_names() -> set[str]:
    """Every quant_matmul and mma_i8 kernel looked up so far (under any tuning)."""
    return {name for k in _K.values() for name in k.fns}


def _split_k(tiles: int, k: int, unit: int, min_units: int, sms: int, per_sm: int = 2) -> tuple[int, int]:
    """(splits, kchunk) of a GEMM with `tiles` output tiles over k inputs taken `unit` at a time: k is
    split where the tiles alone cannot fill the GPU (per_sm blocks an SM), each split at least
    min_units units; kchunk is a whole number of units, the last split what remains."""
    units = -(-k // unit)
    splits = max(1, min(-(-per_sm * sms // tiles), units // max(1, min_units)))
    kchunk = -(-units // splits) * unit
    return -(-k // kchunk), kchunk


def _gemm_init(y_ptr, bias_ptr, T: int, n: int, accumulate: bool, stream, tuning: Tuning) -> None:
    """y = bias (+ y): where a split GEMM's blocks add their partial sums."""
    init = _kernels(tuning).get("gemm_init", "PPiii")
    init.prepared_async_call(((T * n + 255) // 256, 1), (256, 1, 1), stream, _p(y_ptr), _p(bias_ptr),
                             np.int32(T), np.int32(n), np.int32(bool(accumulate)))


def _module(module: str, switches: tuple, tuning: Tuning) -> _Kernels:
    """The kernels of cuda/<module>.cu built under tuning's compile-time switches, whose values
    `switches` are (a cheap key: this runs on every launch; module_options only on a miss)."""
    k = _K.get((module, switches))
    if k is None:
        from .cuda_runtime import module_options

        k = _K[(module, switches)] = _Kernels(module, module_options(module, tuning))
    return k


def _kernels(tuning: Tuning = DEFAULT) -> _Kernels:
    return _module("quant_matmul", (tuning.gemm_pipe,), tuning)


# GEMV k-split (gemv_*_k4: a block's 4 warps share 2 rows): tuning.gemv_ksplit "auto" uses it when the
# row blocks alone would give the GPU fewer than 2 blocks per SM; "0" never, "1" always.
# H100 A/B at T=1 (BENCHMARKS.md): k-split won at 112 blocks (qwen2.5's 896 rows: ffn_down 9.5 -> 5.5
# us) and lost at 384 (phi3's 3072 rows: 8.0 -> 9.5 us) and above; 2 blocks per SM lies between.
# GEMM split-K (tuning.gemm_min_ksteps): the H100 trace of qwen2.5 at B=64 (2026-11-23) has its T=64
# GEMMs at 35-43 us on average for 0.1-9 MB of weights (launches of 3 to 228 blocks).
# Largest GEMM token tile: 64, so prefill takes the unrolled k-step (gemm_pipe; at BM 128 it would
# need ~170 registers). BM 64 reads each weight twice as often as BM 128 and still wins: pp512
# phi3-mini 6,339 -> 7,394 tok/s, qwen2.5-0.5b 25,909 -> 33,241 (H100, 2026-11-23, bench_engine), so
# the dense BM 128 tiles are gone.
GEMM_MAX_BM = 64


def _gemv_blocks(n: int) -> int:
    """Row blocks of the plain GEMV layout (each of its warps owns _GEMV_R rows)."""
    return (n + _GEMV_WARPS * _GEMV_R - 1) // (_GEMV_WARPS * _GEMV_R)


def _gemv(fmt: str, nt: int, n: int, slots: int, tuning: Tuning, sms: int, variant: str | None = None,
          sig: str = _GEMV_SIG):
    """The GEMV kernel for n rows x `slots` grid columns (variant "i8": the int8-input one), and
    its grid's x extent."""
    plain = _gemv_blocks(n)
    ks = tuning.gemv_ksplit
    split = ks == "1" or (ks != "0" and plain * slots < 2 * sms)
    suffix = f"_{variant}" if variant else ""
    if split:
        return _kernels(tuning).get(f"gemv_{fmt}_{nt}_k4{suffix}", sig), (n + _GEMV_R - 1) // _GEMV_R
    return _kernels(tuning).get(f"gemv_{fmt}_{nt}{suffix}", sig), plain


def _p(ptr) -> np.uintp:
    return np.uintp(0 if ptr is None else int(ptr))


def _gemv_call(f, grid, stream, x_ptr, w: QuantWeight, y_ptr, bias_ptr, T: int, *extra, ids_ptr=None,
               expert_stride: int = 0, top_k: int = 1, x_per_slot: bool = False, accumulate: bool = False) -> None:
    """Launches a gemv_* kernel with GEMV_ARGS (quant_matmul.cu) and the variant's `extra` arguments."""
    f.prepared_async_call(grid, (_GEMV_WARPS * 32, 1, 1), stream,
                          _p(x_ptr), _p(w.ptr), _p(y_ptr), _p(bias_ptr), _p(ids_ptr), np.int32(T), np.int32(w.n),
                          np.int32(w.k), np.int64(expert_stride), np.int32(top_k), np.int32(bool(x_per_slot)),
                          np.int32(bool(accumulate)), *extra)


def _stream_handle(stream):
    return stream  # pycuda Stream or None (default stream)


# GEMVs on an int8-quantized input (gemv_*_<nt>_i8 after quantize_x8): the integer formats
# only, for matrices of at least _I8_MIN weights (small ones are latency-bound, where the extra
# quantize launch costs more than the faster products save). The float path spends as much on
# decoding and FMAs as on reading: phi3-mini's step 3,087 -> 2,714 us with it, Q4_K GEMV 17.2 -> 12.9 us
# (H100 CUPTI trace, 2026-11-23); qwen2.5-0.5b even. tuning.gemv_int8 / gemv_int8_min.
I8_FORMATS = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.MXFP4, Q.Q4_K, Q.Q5_K, Q.Q6_K})


def quantize_x8(x_ptr, xq_ptr, xd_ptr, n: int, stream, tuning: Tuning = DEFAULT) -> None:
    """n floats (n % 32 == 0; several rows of k % 32 == 0 back to back) -> n signed bytes and n / 32 scales."""
    q = _kernels(tuning).get("quantize_x8", "PPPi")
    q.prepared_async_call(((n // 32 + 7) // 8, 1), (256, 1, 1), stream, _p(x_ptr), _p(xq_ptr), _p(xd_ptr),
                          np.int32(n))


# The per-slot MoE GEMV (few slots: gpt-oss at B=1) on the int8-quantized input too; gate and up
# share one quantized copy of x and one launch (moe_matmul_pair). tuning.moe_int8.


def _i8_kernel_for(w: QuantWeight) -> bool:
    """Whether an int8-input GEMV exists for w (integer format, whole 32-element input blocks)."""
    return w.qtype in I8_FORMATS and w.k % 32 == 0


def moe_i8_eligible(w: QuantWeight, grouped: bool, tuning: Tuning = DEFAULT) -> bool:
    """Whether moe_matmul's per-slot GEMV on w takes the int8 input (the caller passes x8 scratch)."""
    return tuning.moe_int8 and not grouped and _i8_kernel_for(w) and w.n * w.k >= tuning.gemv_int8_min


def _i8_gemv(x_ptr, w: QuantWeight, y_ptr, bias_ptr, x8: tuple, x8_ready: bool, n_in: int, slots: int, stream,
             tuning: Tuning, sms: int, T: int = 1, pair: tuple | None = None, **call) -> None:
    """The int8-input GEMV of T <= GEMV_MAX_T token rows over `slots` grid columns, after quantize_x8
    of x's n_in floats into x8 = (xq_ptr, xd_ptr) unless x8_ready (x's producer wrote them). pair:
    (weight pointer, bias pointer) of a second matrix of w's format and shape that the grid's second
    half of `slots` runs on (gemv_*_i8_pair)."""
    if not _i8_kernel_for(w):
        raise ValueError(f"the int8-input GEMV serves integer formats with k % 32 == 0 ({w.qtype.name} k={w.k})")
    xq_ptr, xd_ptr = x8
    if not x8_ready:
        quantize_x8(x_ptr, xq_ptr, xd_ptr, n_in, stream, tuning)
    extra = () if pair is None else tuple(map(_p, pair))
    f, gx = _gemv(_NAME[w.qtype], _nt(T), w.n, slots, tuning, sms, "i8" if pair is None else "i8_pair",
                  sig=_GEMV_SIG + "P" * (1 + len(extra)))
    _gemv_call(f, (gx, slots), stream, xq_ptr, w, y_ptr, bias_ptr, T, _p(xd_ptr), *extra, **call)


def _i8_gemm_rows(T: int, tuning: Tuning, decode: bool) -> bool:
    """Whether T token rows take the int8 tensor-core GEMM (tuning.gemm_int8_max): only the rows of a
    decode step (one token each); prompt rows keep the f16 GEMM's and cuBLAS's precision."""
    return decode and GEMV_MAX_T < T <= min(tuning.gemm_int8_max, GEMM_I8_MAX_T)


def i8_rows(T: int, tuning: Tuning = DEFAULT, decode: bool = True) -> bool:
    """Whether T token rows take an int8-rounded input: the GEMV's (tuning.gemv_int8_tokens, at most
    GEMV_MAX_T) or the int8 GEMM's (decode: the rows are a decode step's). What the input's producers
    also go by when they write the rounding beside it."""
    return 1 <= T <= min(tuning.gemv_int8_tokens, GEMV_MAX_T) or _i8_gemm_rows(T, tuning, decode)


def i8_eligible(w: QuantWeight, T: int, tuning: Tuning = DEFAULT, decode: bool = True) -> bool:
    """Whether a T-token matmul on w takes the int8-rounded input (the int8 GEMV, or the int8 GEMM
    above GEMV_MAX_T tokens of a decode step; the caller then passes x8 scratch of T * k bytes and
    T * k / 32 scales)."""
    if not _i8_kernel_for(w):
        return False
    if T > GEMV_MAX_T:
        return _i8_gemm_rows(T, tuning, decode) and w.n_experts is None
    return tuning.gemv_int8 and i8_rows(T, tuning) and w.n * w.k >= tuning.gemv_int8_min


# The int8 tensor-core GEMM (cuda/mma_i8.cu): 128 weight rows by BM tokens a block, 256 k a stage,
# two stages of raw row bytes and input levels in flight in dynamic shared memory.
GEMM_I8_MAX_T = 64
_I8_BN, _I8_KS, _I8_STAGES = 128, 256, 2


@functools.lru_cache(maxsize=None)
def gemm_i8_smem(qtype, bm: int) -> int:
    """Dynamic shared memory of a gemm_i8 block (the layout at the top of cuda/mma_i8.cu)."""
    bs, ts = GGML_QUANT_SIZES[Q(qtype)]
    rstr = (_I8_KS // bs * ts + 30) // 16 * 16 + 16
    return _I8_STAGES * _I8_BN * rstr + _I8_STAGES * bm * (_I8_KS + 16) + _I8_STAGES * 8 * bm * 4 + 8 * bm * 4


def _i8_kernels(tuning: Tuning = DEFAULT) -> _Kernels:
    return _module("mma_i8", (tuning.gemm_i8_unroll,), tuning)


def _gemm_i8(xq_ptr, xd_ptr, w: QuantWeight, y_ptr, bias_ptr, T: int, accumulate: bool, stream, tuning: Tuning,
             sms: int) -> None:
    """The int8 GEMM of T (9..64) token rows on x's int8 rounding; split-K (_split_k, y set to bias
    first) in whole 256-element stages, gemm_min_ksteps' 64-element k-steps at least a split."""
    bm = 16 if T <= 16 else 32 if T <= 32 else 64
    splits, kchunk = _split_k(-(-w.n // _I8_BN) * -(-T // bm), w.k, _I8_KS, tuning.gemm_min_ksteps * 64 // _I8_KS, sms,
                              tuning.gemm_i8_ctas)
    if splits > 1:
        _gemm_init(y_ptr, bias_ptr, T, w.n, accumulate, stream, tuning)
    smem = gemm_i8_smem(w.qtype, bm)
    f = _i8_kernels(tuning).get(f"gemm_i8_{_NAME[w.qtype]}_{bm}", "PPPPPiiiii", smem)
    f.prepared_async_call((-(-w.n // _I8_BN), -(-T // bm), splits), (_GEMM_THREADS, 1, 1), stream,
                          _p(xq_ptr), _p(xd_ptr), _p(w.ptr), _p(y_ptr), _p(bias_ptr), np.int32(T), np.int32(w.n),
                          np.int32(w.k), np.int32(bool(accumulate)), np.int32(kchunk), shared_size=smem)


def _nt(T: int) -> int:
    """The GEMV kernel's token count for T <= GEMV_MAX_T rows (the rest of its rows are duplicate loads)."""
    return 1 if T == 1 else 2 if T == 2 else 4 if T <= 4 else 8


def matmul(x_ptr, w: QuantWeight, y_ptr, T: int, stream, bias_ptr=None, accumulate: bool = False,
           x8: tuple | None = None, x8_ready: bool = False, tuning: Tuning = DEFAULT, sms: int = DEFAULT_SMS) -> None:
    """y[T, n] = x[T, k] @ W^T (+ bias[n]) (+ y when accumulate). x8 = (xq_ptr, xd_ptr), scratch of
    T * k bytes and T * k / 32 floats (T <= GEMV_MAX_T): x is quantized to int8 there first and the
    int8-input GEMV runs (see i8_eligible); x8_ready: it already holds x's rounding (written by the
    kernel that produced x, or an earlier matmul on x). sms: the device's multiprocessors, which size
    split-K and the GEMV layout."""
    if T <= 0:
        return
    ks = _kernels(tuning)
    fmt = _NAME[w.qtype]
    if x8 is not None and T > GEMV_MAX_T:
        if T > GEMM_I8_MAX_T or w.n_experts is not None or not _i8_kernel_for(w):
            raise ValueError(f"the int8 GEMM serves dense integer formats of T <= {GEMM_I8_MAX_T}, not "
                             f"{w.qtype.name} T={T}")
        if not x8_ready:
            quantize_x8(x_ptr, x8[0], x8[1], T * w.k, stream, tuning)
        _gemm_i8(x8[0], x8[1], w, y_ptr, bias_ptr, T, accumulate, stream, tuning, sms)
        return
    if x8 is not None:
        _i8_gemv(x_ptr, w, y_ptr, bias_ptr, x8, x8_ready, T * w.k, 1, stream, tuning, sms, T=T, accumulate=accumulate)
        return
    if T <= GEMV_MAX_T:
        f, gx = _gemv(fmt, _nt(T), w.n, 1, tuning, sms)
        _gemv_call(f, (gx, 1), stream, x_ptr, w, y_ptr, bias_ptr, T, accumulate=accumulate)
        return
    bm = 16 if T <= 16 else 32 if T <= 32 else GEMM_MAX_BM
    # gemm_min_ksteps 64-element k-steps at least a split
    splits, kchunk = _split_k(-(-w.n // _GEMM_BN) * -(-T // bm), w.k, 64, tuning.gemm_min_ksteps, sms)
    if splits > 1:
        _gemm_init(y_ptr, bias_ptr, T, w.n, accumulate, stream, tuning)
    f = ks.get(f"gemm_{fmt}_{bm}", _GEMM_SIG)
    f.prepared_async_call(((w.n + _GEMM_BN - 1) // _GEMM_BN, (T + bm - 1) // bm, splits), (_GEMM_THREADS, 1, 1), stream,
                          _p(x_ptr), _p(w.ptr), _p(y_ptr), _p(bias_ptr), np.int32(T), np.int32(w.n), np.int32(w.k),
                          np.int32(bool(accumulate)), np.int32(kchunk))


def embed(ids_ptr, w: QuantWeight, y_ptr, T: int, stream, tuning: Tuning = DEFAULT) -> None:
    """y[t, :] = dequantized row ids[t] of w (int32 ids, float32 [T, k] output)."""
    if T <= 0:
        return
    f = _kernels(tuning).get(f"embed_{_NAME[w.qtype]}", "PPPi")
    parts = w.k // 8
    f.prepared_async_call(((parts + _EMBED_THREADS - 1) // _EMBED_THREADS, T), (_EMBED_THREADS, 1, 1), stream,
                          _p(ids_ptr), _p(w.ptr), _p(y_ptr), np.int32(w.k))


def _moe_plan(T: int, top_k: int, n_experts: int) -> tuple[int, int, int]:
    """(BM, row tiles Y, workspace int32 count) of the grouped MoE GEMM for T tokens x top_k slots."""
    S, E = T * top_k, int(n_experts)
    avg = S / max(1, min(E, S))  # slots per used expert if routing were even
    bm = 16 if avg <= 16 else 32 if avg <= 32 else 64 if avg <= 64 else 128
    # sum over experts of ceil(c_e / bm) <= floor(S / bm) + (number of non-empty experts)
    Y = S // bm + min(E, S)
    return bm, Y, (E + 1) + S + 2 * Y


def moe_workspace_ints(T: int, top_k: int, n_experts: int) -> int:
    """int32 elements of workspace the grouped MoE path needs (off[E+1], perm[T*top_k], tile table)."""
    return _moe_plan(T, top_k, n_experts)[2]


def moe_grouped_possible(T: int, top_k: int, n_experts: int) -> bool:
    """Whether the grouped kernels can serve this shape (expert count, grid-y limit)."""
    if T <= 0 or not 0 < n_experts <= MOE_MAX_EXPERTS_GROUPED:
        return False
    return _moe_plan(T, top_k, n_experts)[1] <= 65535


def moe_use_grouped(T: int, top_k: int, n_experts: int) -> bool:
    """The default choice: grouped GEMM when there are many slots per expert, else per-slot GEMV."""
    S = T * top_k
    return (S >= MOE_GROUPED_MIN_SLOTS and S >= MOE_GROUPED_MIN_PER_EXPERT * n_experts
            and moe_grouped_possible(T, top_k, n_experts))


# Grouped MXFP4 tiles of BM <= 64 decode a whole 17-byte block per thread from five aligned word
# loads (gemm_moe_mxfp4_<bm>_blk) instead of four byte loads and a scale load per 8-weight part:
# ncu had the per-part kernel bound by issue (0.54 instructions per scheduler per cycle, L1 66 %
# busy, DRAM 12 %); gpt-oss-20b B=64 349 -> 195 us per grouped matmul (H100, 2026-11-23), so the
# per-part tiles of those sizes are gone (BM 128 keeps them: its registers leave no room).


def moe_group(expert_ids_ptr, T: int, top_k: int, n_experts: int, workspace_ptr, stream,
              tuning: Tuning = DEFAULT) -> None:
    """Sorts the T*top_k slots of expert_ids [T, top_k] (int32) by expert into the workspace (one block)."""
    bm, Y, _ = _moe_plan(T, top_k, n_experts)
    f = _kernels(tuning).get("moe_group", "PiiiiP")
    f.prepared_async_call((1, 1), (_MOE_GROUP_THREADS, 1, 1), stream, _p(expert_ids_ptr), np.int32(T * top_k),
                          np.int32(n_experts), np.int32(bm), np.int32(Y), _p(workspace_ptr))


def moe_grouped_i8(w: QuantWeight, T: int, top_k: int, tuning: Tuning = DEFAULT, decode: bool = True) -> bool:
    """Whether the grouped MoE matmul of T tokens on w takes the int8 GEMM (gemm_i8_moe_*; the caller
    then passes x8 scratch for its input rows): an integer format, row tiles of at most 64 slots, and
    a decode step (tuning.moe_int8) or a prompt step (tuning.moe_int8_prompt)."""
    return (T > 0 and (tuning.moe_int8 if decode else tuning.moe_int8_prompt) and _i8_kernel_for(w)
            and _moe_plan(T, top_k, w.n_experts or 1)[0] <= 64)


def moe_pair_eligible(w_gate: QuantWeight, w_up: QuantWeight, grouped: bool, tuning: Tuning = DEFAULT) -> bool:
    """Whether gate and up take one per-slot int8 GEMV launch (moe_matmul_pair; gpt-oss-20b's B=1 graph
    2,313 -> 2,145 us against two launches, H100): both on the int8 input, one format and shape (so
    one expert stride)."""
    return (moe_i8_eligible(w_gate, grouped, tuning) and moe_i8_eligible(w_up, grouped, tuning)
            and w_gate.qtype == w_up.qtype and (w_gate.n, w_gate.k) == (w_up.n, w_up.k))


def moe_matmul_pair(x_ptr, w_gate: QuantWeight, w_up: QuantWeight, expert_ids_ptr, y_ptr, T: int, top_k: int, stream,
                    x8: tuple, bias_gate_ptr=None, bias_up_ptr=None, tuning: Tuning = DEFAULT,
                    sms: int = DEFAULT_SMS) -> None:
    """moe_matmul of gate and up on one input in one per-slot int8 GEMV launch (moe_pair_eligible):
    y [2, T, top_k, n] gets gate's slots, then up's. The second half of the grid reads w_up. x is
    always rounded into x8 here, right before: the pair kernel reads the expert ids before its
    programmatic-launch wait, which is safe only with their producer two launches back."""
    if T <= 0:
        return
    _i8_gemv(x_ptr, w_gate, y_ptr, bias_gate_ptr, x8, False, T * w_gate.k, 2 * T * top_k, stream, tuning, sms,
             pair=(w_up.ptr, bias_up_ptr), ids_ptr=expert_ids_ptr, expert_stride=w_gate.expert_bytes, top_k=top_k)


def moe_matmul(x_ptr, w: QuantWeight, expert_ids_ptr, y_ptr, T: int, top_k: int, stream, bias_ptr=None,
               x_per_slot: bool = False, workspace_ptr=None, grouped: bool | None = None,
               grouped_ready: bool = False, x8: tuple | None = None, x8_ready: bool = False,
               tuning: Tuning = DEFAULT, sms: int = DEFAULT_SMS) -> None:
    """y[t, j, :] = x[t] @ W[expert_ids[t, j]]^T (+ bias[expert_ids[t, j]]).

    With x_per_slot the input of slot (t, j) is x[t, j, :] (the down projection after the gate/up
    projections produced one activation row per slot).

    Paths: per-slot GEMV (f32 math, each slot reads its expert's matrix: right for few slots), or the
    grouped tensor-core GEMM (f16 operands, f32 accumulation; each expert read once per 128 output
    rows). grouped=None picks with moe_use_grouped and needs workspace_ptr (int32,
    moe_workspace_ints(T, top_k, w.n_experts) elements; without it the GEMV path is used);
    grouped=True/False forces a path. grouped_ready=True: the workspace already holds the grouping of
    these expert_ids for the same (T, top_k, n_experts) from an earlier call (gate, up and down
    projections share one moe_group launch). x8 = (xq_ptr, xd_ptr): the per-slot GEMV on the input
    quantized to int8 there (rows x k bytes and rows x k / 32 floats, rows = T, or T * top_k with
    x_per_slot); x8_ready: it already holds this x's quantization (gate and up share one).
    """
    if T <= 0:
        return
    if not w.n_experts:
        raise ValueError("moe_matmul needs a QuantWeight created with n_experts")
    E = w.n_experts
    if grouped is None:
        grouped = workspace_ptr is not None and moe_use_grouped(T, top_k, E)
    elif grouped:
        if workspace_ptr is None:
            raise ValueError("grouped moe_matmul needs workspace_ptr (moe_workspace_ints int32 elements)")
        if not moe_grouped_possible(T, top_k, E):
            raise ValueError(f"grouped moe_matmul cannot serve T={T} top_k={top_k} E={E}")
    if grouped:
        bm, Y, _ = _moe_plan(T, top_k, E)
        if not grouped_ready:
            moe_group(expert_ids_ptr, T, top_k, E, workspace_ptr, stream, tuning)
        if x8 is not None:  # the int8 GEMM over the same row tiles (moe_grouped_i8)
            if bm > 64 or not _i8_kernel_for(w):
                raise ValueError(f"the int8 grouped MoE GEMM serves integer formats and row tiles of <= 64 slots, "
                                 f"not {w.qtype.name} BM {bm}")
            if not x8_ready:
                quantize_x8(x_ptr, x8[0], x8[1], (T * top_k if x_per_slot else T) * w.k, stream, tuning)
            smem = gemm_i8_smem(w.qtype, bm)
            f = _i8_kernels(tuning).get(f"gemm_i8_moe_{_NAME[w.qtype]}_{bm}", "PPPPPPiiiiiiqi", smem)
            f.prepared_async_call((-(-w.n // _I8_BN), Y, 1), (_GEMM_THREADS, 1, 1), stream, _p(x8[0]), _p(x8[1]),
                                  _p(w.ptr), _p(y_ptr), _p(bias_ptr), _p(workspace_ptr), np.int32(T), np.int32(top_k),
                                  np.int32(E), np.int32(Y), np.int32(w.n), np.int32(w.k), np.int64(w.expert_bytes),
                                  np.int32(bool(x_per_slot)), shared_size=smem)
            return
        blk = "_blk" if w.qtype == Q.MXFP4 and bm <= 64 else ""
        f = _kernels(tuning).get(f"gemm_moe_{_NAME[w.qtype]}_{bm}{blk}", "PPPPPiiiiiiqi")
        f.prepared_async_call(((w.n + _GEMM_BN - 1) // _GEMM_BN, Y, 1), (_GEMM_THREADS, 1, 1), stream,
                              _p(x_ptr), _p(w.ptr), _p(y_ptr), _p(bias_ptr), _p(workspace_ptr), np.int32(T),
                              np.int32(top_k), np.int32(E), np.int32(Y), np.int32(w.n), np.int32(w.k),
                              np.int64(w.expert_bytes), np.int32(bool(x_per_slot)))
        return
    if x8 is not None:
        _i8_gemv(x_ptr, w, y_ptr, bias_ptr, x8, x8_ready, (T * top_k if x_per_slot else T) * w.k, T * top_k, stream,
                 tuning, sms, ids_ptr=expert_ids_ptr, expert_stride=w.expert_bytes, top_k=top_k, x_per_slot=x_per_slot)
        return
    f, gx = _gemv(_NAME[w.qtype], 1, w.n, T * top_k, tuning, sms)
    _gemv_call(f, (gx, T * top_k), stream, x_ptr, w, y_ptr, bias_ptr, 1, ids_ptr=expert_ids_ptr,
               expert_stride=w.expert_bytes, top_k=top_k, x_per_slot=x_per_slot)
