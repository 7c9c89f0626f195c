"""GPU checks of cuda/quant_matmul.cu against gguf's own dequantize + a float64 NumPy matmul.

Every check draws fresh random weights (random bytes with sane f16 scales, as real GGUF blocks have)
and fresh random activations, poisons the output with NaN first, and compares by
||out - ref|| / ||ref||:
  * GEMV (T <= 8): f32 math on exactly dequantized weights   -> <= 1e-4
  * tensor-core GEMM (T > 8): weights and activations rounded to f16, f32 accumulation -> <= 3e-3
  * int8 tensor-core GEMM (9..64 tokens, ORCD_GEMM_INT8_MAX): exact integer products on the
    int8-rounded input                                        -> <= 1e-3 against that input
  * embed: exact dequantization                               -> <= 1e-6
The GEMM scales each activation row by a power of two before the f16 rounding, so rows of any finite
magnitude (1e-20 .. 1e20 in one matrix) must meet the GEMM tolerance row by row (test_gemm_wide_range).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402
from gguf import quants as gq  # noqa: E402

from orcd_grpc.tuning import Tuning  # noqa: E402

pytestmark = pytest.mark.gpu

FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.MXFP4, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32]
TS = [1, 3, 8, 17, 64, 300]
TOL_GEMV, TOL_GEMM = 1e-4, 3e-3

# byte offsets of the f16 scale fields inside a block (random bytes elsewhere)
_F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
               Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_weight(rng, qtype, n, k, lead=()):
    """Raw GGUF bytes (uint8, shape lead+(n, row_bytes)) for a random [n, k] matrix, and its float32 decode."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    shape = (*lead, n, k)
    if qtype == Q.F32:
        w = rng.standard_normal(shape, dtype=np.float32)
        return w.view(np.uint8).reshape(*lead, n, k * 4), w
    if qtype == Q.F16:
        w = rng.standard_normal(shape).astype(np.float16)
        return w.view(np.uint8).reshape(*lead, n, k * 2), w.astype(np.float32)
    if qtype == Q.BF16:
        bits = (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8).reshape(*lead, n, k * 2), (bits.astype(np.uint32) << 16).view(np.float32)
    nblk = int(np.prod(shape)) // bs
    raw = rng.integers(0, 256, size=(nblk, ts), dtype=np.uint8)
    if qtype == Q.MXFP4:
        raw[:, 0] = rng.integers(118, 126, size=nblk, dtype=np.uint8)  # E8M0 scales 2^-10 .. 2^-2
    else:
        for off in _F16_FIELDS[qtype]:
            # random magnitudes and signs so a wrong scale index shows up as an error
            d = (rng.uniform(0.5, 2.0, nblk) * rng.choice([-1, 1], nblk) * 0.01).astype(np.float16)
            raw[:, off:off + 2] = d.view(np.uint8).reshape(nblk, 2)
    raw = raw.reshape(*lead, n, k // bs * ts)
    w = gq.dequantize(raw.reshape(-1, k // bs * ts), qtype).reshape(shape).astype(np.float32)
    assert np.isfinite(w).all()
    return raw, w


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "non-finite output (unwritten element or NaN)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def cu():
    import pycuda.autoprimaryctx  # noqa: F401  (shares the device's primary context with other users)
    import pycuda.driver as drv
    import pycuda.gpuarray as ga

    from orcd_grpc.backends import cuda_quant

    class Ctx:
        pass

    c = Ctx()
    c.drv, c.ga, c.q = drv, ga, cuda_quant
    c.stream = drv.Stream()
    return c


def _shapes(qtype):
    shapes = [(1000, 256), (37, 4864), (1000, 4864)]
    if GGML_QUANT_SIZES[qtype][0] == 32:  # k=2880 is not a multiple of 256: only 32-element blocks
        shapes += [(37, 2880), (1000, 2880)]
    return shapes


CASES = [(f, t, s) for f in FORMATS for s in _shapes(f) for t in TS]


_SESSION_SEED = int(np.random.SeedSequence().entropy % (1 << 62))  # fresh weights on every run


@functools.lru_cache(maxsize=4)
def _weight(qtype, n, k):
    """shared by the T variants of one (format, shape) within a run, to save CPU time on the reference"""
    return random_weight(np.random.default_rng([_SESSION_SEED, int(qtype), n, k]), qtype, n, k)


def _gpu_matmul(cu, w, x, **kw) -> np.ndarray:
    """cuda_quant.matmul of the host rows x into a NaN-poisoned [T, n] output, synchronised (which
    raises on a launch or execution error); kw as matmul's (x8, tuning, sms, ...)."""
    xd = cu.ga.to_gpu(x)
    yd = cu.ga.to_gpu(np.full((x.shape[0], w.n), np.nan, np.float32))
    cu.q.matmul(xd.gpudata, w, yd.gpudata, x.shape[0], cu.stream, **kw)
    cu.stream.synchronize()
    return yd.get()


@pytest.mark.parametrize("qtype,T,shape", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_matmul(cu, qtype, T, shape):
    n, k = shape
    rng = np.random.default_rng()
    raw, wf = _weight(qtype, n, k)
    x = rng.standard_normal((T, k), dtype=np.float32)
    w = cu.q.QuantWeight(raw, qtype, n, k)
    try:
        y = _gpu_matmul(cu, w, x)
        ref = x.astype(np.float64) @ wf.astype(np.float64).T
        tol = TOL_GEMV if T <= cu.q.GEMV_MAX_T else TOL_GEMM
        err = rel_err(y, ref)
        assert err <= tol, f"{qtype.name} T={T} n={n} k={k}: rel err {err:.2e} > {tol}"
    finally:
        w.free()


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda v: v.name)
def test_gemv_both_layouts(cu, qtype, T):
    """Both GEMV layouts, whichever the size rule would pick: warps owning rows (ORCD_GEMV_KSPLIT=0)
    and warps splitting k (=1), on a row count that is not a multiple of either's rows per block."""
    n, k = 1003, (2880 if GGML_QUANT_SIZES[qtype][0] == 32 else 4864)
    rng = np.random.default_rng()
    raw, wf = _weight(qtype, n, k)
    x = rng.standard_normal((T, k), dtype=np.float32)
    ref = x.astype(np.float64) @ wf.astype(np.float64).T
    w = cu.q.QuantWeight(raw, qtype, n, k)
    try:
        for mode in ("0", "1"):
            err = rel_err(_gpu_matmul(cu, w, x, tuning=Tuning(gemv_ksplit=mode)), ref)
            assert err <= TOL_GEMV, f"{qtype.name} T={T} ksplit={mode}: rel err {err:.2e} > {TOL_GEMV}"
    finally:
        w.free()


@pytest.mark.parametrize("min_ksteps,sms,T", [(1, 132, 64), (2, 132, 64), (4, 132, 64), (4, 132, 300), (1, 132, 300),
                                               (1, 16, 64), (4, 1000, 300)])
@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q8_0], ids=lambda v: v.name)
def test_gemm_tiling_switches(cu, qtype, min_ksteps, sms, T):
    """The GEMM under its tuning switch (gemm_min_ksteps: k-steps per split) and SM counts other
    than the device's (split-K fills 2 blocks per SM) on qwen2.5-like shapes: every split count and
    tile lands the same sums."""
    kw = dict(tuning=Tuning(gemm_min_ksteps=min_ksteps), sms=sms)
    rng = np.random.default_rng()
    for n, k in ((896, 1024 if GGML_QUANT_SIZES[qtype][0] == 256 else 896), (128, 4864)):
        raw, wf = _weight(qtype, n, k)
        x = rng.standard_normal((T, k), dtype=np.float32)
        ref = x.astype(np.float64) @ wf.astype(np.float64).T
        w = cu.q.QuantWeight(raw, qtype, n, k)
        try:
            err = rel_err(_gpu_matmul(cu, w, x, **kw), ref)
            assert err <= TOL_GEMM, f"{qtype.name} n={n} k={k} T={T}: rel err {err:.2e}"
        finally:
            w.free()


def _quantize_x8_ref(x):
    """float64 model of quantize_x8: per 32 elements, d = max|x| / 127 and q = round(x / d)."""
    blocks = x.astype(np.float64).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    q = np.where(d > 0, np.rint(blocks / np.where(d > 0, d, 1.0)), 0.0)
    return (q * d).reshape(x.shape)


I8_FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.MXFP4, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("qtype", I8_FORMATS, ids=lambda v: v.name)
def test_gemv_int8_input(cu, qtype, T):
    """The int8-input GEMV (quantize_x8 + gemv_*_<nt>_i8) of T tokens, both layouts: against float64
    on the dequantized weights and the int8-rounded input it must agree to 1e-3 (a wrong integer
    decode is off by O(1)); against the float input, within the int8 rounding (2e-2). Each token's
    row is bit for bit what it gets alone (a verify step of 1 + k tokens decodes like k + 1 steps)."""
    assert set(I8_FORMATS) == set(cu.q.I8_FORMATS)
    n, k = 1003, (2880 if GGML_QUANT_SIZES[qtype][0] == 32 else 4864)
    rng = np.random.default_rng()
    raw, wf = _weight(qtype, n, k)
    x = rng.standard_normal((T, k), dtype=np.float32) * rng.uniform(0.1, 10.0, (T, k)).astype(np.float32)
    ref = x.astype(np.float64) @ wf.astype(np.float64).T
    ref8 = _quantize_x8_ref(x) @ wf.astype(np.float64).T
    w = cu.q.QuantWeight(raw, qtype, n, k)

    def run(rows, mode):
        xq = cu.ga.empty(rows.size, np.int8)
        xs = cu.ga.to_gpu(np.full(rows.size // 32, np.nan, np.float32))
        return _gpu_matmul(cu, w, rows, x8=(xq.gpudata, xs.gpudata), tuning=Tuning(gemv_ksplit=mode))

    try:
        for mode in ("0", "1"):
            y = run(x, mode)
            err8, err = rel_err(y, ref8), rel_err(y, ref)
            assert err8 <= 1e-3, f"{qtype.name} T={T} ksplit={mode}: rel err {err8:.2e} against the int8-rounded input"
            assert err <= 2e-2, f"{qtype.name} T={T} ksplit={mode}: rel err {err:.2e} against the float input"
            if T > 1:
                for t in (0, T - 1):
                    np.testing.assert_array_equal(y[t], run(x[t:t + 1], mode)[0])
    finally:
        w.free()


@pytest.mark.parametrize("unroll", [False, True], ids=["rolled", "unrolled"])
@pytest.mark.parametrize("T", [9, 17, 32, 33, 64])
@pytest.mark.parametrize("qtype", I8_FORMATS, ids=lambda v: v.name)
def test_gemm_int8(cu, qtype, T, unroll):
    """The int8 tensor-core GEMM (cuda/mma_i8.cu, ORCD_GEMM_INT8_MAX) of T tokens: on the int8-rounded
    input and the dequantized weights in float64 it must agree to 1e-3 (a wrong level, scale or k
    order is off by O(1)), within the rounding (2e-2) of the float input; with split-K (sms=132: few
    tiles, k split across blocks, atomics) and without (sms=1), with bias and accumulate, and with
    the input's rounding written beforehand (x8_ready, as a producer leaves it). k = 2880 leaves a
    partial 256-stage (32-element formats); n = 1003 a partial row tile. Both builds of the stage's
    k-windows (ORCD_GEMM_I8_UNROLL)."""
    n, k = 1003, (2880 if GGML_QUANT_SIZES[qtype][0] == 32 else 4864)
    rng = np.random.default_rng()
    raw, wf = _weight(qtype, n, k)
    x = rng.standard_normal((T, k), dtype=np.float32) * rng.uniform(0.1, 10.0, (T, k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    y0 = rng.standard_normal((T, n), dtype=np.float32)
    w64 = wf.astype(np.float64).T
    ref, ref8 = x.astype(np.float64) @ w64, _quantize_x8_ref(x) @ w64
    w = cu.q.QuantWeight(raw, qtype, n, k)
    tuning = Tuning(gemm_int8_max=64, gemm_i8_unroll=unroll)
    assert cu.q.i8_eligible(w, T, tuning)
    try:
        for sms in (132, 1):
            xq = cu.ga.empty(x.size, np.int8)
            xs = cu.ga.to_gpu(np.full(x.size // 32, np.nan, np.float32))
            y = _gpu_matmul(cu, w, x, x8=(xq.gpudata, xs.gpudata), tuning=tuning, sms=sms)
            err8, err = rel_err(y, ref8), rel_err(y, ref)
            assert err8 <= 1e-3, f"{qtype.name} T={T} sms={sms}: rel err {err8:.2e} against the int8-rounded input"
            assert err <= 2e-2, f"{qtype.name} T={T} sms={sms}: rel err {err:.2e} against the float input"
            # bias + accumulate on the rounding already in xq / xs (x8_ready)
            xd, bd, yd = cu.ga.to_gpu(x), cu.ga.to_gpu(b), cu.ga.to_gpu(y0)
            cu.q.matmul(xd.gpudata, w, yd.gpudata, T, cu.stream, bias_ptr=bd.gpudata, accumulate=True,
                        x8=(xq.gpudata, xs.gpudata), x8_ready=True, tuning=tuning, sms=sms)
            cu.stream.synchronize()
            err8 = rel_err(yd.get(), ref8 + b + y0)
            assert err8 <= 1e-3, f"{qtype.name} T={T} sms={sms}: bias + accumulate rel err {err8:.2e}"
    finally:
        w.free()


@pytest.mark.parametrize("T", [1, 4, 64])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.Q5_0])
def test_matmul_bias_accumulate(cu, qtype, T):
    n, k = 301, 512
    rng = np.random.default_rng()
    raw, wf = random_weight(rng, qtype, n, k)
    x = rng.standard_normal((T, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    y0 = rng.standard_normal((T, n), dtype=np.float32)
    w = cu.q.QuantWeight(raw, qtype, n, k)
    try:
        xd, bd, yd = cu.ga.to_gpu(x), cu.ga.to_gpu(b), cu.ga.to_gpu(y0)
        cu.q.matmul(xd.gpudata, w, yd.gpudata, T, cu.stream, bias_ptr=bd.gpudata, accumulate=True)
        cu.stream.synchronize()
        ref = x.astype(np.float64) @ wf.astype(np.float64).T + b + y0
        tol = TOL_GEMV if T <= cu.q.GEMV_MAX_T else TOL_GEMM
        assert rel_err(yd.get(), ref) <= tol
    finally:
        w.free()


# row magnitudes cycled over the T rows: f16 overflows above 65504 (1e6: phi3's ffn_down input on random
# weights), sinks small values into subnormals (1e-3 * small weights products are fine, 1e-20 is not)
_ROW_MAGS = [1e6, 1e-3, 1.0, 3e4, 1e20, 1e-20, 7e4, 2e-6]


def wide_range_x(rng, T, k, zero_row=None):
    mags = np.array([_ROW_MAGS[i % len(_ROW_MAGS)] for i in range(T)], np.float64)
    x = (rng.standard_normal((T, k)) * mags[:, None]).astype(np.float32)
    if zero_row is not None and zero_row < T:
        x[zero_row] = 0.0
    return x


def row_errors(out, ref):
    """per-row ||out - ref|| / ||ref|| (rows with ref == 0 must be exactly 0: reported as inf otherwise)"""
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "non-finite output (unwritten element, overflow or NaN)"
    num = np.linalg.norm(out - ref, axis=-1)
    den = np.linalg.norm(ref, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num == 0, 0.0, np.inf))


@pytest.mark.parametrize("shape", ["long_k", "short_k"])
@pytest.mark.parametrize("T", [9, 33, 100, 512])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda v: v.name)
def test_gemm_wide_range(cu, qtype, T, shape):
    """Rows of 1e6 and 1e-3 (and 1e+-20, 0) in one activation matrix: each row within the GEMM tolerance.
    long_k: n=301 (partial n-tile), k=2912 (32-element blocks; not a multiple of the 64-wide k-tile) or
    1280: few output tiles, so k is split (each split scales its own rows, partials added atomically).
    short_k: n=1000, k=288 or 256: too few k-steps to split, the direct epilogue."""
    b32 = GGML_QUANT_SIZES[qtype][0] == 32
    n, k = (301, 2912 if b32 else 1280) if shape == "long_k" else (1000, 288 if b32 else 256)
    rng = np.random.default_rng()
    raw, wf = random_weight(rng, qtype, n, k)
    x = wide_range_x(rng, T, k, zero_row=5)
    w = cu.q.QuantWeight(raw, qtype, n, k)
    try:
        y = _gpu_matmul(cu, w, x)
        ref = x.astype(np.float64) @ wf.astype(np.float64).T
        err = row_errors(y, ref)
        worst = int(np.argmax(err))
        assert err[worst] <= TOL_GEMM, (f"{qtype.name} T={T}: row {worst} (|x| ~ {np.abs(x[worst]).max():.1e}) "
                                        f"rel err {err[worst]:.2e} > {TOL_GEMM}")
    finally:
        w.free()


@pytest.mark.parametrize("T", [9, 100])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0])
def test_gemm_wide_range_bias_accumulate(cu, qtype, T):
    """bias + accumulate with huge/tiny rows: the scale is undone before bias and old y are added (both
    the split-K path, T=9, and the direct path, T=100 with n=1000)."""
    n, k = (301, 1024) if T <= 64 else (1000, 256)
    rng = np.random.default_rng()
    raw, wf = random_weight(rng, qtype, n, k)
    x = wide_range_x(rng, T, k)
    mags = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    b = rng.standard_normal(n, dtype=np.float32)
    y0 = (rng.standard_normal((T, n)) * mags).astype(np.float32)  # old y of the row's own magnitude
    w = cu.q.QuantWeight(raw, qtype, n, k)
    try:
        xd, bd, yd = cu.ga.to_gpu(x), cu.ga.to_gpu(b), cu.ga.to_gpu(y0)
        cu.q.matmul(xd.gpudata, w, yd.gpudata, T, cu.stream, bias_ptr=bd.gpudata, accumulate=True)
        cu.stream.synchronize()
        ref = x.astype(np.float64) @ wf.astype(np.float64).T + b + y0
        err = row_errors(yd.get(), ref)
        assert err.max() <= TOL_GEMM, f"{qtype.name} T={T}: worst row {int(err.argmax())} rel err {err.max():.2e}"
    finally:
        w.free()


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda v: v.name)
def test_embed(cu, qtype):
    n, k = 999, 2880 if GGML_QUANT_SIZES[qtype][0] == 32 else 4864
    rng = np.random.default_rng()
    raw, wf = random_weight(rng, qtype, n, k)
    ids = rng.integers(0, n, size=37).astype(np.int32)
    ids[0], ids[-1] = 0, n - 1  # first and last rows
    w = cu.q.QuantWeight(raw, qtype, n, k)
    try:
        idd = cu.ga.to_gpu(ids)
        yd = cu.ga.to_gpu(np.full((len(ids), k), np.nan, np.float32))
        cu.q.embed(idd.gpudata, w, yd.gpudata, len(ids), cu.stream)
        cu.stream.synchronize()
        assert rel_err(yd.get(), wf[ids].astype(np.float64)) <= 1e-6
    finally:
        w.free()


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("x_per_slot", [False, True])
@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.Q8_0, Q.Q4_K])
def test_moe_matmul(cu, qtype, T, x_per_slot):
    E, top_k, n = 8, 4, 301
    k = 2880 if GGML_QUANT_SIZES[qtype][0] == 32 else 768
    rng = np.random.default_rng()
    raw, wf = random_weight(rng, qtype, n, k, lead=(E,))
    bias = rng.standard_normal((E, n), dtype=np.float32)
    ids = np.stack([rng.choice(E, top_k, replace=False) for _ in range(T)]).astype(np.int32)
    x = rng.standard_normal((T, top_k, k) if x_per_slot else (T, k), dtype=np.float32)
    w = cu.q.QuantWeight(raw, qtype, n, k, n_experts=E)
    try:
        xd, idd, bd = cu.ga.to_gpu(x), cu.ga.to_gpu(ids), cu.ga.to_gpu(bias)
        yd = cu.ga.to_gpu(np.full((T, top_k, n), np.nan, np.float32))
        cu.q.moe_matmul(xd.gpudata, w, idd.gpudata, yd.gpudata, T, top_k, cu.stream, bias_ptr=bd.gpudata,
                        x_per_slot=x_per_slot)
        cu.stream.synchronize()
        ref = np.empty((T, top_k, n))
        for t in range(T):
            for j in range(top_k):
                xv = x[t, j] if x_per_slot else x[t]
                ref[t, j] = wf[ids[t, j]].astype(np.float64) @ xv + bias[ids[t, j]]
        assert rel_err(yd.get(), ref) <= TOL_GEMV
    finally:
        w.free()
