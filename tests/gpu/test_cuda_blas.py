"""The cuBLAS path of large dense matmuls (cuda_blas.py, cuda/dequant.cu) against gguf's dequantize
and a float64 NumPy product, on fresh random weights and activations, through CudaBackend.linear.

Weights and activations are rounded to f16 (the activations after one power-of-two scale for the
whole matrix), products accumulate in float32: the same 3e-3 bound as the fused tensor-core GEMM
(test_quant_kernels.TOL_GEMM), by ||out - ref|| / ||ref||, and row by row where rows differ in
magnitude. Each test also checks that cuBLAS ran (the backend's record of recent launches).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

from .test_quant_kernels import FORMATS, TOL_GEMM, random_weight  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def be():
    from orcd_grpc.backends import cuda_blas
    from orcd_grpc.backends.cuda import CudaBackend

    assert cuda_blas.library() is not None, "no libcublas found (ORCD_CUBLAS, the nvidia-cublas wheel, CUDA_HOME)"
    from orcd_grpc.tuning import Tuning

    b = CudaBackend(workspace_bytes=512 << 20, tuning=Tuning(gemm_blas_min=256))
    assert b._blas is not None
    yield b
    b.close()


@pytest.fixture
def blas_from(monkeypatch, be):
    def set_min(t):
        monkeypatch.setattr(be, "tuning", dataclasses.replace(be.tuning, gemm_blas_min=t))
    return set_min


def _linear(be, x, w, bias=None):
    be.synchronize()
    be._drv.memset_d32(be.ws.base, 0x7FC00000, be.ws.size // 4)  # NaN: an unwritten output shows
    be._recent.clear()
    xd = be.from_host(x)
    bd = be.from_host(bias) if bias is not None else None
    y = be.linear(xd, w, bd)
    used = "cublasGemmEx" in be._recent  # read before to_host: its synchronize clears the list
    return be.to_host(y), used


def _rel(out, ref):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _shape(qtype):
    return (1000, 2880) if GGML_QUANT_SIZES[qtype][0] == 32 else (1000, 1280)


@pytest.mark.parametrize("T", [256, 300])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda v: v.name)
def test_blas_matmul_matches_float64(be, blas_from, qtype, T):
    """Every format meets the bound; F32 and BF16 weights keep the fused kernels (f16 would round them)."""
    blas_from(256)
    rng = np.random.default_rng()
    n, k = _shape(qtype)
    raw, wf = random_weight(rng, qtype, n, k)
    w = be.load_weight("w", raw, qtype, (n, k))
    x = rng.standard_normal((T, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    y, used = _linear(be, x, w, bias)
    assert used == (qtype not in (Q.F32, Q.BF16)), "the matmul took the wrong path"
    ref = x.astype(np.float64) @ wf.astype(np.float64).T + bias
    assert _rel(y, ref) <= TOL_GEMM
    y2, _ = _linear(be, x, w)
    assert _rel(y2, ref - bias) <= TOL_GEMM


def test_below_the_threshold_keeps_the_fused_gemm(be, blas_from):
    blas_from(256)
    rng = np.random.default_rng()
    raw, wf = random_weight(rng, Q.Q4_K, 512, 1024)
    w = be.load_weight("w", raw, Q.Q4_K, (512, 1024))
    x = rng.standard_normal((255, 1024), dtype=np.float32)
    y, used = _linear(be, x, w)
    assert not used
    assert _rel(y, x.astype(np.float64) @ wf.astype(np.float64).T) <= TOL_GEMM


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.F16])
def test_panels_cover_every_row(be, blas_from, monkeypatch, qtype):
    """A weight decoded in several panels (the last one partial): every output column is written."""
    from orcd_grpc.backends import cuda_blas

    blas_from(64)
    n, k = 1000, 512
    monkeypatch.setattr(cuda_blas, "PANEL_HALVES", 300 * k)  # 256-row panels: 256, 256, 256, 232
    assert cuda_blas.panel_rows(n, k) == 256
    rng = np.random.default_rng()
    raw, wf = random_weight(rng, qtype, n, k)
    w = be.load_weight("w", raw, qtype, (n, k))
    x = rng.standard_normal((97, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    y, used = _linear(be, x, w, bias)
    assert used
    ref = x.astype(np.float64) @ wf.astype(np.float64).T + bias
    col_err = np.linalg.norm(y - ref, axis=0) / np.linalg.norm(ref, axis=0)
    assert col_err.max() <= 1e-2, f"column {int(col_err.argmax())} rel err {col_err.max():.2e}"
    assert _rel(y, ref) <= TOL_GEMM


@pytest.mark.parametrize("top", [1e-2, 1e4, 1e30, np.inf])
def test_row_magnitudes(be, blas_from, top):
    """Rows from 1e-2 to 1e4 in one matrix each meet the bound (the matrix's one scale keeps them all
    in f16's normal range); a matrix whose largest row is 1e30 does not overflow, and that row is right;
    a row holding an Inf (one sequence's overflow) sets no scale: the rows beside it stay right."""
    blas_from(64)
    rng = np.random.default_rng()
    n, k = 700, 1024
    raw, wf = random_weight(rng, Q.Q6_K, n, k)
    w = be.load_weight("w", raw, Q.Q6_K, (n, k))
    T = 128
    mags = np.geomspace(1e-2, 1e4, T) if top < 1e30 else np.ones(T)
    if top == 1e30:
        mags[7] = 1e30
    elif top == 1e-2:
        mags = mags * 1e-4  # the whole matrix tiny: 1e-6 .. 1
    mags[9] *= 3e4 if top == np.inf else 1  # beside the Inf: a row past f16's range unless scaled
    x = (rng.standard_normal((T, k)) * mags[:, None]).astype(np.float32)
    if top == np.inf:
        x[7, 5] = np.inf
    y, used = _linear(be, x, w)
    assert used
    ref = x.astype(np.float64) @ wf.astype(np.float64).T
    rows = [7] if top == 1e30 else [r for r in range(T) if r != 7] if top == np.inf else range(T)
    err = np.array([np.linalg.norm(y[r] - ref[r]) / np.linalg.norm(ref[r]) for r in rows])
    assert np.isfinite(y[rows]).all()
    assert err.max() <= TOL_GEMM, f"row {list(rows)[int(err.argmax())]} rel err {err.max():.2e}"


def test_workspace_too_small_falls_back(be, blas_from, monkeypatch):
    """No room in the step workspace for the f16 operands: the fused GEMM serves the call instead."""
    from orcd_grpc.errors import ResourceExhausted

    blas_from(64)
    rng = np.random.default_rng()
    raw, wf = random_weight(rng, Q.Q8_0, 256, 512)
    w = be.load_weight("w", raw, Q.Q8_0, (256, 512))
    x = rng.standard_normal((100, 512), dtype=np.float32)
    real_out = be._out
    calls = []

    def refuse_big(shape, dtype=np.float32):
        calls.append(shape)
        if len(calls) > 1:  # y itself, then the first f16 operand
            raise ResourceExhausted("test: workspace full", field="workspace")
        return real_out(shape, dtype)

    be._recent.clear()
    xd = be.from_host(x)
    monkeypatch.setattr(be, "_out", refuse_big)
    y = be.linear(xd, w)
    monkeypatch.setattr(be, "_out", real_out)
    assert len(calls) == 2, "cuda_blas.matmul did not ask the workspace for its operands"
    assert "cublasGemmEx" not in be._recent
    assert _rel(be.to_host(y), x.astype(np.float64) @ wf.astype(np.float64).T) <= TOL_GEMM


def test_no_room_for_cublas_workspace_keeps_the_backend():
    """A --max-vram too small for cuBLAS's 32 MiB workspace: the backend starts without cuBLAS (the
    fused GEMM serves every matmul) rather than refusing to start."""
    from orcd_grpc.backends.cuda import CudaBackend
    from orcd_grpc.tuning import Tuning

    b = CudaBackend(max_vram=40 << 20, workspace_bytes=16 << 20, tuning=Tuning(gemm_blas_min=256))
    try:
        assert b._blas is None
    finally:
        b.close()
    assert b.budget.used == 0


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.Q6_K])
def test_resident_f16_weight_matches_float64(qtype):
    """ORCD_GEMM_F16_WEIGHTS: the weight is decoded to f16 once at load, its budget reservation covers
    the copy, the product reads it (no dequant_h per call) and meets the same bound; closing the
    backend gives all of it back."""
    from orcd_grpc.backends.cuda import CudaBackend
    from orcd_grpc.tuning import Tuning

    b = CudaBackend(workspace_bytes=256 << 20, tuning=Tuning(gemm_blas_min=64, gemm_f16_weights=True))
    try:
        assert b._f16_weights
        rng = np.random.default_rng()
        n, k = 1000, 2048
        raw, wf = random_weight(rng, qtype, n, k)
        before = b.budget.available
        w = b.load_weight("w", raw, qtype, (n, k))
        assert w.f16_ptr and before - b.budget.available >= n * k * 2 + raw.nbytes
        x = rng.standard_normal((96, k), dtype=np.float32)
        b.synchronize()
        yd = b.linear(b.from_host(x), w)
        names = list(b._recent)  # before to_host's synchronize clears the list
        assert "cublasGemmEx" in names and not any(name.startswith("dequant_h") for name in names), names
        assert _rel(b.to_host(yd), x.astype(np.float64) @ wf.astype(np.float64).T) <= TOL_GEMM
    finally:
        b.close()
    assert b.budget.used == 0
