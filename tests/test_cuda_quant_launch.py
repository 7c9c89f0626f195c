"""cuda_quant's launch decisions on the CPU, with the kernels replaced by a recorder: which kernel
each matmul takes and what it is handed (the GPU suite checks the results)."""
from __future__ import annotations

from types import SimpleNamespace

import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from orcd_grpc.backends import cuda_quant
from orcd_grpc.tuning import DEFAULT, Tuning


class _Recorder:
    def __init__(self):
        self.calls = []
        self.shared: dict[str, int] = {}  # the dynamic shared memory each kernel launched with

    def get(self, name, sig, smem=0):
        rec = self

        class _F:
            def prepared_async_call(self, grid, block, stream, *args, shared_size=0):
                rec.calls.append((name, grid, [int(a) if np.ndim(a) == 0 else a for a in args]))
                rec.shared[name] = shared_size

        return _F()


@pytest.fixture
def rec(monkeypatch):
    """Records the launches of both modules' kernels (quant_matmul's and mma_i8's), in order."""
    r = _Recorder()
    monkeypatch.setattr(cuda_quant, "_kernels", lambda tuning=DEFAULT: r)
    monkeypatch.setattr(cuda_quant, "_i8_kernels", lambda tuning=None: r)
    return r


def _experts(qtype=Q.MXFP4, n=2880, k=2880, ne=32):
    return SimpleNamespace(qtype=qtype, n=n, k=k, n_experts=ne, ptr=0x10000, expert_bytes=n * k // 2)


def test_each_module_is_built_once_per_setting_of_its_compile_time_switches(monkeypatch):
    """The launch path keys a module's build by its switches' values, not by module_options (which
    runs only on a miss): each distinct nvcc option set is built exactly once, and other switches
    (attn_splits) reuse the build."""
    from orcd_grpc.backends.cuda_runtime import module_options

    built = []
    monkeypatch.setattr(cuda_quant, "_K", {})
    monkeypatch.setattr(cuda_quant, "_Kernels", lambda module, options: built.append((module, options)) or object())
    tunings = (DEFAULT, Tuning(attn_splits=64), Tuning(gemm_i8_unroll=False), Tuning(gemm_pipe=0), DEFAULT)
    for t in tunings:
        cuda_quant._kernels(t), cuda_quant._i8_kernels(t)
    want = []
    for t in tunings:
        for m in ("quant_matmul", "mma_i8"):
            if (m, module_options(m, t)) not in want:
                want.append((m, module_options(m, t)))
    assert built == want and len(want) == 4


@pytest.mark.parametrize("x_per_slot", [False, True])
def test_moe_per_slot_int8_quantizes_each_input_row_once(rec, x_per_slot):
    """The int8 per-slot MoE GEMV: x is quantized once (T rows, or T * top_k with x_per_slot) into
    the caller's scratch, and the GEMV reads that scratch and its scales, not x; a second
    projection on the same x (x8_ready) quantizes nothing."""
    w, T, top_k = _experts(), 3, 4
    XQ, XD, X, Y, IDS = 0xA000, 0xB000, 0xC000, 0xD000, 0xE000
    cuda_quant.moe_matmul(X, w, IDS, Y, T, top_k, None, x_per_slot=x_per_slot, grouped=False, x8=(XQ, XD))
    (qname, qgrid, qargs), (gname, ggrid, gargs) = rec.calls
    rows = T * top_k if x_per_slot else T
    assert qname == "quantize_x8" and qargs == [X, XQ, XD, rows * w.k]
    assert qgrid[0] * 8 * 32 >= rows * w.k  # a warp per 32 elements, 8 warps per block
    assert gname.startswith("gemv_mxfp4_1") and gname.endswith("_i8")
    assert gargs[0] == XQ and gargs[-1] == XD and gargs[2] == Y and gargs[4] == IDS
    assert ggrid[1] == T * top_k and gargs[10] == int(x_per_slot)
    rec.calls.clear()
    cuda_quant.moe_matmul(X, w, IDS, Y, T, top_k, None, x_per_slot=x_per_slot, grouped=False, x8=(XQ, XD),
                          x8_ready=True)
    assert [c[0] for c in rec.calls] == [gname]


def test_moe_pair_is_one_launch_over_gate_then_up(rec):
    """gate and up on one rounding of x in one gemv_*_1[_k4]_i8_pair launch of twice the
    slots, gate's pointers as the GEMV's own and up's weight and bias last (its half of the grid). The
    rounding is always launched right before it (the pair reads the expert ids before its PDL wait)."""
    wg, wu, T, top_k = _experts(), _experts(), 1, 4
    wu.ptr = 0x20000
    XQ, XD, X, Y, IDS, BG, BU = 0xA000, 0xB000, 0xC000, 0xD000, 0xE000, 0xF000, 0xF800
    assert cuda_quant.moe_pair_eligible(wg, wu, False)
    assert not cuda_quant.moe_pair_eligible(wg, wu, False, Tuning(moe_int8=False))  # float input: two launches
    assert not cuda_quant.moe_pair_eligible(wg, wu, True)  # the grouped path: two launches
    assert not cuda_quant.moe_pair_eligible(wg, _experts(n=1440), False)  # shapes differ
    cuda_quant.moe_matmul_pair(X, wg, wu, IDS, Y, T, top_k, None, (XQ, XD), bias_gate_ptr=BG, bias_up_ptr=BU)
    (qname, _, qargs), (name, grid, args) = rec.calls
    assert qname == "quantize_x8" and qargs == [X, XQ, XD, T * wg.k]
    assert name.startswith("gemv_mxfp4_1") and name.endswith("_i8_pair") and grid[1] == 2 * T * top_k
    assert args[:5] == [XQ, wg.ptr, Y, BG, IDS] and args[-3:] == [XD, wu.ptr, BU]
    assert args[8] == wg.expert_bytes and args[9] == top_k and args[10] == 0  # x per token


def test_moe_per_slot_without_int8_reads_x(rec):
    w = _experts(Q.Q8_0)
    w.expert_bytes = w.n * w.k * 34 // 32
    cuda_quant.moe_matmul(0xC000, w, 0xE000, 0xD000, 1, 4, None, grouped=False)
    ((name, _, args),) = rec.calls
    assert name.startswith("gemv_q8_0_1") and not name.endswith("_i8") and args[0] == 0xC000


def test_moe_int8_is_per_slot_only_and_switchable():
    w = _experts()
    assert not cuda_quant.moe_i8_eligible(w, grouped=False, tuning=Tuning(moe_int8=False))
    assert cuda_quant.moe_i8_eligible(w, grouped=False)
    assert not cuda_quant.moe_i8_eligible(w, grouped=True)
    assert not cuda_quant.moe_i8_eligible(_experts(Q.F16), grouped=False)
    assert not cuda_quant.moe_i8_eligible(_experts(n=64, k=64), grouped=False)  # under gemv_int8_min
    assert cuda_quant.moe_i8_eligible(_experts(n=64, k=64), grouped=False, tuning=Tuning(gemv_int8_min=0))


def test_int8_gemv_eligibility_follows_the_tuning():
    w = SimpleNamespace(qtype=Q.Q4_K, n=9216, k=3072, n_experts=None)
    assert all(cuda_quant.i8_eligible(w, T) for T in range(1, 9)) and not cuda_quant.i8_eligible(w, 9, Tuning(gemm_int8_max=0))
    assert not cuda_quant.i8_eligible(w, 2, Tuning(gemv_int8_tokens=1)) and cuda_quant.i8_eligible(w, 4, Tuning(gemv_int8_tokens=4))
    assert not cuda_quant.i8_eligible(w, 1, Tuning(gemv_int8=False))
    small = SimpleNamespace(qtype=Q.Q4_K, n=256, k=256, n_experts=None)
    assert not cuda_quant.i8_eligible(small, 1) and cuda_quant.i8_eligible(small, 1, Tuning(gemv_int8_min=0))


@pytest.mark.parametrize("ksplit,sms,want", [("auto", 132, "_k4"), ("auto", 8, ""), ("0", 132, ""), ("1", 8, "_k4")])
def test_gemv_layout_follows_the_tuning_and_the_device(rec, ksplit, sms, want):
    """896 rows are 112 plain row blocks: k-split below 2 blocks per SM of the device (auto)."""
    w = SimpleNamespace(qtype=Q.Q5_0, n=896, k=896, n_experts=None, ptr=0x10000, expert_bytes=0)
    cuda_quant.matmul(0xC000, w, 0xD000, 1, None, tuning=Tuning(gemv_ksplit=ksplit), sms=sms)
    ((name, grid, _),) = rec.calls
    assert name == f"gemv_q5_0_1{want}" and grid[0] == (448 if want else 112)


@pytest.mark.parametrize("T,want", [(9, "gemm_q8_0_16"), (32, "gemm_q8_0_32"), (33, "gemm_q8_0_64"),
                                    (512, "gemm_q8_0_64")])
def test_gemm_tiles_stop_at_bm_64(rec, T, want):
    """Dense GEMMs have no BM 128 tiles (BM 64 measured faster at prefill); split-K fills 2 blocks
    per SM of the device, at least gemm_min_ksteps k-steps a split."""
    w = SimpleNamespace(qtype=Q.Q8_0, n=896, k=4096, n_experts=None, ptr=0x10000, expert_bytes=0)
    cuda_quant.matmul(0xC000, w, 0xD000, T, None, sms=132)
    names = [c[0] for c in rec.calls]
    assert names[-1] == want
    grid = rec.calls[-1][1]
    tiles = 7 * -(-T // int(want.rsplit("_", 1)[1]))
    assert grid[2] == min(-(-264 // tiles), 64 // 4) and (names[0] == "gemm_init") == (grid[2] > 1)
    rec.calls.clear()
    cuda_quant.matmul(0xC000, w, 0xD000, T, None, sms=132, tuning=dataclasses.replace(DEFAULT, gemm_min_ksteps=32))
    assert rec.calls[-1][1][2] == min(-(-264 // tiles), 2)


def test_int8_matmul_takes_a_ready_rounding_without_quantizing(rec):
    """matmul with x8_ready (its producer wrote the rounding, ORCD_FUSE_Q8): no quantize launch,
    and the GEMV reads the given int8 row and scales."""
    w = SimpleNamespace(qtype=Q.Q4_K, n=9216, k=3072, n_experts=None, ptr=0x10000, expert_bytes=0)
    cuda_quant.matmul(0xC000, w, 0xD000, 1, None, x8=(0xA000, 0xB000), x8_ready=True)
    ((name, _, args),) = rec.calls
    assert name.startswith("gemv_q4_k_1") and name.endswith("_i8") and args[0] == 0xA000 and args[-1] == 0xB000
    rec.calls.clear()
    cuda_quant.matmul(0xC000, w, 0xD000, 1, None, x8=(0xA000, 0xB000))
    assert [c[0] for c in rec.calls] == ["quantize_x8", name] and rec.calls[0][2] == [0xC000, 0xA000, 0xB000, 3072]


def test_int8_gemm_eligibility_and_launch(rec):
    """ORCD_GEMM_INT8_MAX: dense integer-format matmuls of 9..N tokens (N <= 64) take the int8 GEMM
    on x's rounding (quantized first unless ready), with the tile's shared memory, split-K (after
    gemm_init) only where the tiles leave the GPU short; experts and float formats never; the
    producers round rows for it (i8_rows)."""
    on = Tuning(gemm_int8_max=64)
    w = SimpleNamespace(qtype=Q.Q4_K, n=9216, k=3072, n_experts=None, ptr=0x10000, expert_bytes=0)
    off = Tuning(gemm_int8_max=0)
    assert not cuda_quant.i8_eligible(w, 32, off) and not cuda_quant.i8_rows(32, off)
    assert cuda_quant.i8_eligible(w, 32) and DEFAULT.gemm_int8_max == 64 and DEFAULT.gemm_blas_min == 65
    assert cuda_quant.i8_eligible(w, 9, on) and cuda_quant.i8_eligible(w, 64, on) and not cuda_quant.i8_eligible(w, 65, on)
    assert cuda_quant.i8_rows(64, on) and not cuda_quant.i8_rows(9, Tuning(gemm_int8_max=8))
    # a prompt step's rows (decode=False) keep the f16 paths; up to 8 rows the int8 GEMV either way
    assert not cuda_quant.i8_eligible(w, 32, on, decode=False) and not cuda_quant.i8_rows(32, on, decode=False)
    assert cuda_quant.i8_eligible(w, 8, on, decode=False) and cuda_quant.i8_rows(8, on, decode=False)
    assert not cuda_quant.i8_eligible(SimpleNamespace(qtype=Q.F16, n=9216, k=3072, n_experts=None), 32, on)
    assert not cuda_quant.i8_eligible(_experts(), 32, on)
    for T, bm in ((9, 16), (32, 32), (33, 64)):
        rec.calls.clear()
        cuda_quant.matmul(0xC000, w, 0xD000, T, None, x8=(0xA000, 0xB000), tuning=on, sms=132)
        names = [c[0] for c in rec.calls]
        assert names[0] == "quantize_x8" and rec.calls[0][2] == [0xC000, 0xA000, 0xB000, T * 3072]
        name, grid, args = rec.calls[-1]
        assert name == f"gemm_i8_q4_k_{bm}"
        assert rec.shared[name] == cuda_quant.gemm_i8_smem(Q.Q4_K, bm) <= 227 * 1024
        assert args[:4] == [0xA000, 0xB000, 0x10000, 0xD000] and args[5:8] == [T, 9216, 3072]
        tiles = 72 * -(-T // bm)
        splits, kchunk = grid[2], args[-1]
        assert grid[:2] == (72, -(-T // bm)) and kchunk % 256 == 0 and -(-3072 // kchunk) == splits
        assert (splits > 1) == (tiles < 264) and ("gemm_init" in names) == (splits > 1)
    # ORCD_GEMM_I8_CTAS: the split aims at that many blocks an SM (72 tiles over 12 stages: 2 -> 4 splits
    # of 3 stages, 4 -> 8 wanted, 6 of 2 stages made); never more splits than stages
    for ctas, want in ((2, 4), (4, 6), (64, 12)):
        rec.calls.clear()
        cuda_quant.matmul(0xC000, w, 0xD000, 32, None, x8=(0xA000, 0xB000), x8_ready=True,
                          tuning=Tuning(gemm_i8_ctas=ctas), sms=132)
        assert rec.calls[-1][1][2] == want
    rec.calls.clear()
    cuda_quant.matmul(0xC000, w, 0xD000, 40, None, x8=(0xA000, 0xB000), x8_ready=True, tuning=on, sms=1)
    ((name, grid, args),) = rec.calls  # no quantize_x8, no gemm_init
    assert name == "gemm_i8_q4_k_64" and grid[2] == 1 and args[-1] == 3072
    for q in cuda_quant.I8_FORMATS:
        assert cuda_quant.gemm_i8_smem(q, 64) <= 227 * 1024, q.name


@pytest.mark.parametrize("qtype,T,want", [
    (Q.MXFP4, 64, "gemm_moe_mxfp4_16_blk"), (Q.MXFP4, 300, "gemm_moe_mxfp4_64_blk"),
    (Q.MXFP4, 2000, "gemm_moe_mxfp4_128"), (Q.Q8_0, 64, "gemm_moe_q8_0_16"), (Q.Q8_0, 2000, "gemm_moe_q8_0_128")])
def test_grouped_moe_kernel_choice(rec, qtype, T, want):
    """MXFP4 tiles of BM <= 64 take the whole-block decoder; other formats and BM 128 (no such
    variant) the per-part kernels; moe_group runs first."""
    w = _experts(qtype)
    w.expert_bytes = cuda_quant.GGML_QUANT_SIZES[qtype][1] * w.n * w.k // 32
    cuda_quant.moe_matmul(0xC000, w, 0xE000, 0xD000, T, 4, None, workspace_ptr=0xF000, grouped=True)
    assert [c[0] for c in rec.calls] == ["moe_group", want]


@pytest.mark.parametrize("x_per_slot", [False, True])
def test_grouped_moe_int8_launch(rec, x_per_slot):
    """The grouped MoE matmul with x8: its input rounded once (T rows, or T * top_k with x_per_slot)
    unless ready, then gemm_i8_moe_<fmt>_<bm> over moe_group's row tiles with the rounding, the
    workspace and the expert stride; row tiles over 64 slots are refused."""
    w, T, top_k = _experts(), 64, 4
    XQ, XD, X, Y, IDS, WS = 0xA000, 0xB000, 0xC000, 0xD000, 0xE000, 0xF000
    assert cuda_quant.moe_grouped_i8(w, T, top_k)  # a decode step's slots (ORCD_MOE_INT8)
    assert not cuda_quant.moe_grouped_i8(w, T, top_k, Tuning(moe_int8=False))
    assert cuda_quant.moe_grouped_i8(w, 512, top_k, decode=False)  # a prompt's: 2,048 slots, 32 experts, BM 64
    assert not cuda_quant.moe_grouped_i8(w, 512, top_k, Tuning(moe_int8_prompt=False), decode=False)
    assert not cuda_quant.moe_grouped_i8(w, 1024, top_k, decode=False)  # BM 128: the f16 grouped GEMM
    assert not cuda_quant.moe_grouped_i8(_experts(Q.F16), T, top_k)
    cuda_quant.moe_matmul(X, w, IDS, Y, T, top_k, None, x_per_slot=x_per_slot, workspace_ptr=WS, grouped=True,
                          x8=(XQ, XD))
    rows = T * top_k if x_per_slot else T
    bm, Yt, _ = cuda_quant._moe_plan(T, top_k, w.n_experts)
    name = f"gemm_i8_moe_mxfp4_{bm}"
    assert [c[0] for c in rec.calls] == ["moe_group", "quantize_x8", name]
    assert rec.calls[1][2] == [X, XQ, XD, rows * w.k]
    _, grid, args = rec.calls[2]
    assert grid == (-(-w.n // 128), Yt, 1)
    assert args == [XQ, XD, w.ptr, Y, 0, WS, T, top_k, w.n_experts, Yt, w.n, w.k, w.expert_bytes, int(x_per_slot)]
    assert rec.shared[name] == cuda_quant.gemm_i8_smem(w.qtype, bm)
    rec.calls.clear()
    cuda_quant.moe_matmul(X, w, IDS, Y, T, top_k, None, x_per_slot=x_per_slot, workspace_ptr=WS, grouped=True,
                          grouped_ready=True, x8=(XQ, XD), x8_ready=True)
    assert [c[0] for c in rec.calls] == [name]
    with pytest.raises(ValueError, match="64 slots"):
        cuda_quant.moe_matmul(X, w, IDS, Y, 2000, top_k, None, workspace_ptr=WS, grouped=True, x8=(XQ, XD))
