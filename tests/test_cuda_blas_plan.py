"""The cuBLAS path's host side without a GPU: where the library is looked for, how a weight is cut
into panels, which matmuls take the path (CudaBackend.linear's routing, over a stand-in backend),
and the calls it queues. The numbers are checked on the GPU (tests/gpu/test_cuda_blas.py)."""
from __future__ import annotations

import types

import numpy as np
import pytest

from orcd_grpc.backends import cuda_blas
from orcd_grpc.backends.cuda_ops import OpsMixin
from orcd_grpc.errors import ResourceExhausted
from orcd_grpc.tuning import Tuning


def test_panels_fit_the_budget_in_whole_128_row_steps():
    assert cuda_blas.panel_rows(896, 896) == 896                      # small: one panel
    k = 3072
    rows = cuda_blas.panel_rows(16384, k)
    assert rows % 128 == 0 and rows * k <= cuda_blas.PANEL_HALVES and (rows + 128) * k > cuda_blas.PANEL_HALVES
    assert cuda_blas.panel_rows(151936, 200_000) == 128               # never below one 128-row step
    assert cuda_blas.panel_rows(200_000, 32) == 65408                 # nor above dequant_h's grid rows


def test_candidates_put_the_operators_path_first(monkeypatch, tmp_path):
    lib = tmp_path / "libcublas.so.13"
    monkeypatch.setenv("ORCD_CUBLAS", str(lib))
    found = cuda_blas._candidates()
    assert found[0] == str(lib)
    assert "libcublas.so.13" in found  # and the dynamic loader's own search last


def test_no_library_means_no_blas(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_blas, "_candidates", lambda: [str(tmp_path / "missing" / "libcublas.so.13")])
    assert cuda_blas._open() is None


def test_switch_parses():
    assert Tuning.from_env({"ORCD_GEMM_BLAS_MIN": "0"}).gemm_blas_min == 0
    assert Tuning().gemm_blas_min == 65  # a decode step of 64 rows takes the int8 GEMM
    with pytest.raises(ValueError, match="ORCD_GEMM_BLAS_MIN"):
        Tuning.from_env({"ORCD_GEMM_BLAS_MIN": "many"})


class _T:
    def __init__(self, ptr, shape):
        self.ptr, self.shape, self.q8 = ptr, shape, None

    @property
    def size(self):
        return int(np.prod(self.shape))


class _Blas:
    gmax_ptr, alpha_ptr, beta_ptr = 9000, 9004, 9008

    def __init__(self):
        self.gemms = []

    def gemm_wt(self, *args):
        self.gemms.append(args)


class _Backend(OpsMixin):
    """The state linear() and cuda_blas.matmul read, with launches recorded instead of run."""

    def __init__(self, blas_min, room=1 << 40):
        self.tuning = Tuning(gemm_blas_min=blas_min)
        self._blas = _Blas()
        self.launches, self.quant_calls, self._recent, self._sync_each = [], [], [], False
        self.stream = object()
        self.limits = types.SimpleNamespace(sms=132)
        self._drv = types.SimpleNamespace(memset_d32_async=lambda *a: self.launches.append(("memset", a)))
        self._top, self._room = 1 << 20, room

    def _out(self, shape, dtype=np.float32):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n > self._room:
            raise ResourceExhausted("full", field="workspace")
        self._top += n
        return _T(self._top - n, shape)

    def _k(self, module, name, sig):
        return (module, name)

    def _launch(self, k, grid, block, *args, shared=0):
        self.launches.append((k[1], grid, args))

    def _quant_call(self, what, fn, *args, **kw):
        self.quant_calls.append(what)


def _weight(n, k, experts=None, qtype=None):
    from gguf import GGMLQuantizationType as Q

    return types.SimpleNamespace(n=n, k=k, qtype=Q.Q4_K if qtype is None else qtype, ptr=1 << 30, row_bytes=k // 256 * 144,
                                 n_experts=experts)


def test_linear_routes_by_token_count():
    be = _Backend(256)
    w = _weight(1000, 1024)
    be.linear(_T(4096, (255, 1024)), w)
    assert be.quant_calls == ["matmul"] and not be._blas.gemms
    be.linear(_T(4096, (256, 1024)), w, bias=_T(77, (1000,)))
    assert be.quant_calls == ["matmul"] and len(be._blas.gemms) == 1
    names = [l[0] for l in be.launches]
    assert names == ["memset", "absmax_rows", "to_half_scaled", "dequant_h_q4_k", "add_bias_rows"]
    m, T, k, wh, xh, y, ldy = be._blas.gemms[0]
    assert (m, T, k, ldy) == (1000, 256, 1024, 1000)


def test_switched_off_and_moe_weights_keep_the_fused_kernels():
    be = _Backend(0)
    be._blas = None
    be.linear(_T(4096, (512, 1024)), _weight(1000, 1024))
    be2 = _Backend(256)
    be2.linear(_T(4096, (512, 1024)), _weight(1000, 1024, experts=8))
    assert be.quant_calls == be2.quant_calls == ["matmul"] and not be2._blas.gemms


def test_panels_write_their_own_output_columns(monkeypatch):
    monkeypatch.setattr(cuda_blas, "PANEL_HALVES", 300 * 512)
    be = _Backend(64)
    w = _weight(1000, 512)
    y = be.linear(_T(4096, (97, 512)), w)
    gemms = be._blas.gemms
    assert [g[0] for g in gemms] == [256, 256, 256, 232]
    assert [g[5] - y.ptr for g in gemms] == [0, 4 * 256, 4 * 512, 4 * 768]  # float32 column offsets
    deq = [l for l in be.launches if l[0] == "dequant_h_q4_k"]
    assert [d[2][0] - w.ptr for d in deq] == [0, 256 * w.row_bytes, 512 * w.row_bytes, 768 * w.row_bytes]
    assert [d[1][1] for d in deq] == [256, 256, 256, 232]


def test_no_room_for_the_operands_falls_back():
    be = _Backend(64, room=97 * 1000 * 4)  # y fits, the f16 operands do not
    be.linear(_T(4096, (97, 512)), _weight(1000, 512))
    assert be.quant_calls == ["matmul"] and not be._blas.gemms and not be.launches


def test_f32_and_bf16_weights_keep_the_fused_kernels():
    """cuBLAS would multiply them rounded to f16 (F32 loses mantissa, BF16 range); F16 takes it."""
    from gguf import GGMLQuantizationType as Q

    for qt, blas in ((Q.F32, False), (Q.BF16, False), (Q.F16, True), (Q.Q8_0, True)):
        be = _Backend(64)
        be.linear(_T(4096, (512, 1024)), _weight(1000, 1024, qtype=qt))
        assert bool(be._blas.gemms) == blas, qt.name


def test_a_resident_f16_weight_is_read_without_decoding():
    """ORCD_GEMM_F16_WEIGHTS: a weight decoded to f16 at load is multiplied in one GEMM straight
    from that copy, with no dequant_h launch and no f16 panel taken from the workspace."""
    be = _Backend(64)
    w = _weight(1000, 1024)
    w.f16_ptr = 5 << 30
    top = be._top
    y = be.linear(_T(4096, (97, 1024)), w)
    names = [l[0] for l in be.launches]
    assert names == ["memset", "absmax_rows", "to_half_scaled"]
    (m, T, k, wh, xh, yp, ldy), = be._blas.gemms
    assert (m, T, k, wh, yp, ldy) == (1000, 97, 1024, 5 << 30, y.ptr, 1000)
    assert be._top - top == 4 * 97 * 1000 + 97 * 1024 * 2  # y and the f16 activations only


def test_f16_copies_are_counted_in_the_weight_bytes():
    """The VRAM a weight holds (the load plan's figure and the budget's reservation) includes its
    f16 copy exactly where load_weight makes one: 2-D weights cuBLAS may take, with the switch on."""
    from gguf import GGMLQuantizationType as Q

    from orcd_grpc.backends.cuda import ALIGN, CudaBackend

    def nbytes(on, qtype, shape, raw):
        be = types.SimpleNamespace(_f16_weights=on)
        be._keeps_f16 = lambda q, s: CudaBackend._keeps_f16(be, q, s)
        return CudaBackend.weight_nbytes(be, qtype, shape, raw)

    raw = 1000 * 1024 // 256 * 144
    base = nbytes(False, Q.Q4_K, (1000, 1024), raw)
    assert base == -(-(raw + 16) // ALIGN) * ALIGN
    assert nbytes(True, Q.Q4_K, (1000, 1024), raw) == base + 1000 * 1024 * 2
    assert nbytes(True, Q.F32, (1000, 1024), 4 * 1000 * 1024) == nbytes(False, Q.F32, (1000, 1024), 4 * 1000 * 1024)
    assert nbytes(True, Q.Q4_K, (8, 1000, 1024), 8 * raw) == nbytes(False, Q.Q4_K, (8, 1000, 1024), 8 * raw)
