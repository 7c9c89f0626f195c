"""GPU checks of the MoE expert matmuls (cuda_quant.moe_matmul): the grouped tensor-core path
(moe_group + gemm_moe_<fmt>_<bm>) and the per-slot GEMV path, both against gguf's own dequantize + a
float64 NumPy reference, with fresh random weights / activations / routing on every run and the output
poisoned with NaN first. Tolerances (||out - ref|| / ||ref||, see test_quant_kernels):
  * grouped (f16 operands, f32 accumulation): 3e-3, also row by row for wide-range activations
  * per-slot GEMV (f32): 1e-4
  * per-slot GEMV on the int8-rounded input (quantize_x8 + gemv_*_1[_k4]_i8, ORCD_MOE_INT8): 1e-3
    against the rounded input (a wrong row or scale offset is off by O(1)), 2e-2 against the float one
  * grouped GEMM on int8 tensor cores (gemm_i8_moe_*, decode and prompt steps): the same two bounds
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

from orcd_grpc.tuning import DEFAULT, Tuning  # noqa: E402

from .test_quant_kernels import (TOL_GEMM, TOL_GEMV, _quantize_x8_ref, cu, random_weight, rel_err,  # noqa: E402,F401
                                 row_errors, wide_range_x)

pytestmark = pytest.mark.gpu

E, TOP_K = 32, 4


def _routing(rng, T, E, top_k, kind):
    if kind == "uniform":  # distinct experts per token, as moe_route produces
        return np.stack([rng.choice(E, top_k, replace=False) for _ in range(T)]).astype(np.int32)
    # skewed: most slots on 3 hot experts (several row tiles for one expert), a few elsewhere, most idle
    hot = rng.choice(E, 3, replace=False)
    ids = np.empty((T, top_k), np.int32)
    for t in range(T):
        pick = list(hot) + list(rng.choice(np.setdiff1d(np.arange(E), hot), top_k, replace=False))
        ids[t] = np.array(pick[:top_k] if rng.random() < 0.8 else pick[-top_k:], np.int32)
        rng.shuffle(ids[t])
    return ids


def _reference(x, wf, bias, ids, x_per_slot):
    T, top_k = ids.shape
    ref = np.empty((T, top_k, wf.shape[1]))
    for t in range(T):
        for j in range(top_k):
            xv = (x[t, j] if x_per_slot else x[t]).astype(np.float64)
            ref[t, j] = wf[ids[t, j]].astype(np.float64) @ xv + (bias[ids[t, j]] if bias is not None else 0.0)
    return ref


_WEIGHTS: dict = {}


def _expert_weight(qtype, n, k, ne=E):
    """one random expert stack per (format, shape) per run (the float64 reference is the slow part)"""
    key = (qtype, n, k, ne)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        _WEIGHTS[key] = random_weight(np.random.default_rng(), qtype, n, k, lead=(ne,))
    return _WEIGHTS[key]


def _run(cu, qtype, T, x_per_slot, grouped, routing="uniform", with_bias=True, wide=False, n=301, k=None, ne=E,
         int8=False, tuning=DEFAULT):
    k = k or (2880 if GGML_QUANT_SIZES[qtype][0] == 32 else 768)
    rng = np.random.default_rng()
    raw, wf = _expert_weight(qtype, n, k, ne)
    bias = rng.standard_normal((ne, n), dtype=np.float32) if with_bias else None
    ids = _routing(rng, T, ne, TOP_K, routing)
    rows = T * TOP_K if x_per_slot else T
    x = wide_range_x(rng, rows, k) if wide else rng.standard_normal((rows, k), dtype=np.float32)
    x = x.reshape((T, TOP_K, k) if x_per_slot else (T, k))
    w = cu.q.QuantWeight(raw, qtype, n, k, n_experts=ne)
    try:
        xd, idd = cu.ga.to_gpu(x), cu.ga.to_gpu(ids)
        bd = cu.ga.to_gpu(bias) if with_bias else None
        yd = cu.ga.to_gpu(np.full((T, TOP_K, n), np.nan, np.float32))
        # workspace poisoned with garbage: moe_group must write every entry the GEMM reads
        ws = cu.ga.to_gpu(rng.integers(-(1 << 30), 1 << 30, size=cu.q.moe_workspace_ints(T, TOP_K, ne)).astype(np.int32))
        x8 = None
        if int8:  # scratch poisoned: quantize_x8 must write every byte and scale the GEMV reads
            xq = cu.ga.to_gpu(rng.integers(-128, 128, rows * k).astype(np.int8))
            xs = cu.ga.to_gpu(np.full(rows * k // 32, np.nan, np.float32))
            x8 = (xq.gpudata, xs.gpudata)
        cu.q.moe_matmul(xd.gpudata, w, idd.gpudata, yd.gpudata, T, TOP_K, cu.stream,
                        bias_ptr=bd.gpudata if with_bias else None, x_per_slot=x_per_slot,
                        workspace_ptr=ws.gpudata, grouped=grouped, x8=x8, tuning=tuning)
        cu.stream.synchronize()
        ref = _reference(x, wf, bias, ids, x_per_slot)
        if int8:
            return yd.get(), (ref, _reference(_quantize_x8_ref(x), wf, bias, ids, x_per_slot)), ids, ws.get()
        return yd.get(), ref, ids, ws.get()
    finally:
        w.free()


@pytest.mark.parametrize("T", [1, 5, 16, 64, 300])
@pytest.mark.parametrize("x_per_slot", [False, True], ids=["x_per_token", "x_per_slot"])
@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.Q8_0, Q.Q4_K], ids=lambda v: v.name)
def test_moe_grouped_vs_reference(cu, qtype, T, x_per_slot):
    """grouped path forced at every T (T=1 too: 4 slots, 4 experts of 32, 28 empty tiles)"""
    out, ref, _, _ = _run(cu, qtype, T, x_per_slot, grouped=True)
    err = rel_err(out, ref)
    assert err <= TOL_GEMM, f"grouped {qtype.name} T={T} x_per_slot={x_per_slot}: rel err {err:.2e}"


@pytest.mark.parametrize("T", [1, 5, 16, 64, 300])
@pytest.mark.parametrize("x_per_slot", [False, True], ids=["x_per_token", "x_per_slot"])
@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.Q8_0], ids=lambda v: v.name)
def test_moe_gemv_vs_reference(cu, qtype, T, x_per_slot):
    """the per-slot GEMV path (kept for small T) at the same sizes"""
    out, ref, _, _ = _run(cu, qtype, T, x_per_slot, grouped=False)
    err = rel_err(out, ref)
    assert err <= TOL_GEMV, f"gemv {qtype.name} T={T} x_per_slot={x_per_slot}: rel err {err:.2e}"


@pytest.mark.parametrize("ksplit", ["0", "1"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("x_per_slot", [False, True], ids=["x_per_token", "x_per_slot"])
@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.Q8_0, Q.Q4_K], ids=lambda v: v.name)
def test_moe_gemv_int8_vs_reference(cu, qtype, T, x_per_slot, ksplit):
    """the per-slot GEMV on an int8-quantized input (ORCD_MOE_INT8), both GEMV layouts: each slot
    must find its own quantized row and scales (x_per_slot) or its token's (gate / up)"""
    out, (ref, ref8), _, _ = _run(cu, qtype, T, x_per_slot, grouped=False, int8=True,
                                  tuning=Tuning(gemv_ksplit=ksplit))
    err8, err = rel_err(out, ref8), rel_err(out, ref)
    assert err8 <= 1e-3, f"int8 gemv {qtype.name} T={T} x_per_slot={x_per_slot}: {err8:.2e} against the rounded input"
    assert err <= 2e-2, f"int8 gemv {qtype.name} T={T} x_per_slot={x_per_slot}: {err:.2e} against the float input"


@pytest.mark.parametrize("ksplit", ["0", "1"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.Q8_0, Q.Q4_K], ids=lambda v: v.name)
def test_moe_pair_vs_reference(cu, qtype, T, ksplit):
    """gate and up in one launch (moe_matmul_pair), both GEMV layouts: the first half
    of the output is gate's slots with gate's biases, the second up's with up's; each against float64
    on its own experts (1e-3 on the int8-rounded input, 2e-2 on the float one)."""
    rng = np.random.default_rng()
    n = 301
    k = 2880 if GGML_QUANT_SIZES[qtype][0] == 32 else 768
    raws = [random_weight(rng, qtype, n, k, lead=(E,)) for _ in range(2)]
    biases = [rng.standard_normal((E, n), dtype=np.float32) for _ in range(2)]
    ids = _routing(rng, T, E, TOP_K, "uniform")
    x = rng.standard_normal((T, k), dtype=np.float32)
    ws = [cu.q.QuantWeight(raw, qtype, n, k, n_experts=E) for raw, _ in raws]
    tuning = Tuning(gemv_ksplit=ksplit, gemv_int8_min=0)  # small test matrices
    try:
        assert cu.q.moe_pair_eligible(ws[0], ws[1], False, tuning)
        xd, idd = cu.ga.to_gpu(x), cu.ga.to_gpu(ids)
        bd = [cu.ga.to_gpu(b) for b in biases]
        yd = cu.ga.to_gpu(np.full((2, T, TOP_K, n), np.nan, np.float32))
        xq = cu.ga.to_gpu(rng.integers(-128, 128, T * k).astype(np.int8))  # poisoned scratch
        xs = cu.ga.to_gpu(np.full(T * k // 32, np.nan, np.float32))
        cu.q.moe_matmul_pair(xd.gpudata, ws[0], ws[1], idd.gpudata, yd.gpudata, T, TOP_K, cu.stream,
                             (xq.gpudata, xs.gpudata), bias_gate_ptr=bd[0].gpudata, bias_up_ptr=bd[1].gpudata,
                             tuning=tuning)
        cu.stream.synchronize()
        out = yd.get()
    finally:
        for w in ws:
            w.free()
    x8 = _quantize_x8_ref(x)
    for h, name in enumerate(("gate", "up")):
        wf = raws[h][1]
        err8 = rel_err(out[h], _reference(x8, wf, biases[h], ids, False))
        err = rel_err(out[h], _reference(x, wf, biases[h], ids, False))
        assert err8 <= 1e-3, f"pair {name} {qtype.name} T={T}: {err8:.2e} against the rounded input"
        assert err <= 2e-2, f"pair {name} {qtype.name} T={T}: {err:.2e} against the float input"


@pytest.mark.parametrize("routing", ["uniform", "skewed"])
@pytest.mark.parametrize("T", [1, 5, 16, 64, 300])
@pytest.mark.parametrize("x_per_slot", [False, True], ids=["x_per_token", "x_per_slot"])
@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda v: v.name)
def test_moe_grouped_int8_vs_reference(cu, qtype, T, x_per_slot, routing):
    """The grouped MoE GEMM on int8 tensor cores (gemm_i8_moe_*: a decode step's slots, or a prompt's
    (ORCD_MOE_INT8_PROMPT), T = 300): every slot of every row tile finds its expert, its input
    row (its token's, or its own with x_per_slot), its scales and its output row; 1e-3 against the
    int8-rounded input, 2e-2 against the float one; skewed routing gives a hot expert several row tiles
    and leaves most tiles unused."""
    assert cu.q.moe_grouped_i8(SimpleNamespace(qtype=qtype, k=768, n_experts=E), T, TOP_K, decode=T <= 64)
    out, (ref, ref8), _, _ = _run(cu, qtype, T, x_per_slot, grouped=True, int8=True, routing=routing,
                                  with_bias=routing == "uniform", n=333)
    err8, err = rel_err(out, ref8), rel_err(out, ref)
    assert err8 <= 1e-3, f"int8 grouped {qtype.name} T={T} {routing}: {err8:.2e} against the rounded input"
    assert err <= 2e-2, f"int8 grouped {qtype.name} T={T} {routing}: {err:.2e} against the float input"


@pytest.mark.parametrize("T", [16, 64, 300])
@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.Q8_0], ids=lambda v: v.name)
def test_moe_grouped_skewed(cu, qtype, T):
    """3 hot experts take most slots (several BM row tiles each), most experts idle; no bias; odd n"""
    out, ref, ids, ws = _run(cu, qtype, T, True, grouped=True, routing="skewed", with_bias=False, n=333)
    err = rel_err(out, ref)
    assert err <= TOL_GEMM, f"grouped skewed {qtype.name} T={T}: rel err {err:.2e}"
    # the grouping itself: off = exclusive prefix sums of the counts, perm = the slots sorted by expert
    counts = np.bincount(ids.reshape(-1), minlength=E)
    off = ws[:E + 1]
    np.testing.assert_array_equal(off, np.concatenate([[0], np.cumsum(counts)]))
    perm = ws[E + 1:E + 1 + T * TOP_K]
    np.testing.assert_array_equal(np.sort(perm), np.arange(T * TOP_K))
    np.testing.assert_array_equal(ids.reshape(-1)[perm], np.repeat(np.arange(E), counts))


@pytest.mark.parametrize("T", [16, 64, 300])
@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.Q8_0], ids=lambda v: v.name)
def test_moe_grouped_wide_range(cu, qtype, T):
    """activation rows of 1e6 / 1e-3 / 1e+-20 through the grouped path: per-row (per-slot) tolerance"""
    out, ref, _, _ = _run(cu, qtype, T, True, grouped=True, with_bias=False, wide=True)
    err = row_errors(out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]))
    assert err.max() <= TOL_GEMM, f"grouped wide {qtype.name} T={T}: worst slot {int(err.argmax())} {err.max():.2e}"


@pytest.mark.parametrize("T", [5, 64])
def test_moe_auto_choice(cu, T):
    """grouped=None: T=5 (20 slots < 2 per expert) takes the GEMV path, T=64 the grouped path; both right"""
    assert cu.q.moe_use_grouped(T, TOP_K, E) == (T == 64)
    out, ref, _, _ = _run(cu, Q.MXFP4, T, False, grouped=None)
    err = rel_err(out, ref)
    assert err <= (TOL_GEMM if T == 64 else TOL_GEMV), f"auto T={T}: rel err {err:.2e}"


@pytest.mark.parametrize("x_per_slot", [False, True], ids=["x_per_token", "x_per_slot"])
def test_moe_grouped_bm128(cu, x_per_slot):
    """8 experts, T=300 top-4: ~150 slots per expert -> BM=128 tiles (the rolled-loop GEMM variant by default)"""
    assert cu.q._moe_plan(300, TOP_K, 8)[0] == 128
    out, ref, _, _ = _run(cu, Q.MXFP4, 300, x_per_slot, grouped=True, ne=8, wide=True)
    err = row_errors(out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]))
    assert err.max() <= TOL_GEMM, f"grouped BM=128: worst slot {int(err.argmax())} {err.max():.2e}"


def test_moe_grouped_small_k_and_n(cu):
    """k=96 (1.5 k-tiles), n=37 (< one 128-row tile), E=32, T=64, Q8_0"""
    out, ref, _, _ = _run(cu, Q.Q8_0, 64, True, grouped=True, n=37, k=96)
    assert rel_err(out, ref) <= TOL_GEMM


# ---- through CudaBackend.moe (route -> grouped gate/up -> act -> grouped down -> combine) ---------------
@pytest.fixture(scope="module")
def be():
    from orcd_grpc.backends.cuda import CudaBackend

    b = CudaBackend(workspace_bytes=256 << 20)
    yield b
    b.close()


@pytest.mark.parametrize("E_,k,act,T", [(32, 4, "swiglu_oai", 64), (32, 4, "swiglu_oai", 300), (8, 2, "silu", 40)])
def test_backend_moe_grouped(be, E_, k, act, T):
    """CudaBackend.moe at T where moe_use_grouped picks the grouped path (one moe_group shared by the three
    projections; its matmuls on the tensor-core GEMM) against the NumPy backend on the same Q8_0 weights;
    GEMM tolerance (f16 operands)."""
    import gguf as g

    from orcd_grpc.backends.base import StepMeta
    from orcd_grpc.backends.numpy_backend import NumpyBackend

    assert cu_q().moe_use_grouped(T, k, E_)
    rng = np.random.default_rng()
    qt = g.GGMLQuantizationType.Q8_0
    d, F = 160, 96
    ref = NumpyBackend()

    def weight(name, shape, scale):
        w = (rng.standard_normal(shape) * scale).astype(np.float32)
        raw = g.quants.quantize(w.reshape(-1, shape[-1]), qt).reshape(shape[0], shape[1], -1)
        return ref.load_weight(name, raw, qt, shape), be.load_weight(name, raw, qt, shape)

    wg, wu, wd = weight("g", (E_, F, d), 0.2), weight("u", (E_, F, d), 0.2), weight("d", (E_, d, F), 0.2)
    bg, bu, bd = (rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((E_, F), (E_, F), (E_, d)))
    x = rng.standard_normal((T, d), dtype=np.float32)
    # well separated router logits so GPU and NumPy pick the same experts
    logits = (rng.permuted(np.tile(np.arange(E_, dtype=np.float32), (T, 1)), axis=1) * 0.5
              + rng.uniform(0, 0.1, (T, E_)).astype(np.float32))
    exp = ref.moe(x, logits, k, wg[0], wu[0], wd[0], bg, bu, bd, act=act)
    pos = np.arange(T, dtype=np.int32)
    be.begin_step(StepMeta(token_ids=np.zeros(T, np.int32), positions=pos, q_starts=np.array([0, T], np.int32),
                           ctx_lens=np.array([T], np.int32), slot_mapping=pos,
                           block_tables=np.zeros((1, 1), np.int32), block_size=T,
                           logits_rows=np.array([T - 1], np.int32)))
    be.synchronize()
    be._drv.memset_d32(be.ws.base, 0x7FC00000, be.ws.size // 4)  # NaN-poison the step workspace
    dv = lambda a: be.from_host(np.asarray(a, np.float32))  # noqa: E731
    out = be.moe(dv(x), dv(logits), k, wg[1], wu[1], wd[1], dv(bg), dv(bu), dv(bd), act=act)
    got = np.asarray(be.to_host(out), np.float64)
    assert np.isfinite(got).all()
    err = float(np.linalg.norm(got - exp) / np.linalg.norm(exp))
    assert err < TOL_GEMM, f"backend moe E={E_} k={k} T={T}: rel err {err:.2e}"


def cu_q():
    from orcd_grpc.backends import cuda_quant

    return cuda_quant


@pytest.mark.parametrize("T,k,n", [(1, None, 301), (16, None, 301), (64, None, 301), (64, 96, 37), (300, 2880 + 32, 129)])
def test_moe_grouped_mxfp4_decoders_vs_reference(cu, T, k, n):
    """MXFP4 grouped tiles of BM <= 64 with the whole-block decoder (gemm_moe_mxfp4_<bm>_blk; the
    per-part tiles of those sizes are gone) against the float64 reference, for
    BM 16 (T 1..64, 4 slots each over 32 experts) and 64 (T 300), k of whole and half k-steps (17-byte
    blocks at every alignment: 90 and 91 blocks per row), n under one 128-row tile."""
    out, ref, _, _ = _run(cu, Q.MXFP4, T, True, grouped=True, k=k, n=n)
    err = rel_err(out, ref)
    assert err <= TOL_GEMM, f"MXFP4 T={T} k={k} n={n}: rel err {err:.2e}"
