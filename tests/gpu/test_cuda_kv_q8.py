"""The CUDA backend's Q8_0 KV cache (--kv-cache-type q8_0) against independent references, on
fresh random inputs:
- the store against gguf's quantize (GGML's reference rounding) of the rows turned by a float32
  Walsh-Hadamard transform (tests/q8_reference.py), bit for bit (the CPU backend's format: same bits);
- attention over it, every case and kernel path of test_cuda_ops, against the NumPy backend fed
  gguf's dequantization of the stored blocks turned back by the float64 Hadamard matrix: only
  float32 arithmetic differs (the same 3e-4 as the f16 cache's test); with ORCD_ATTN_Q8_DP4A the
  decode kernel's queries are int8 blocks too, and the reference gets them rounded the same way
  (q_dp4a), so the bound stays;
- the copy-on-write of blocks (parallel sampling) copies levels and scales;
- the tiny architectures end to end against the NumPy backend's float32 cache, within the Q8_0
  rounding the CPU backend's test allows (median 1.5e-2 of the largest logit), and far from
  another model.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

from orcd_grpc.backends.base import KVLayout

from .test_cuda_ops import ATTN_CASES, ATTN_MODES, check_attention_case, dev, tune

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "tools"))
from q8_reference import dequant, ggml_q8, hadamard64, q_dp4a  # noqa: E402

pytestmark = pytest.mark.gpu
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def be():
    from orcd_grpc.backends.cuda import CudaBackend

    b = CudaBackend(workspace_bytes=256 << 20)
    b.kv_type = "q8_0"
    yield b
    b.close()


@pytest.fixture
def rng():
    return np.random.default_rng()


def read_cache(be, kv, layer: int):
    """(K levels, V levels, K scales, V scales) of `layer`, [slots, Hkv, D] and [slots, Hkv, D / 32]."""
    L = kv.layout
    slots = L.num_blocks * L.block_size
    be.synchronize()
    out = []
    for ptr, d, dt in ((kv.k_ptr(layer), L.head_dim_k, np.int8), (kv.v_ptr(layer), L.head_dim_v, np.int8),
                       (kv.scale_ptrs(layer)[0], L.head_dim_k // 32, np.uint16),
                       (kv.scale_ptrs(layer)[1], L.head_dim_v // 32, np.uint16)):
        host = np.empty((slots, L.n_kv_heads, d), dt)
        be._drv.memcpy_dtoh(host, ptr)
        out.append(host)
    return out


def test_store_is_ggml_q8_0_of_the_turned_rows_bit_for_bit(be, rng):
    from .test_cuda_ops import simple_meta

    Hkv, D, T = 3, 128, 40
    x = np.concatenate([rng.standard_normal((8, Hkv, D)).astype(np.float32) * s for s in (1e-6, 1e-2, 1, 40, 3e4)])
    x[3, 0, :32] = 0  # an all-zero block
    x[5, 1, 40] = 500.0  # one outlier
    want_turned = np.arange(32, dtype=np.float64) - 15.5  # exact halves once turned (ties away from zero)
    want_turned[31] = 127
    x[6, 2, 64:96] = (hadamard64() @ want_turned).astype(np.float32)
    v = -x[::-1].copy()
    layout = KVLayout(n_layers=2, num_blocks=4, block_size=16, n_kv_heads=Hkv, head_dim_k=D, head_dim_v=D)
    meta = simple_meta(T)
    meta.slot_mapping = rng.permutation(64)[:T].astype(np.int32)
    meta.slot_mapping[7] = -1  # a padding token writes nothing
    kv = be.alloc_kv(layout)
    try:
        assert kv.q8 and kv.buf.nbytes == layout.bytes(34 / 32)
        be._drv.memset_d8(kv.buf.ptr, 0x55, kv.buf.nbytes)
        ctx = be.begin_step(meta)
        be.store_kv(dev(be, x), dev(be, v), kv, 1, ctx)
        kl, vl, ks, vs = read_cache(be, kv, 1)
        keep = meta.slot_mapping >= 0
        s = meta.slot_mapping[keep]
        for levels, scales, src in ((kl, ks, x), (vl, vs, v)):
            want_l, want_s = ggml_q8(src[keep])
            assert np.array_equal(scales[s], want_s)
            assert np.array_equal(levels[s], want_l)
        untouched = np.setdiff1d(np.arange(64), s)
        assert (kl[untouched].view(np.uint8) == 0x55).all() and (vs[untouched] == 0x5555).all()
        k0 = read_cache(be, kv, 0)[0]
        assert (k0.view(np.uint8) == 0x55).all()  # the other layer is untouched
    finally:
        kv.buf.free()


@pytest.mark.parametrize("Hq,Hkv,D,rot_frac,neox", [(32, 32, 96, 1, False), (14, 2, 64, 1, True),
                                                     (32, 32, 96, 0.75, True), (9, 3, 128, 0.5, False)])
def test_fused_qkv_rope_store_matches_the_three_kernels(be, rng, Hq, Hkv, D, rot_frac, neox, monkeypatch):
    """qkv_rope_store_q8 (one kernel) against split + rope_pair + kv_store_q8, the path the test
    above holds to gguf's Q8_0 bit for bit: the same q, levels and scales, at scattered slots with a
    padding token (nothing stored), neox and interleaved pairs, partial rotary dims (a neox pair's
    partner in another 32-block)."""
    from orcd_grpc.backends.base import RopeSpec

    from .test_cuda_ops import simple_meta

    T, nslots = 23, 64
    spec = RopeSpec(dim=int(D * rot_frac), base=10000.0, neox=neox)
    meta = simple_meta(T, rng.integers(0, 5000, T))
    meta.slot_mapping = rng.permutation(nslots)[:T].astype(np.int32)
    meta.slot_mapping[5] = -1
    layout = KVLayout(n_layers=2, num_blocks=4, block_size=16, n_kv_heads=Hkv, head_dim_k=D, head_dim_v=D)
    qkv = dev(be, rng.standard_normal((T, (Hq + 2 * Hkv) * D)) * 3)
    got = {}
    for fused in (False, True):
        tune(monkeypatch, be, fuse_qkv_rope=fused)
        kv = be.alloc_kv(layout)
        try:
            be._drv.memset_d8(kv.buf.ptr, 0x55, kv.buf.nbytes)
            ctx = be.begin_step(meta)
            q = be.qkv_rope_store(qkv, kv, 1, ctx, spec, Hq, Hkv, D, D)
            got[fused] = [be.to_host(q)] + read_cache(be, kv, 1) + read_cache(be, kv, 0)
        finally:
            kv.buf.free()
    keep = meta.slot_mapping[meta.slot_mapping >= 0]
    assert np.abs(got[False][0]).max() > 1 and (got[False][1][keep] != 0x55).any()  # written, not left as filled
    for a, b in zip(got[False], got[True]):
        assert np.array_equal(a, b)


_DP4A = {"attn_q8_dp4a": True}  # ORCD_ATTN_Q8_DP4A: attn_dec scores keys on int8 queries
Q8_MODES = {**{m: ATTN_MODES[m] for m in ("default", "tiled-decode", "four-slices", "dec-gqa", "dec-gqa-one-slice",
                                          "combine-launch")},
            "dp4a": _DP4A, "dp4a-one-slice": {**_DP4A, "attn_splits": 1},
            "dp4a-dec-gqa": {**ATTN_MODES["dec-gqa"], **_DP4A}}


@pytest.mark.parametrize("mode", list(Q8_MODES))
@pytest.mark.parametrize("case", ATTN_CASES, ids=[f"case{i}" for i in range(len(ATTN_CASES))])
def test_attention_over_q8_0(be, rng, case, mode, monkeypatch):
    tune(monkeypatch, be, **Q8_MODES[mode])
    if case[2] % 32:
        pytest.skip("q8_0 needs head dims in blocks of 32")
    check_attention_case(
        be, rng, case, mode, outlier_keys=True,  # what the transform is for
        cached=lambda k, v: (dequant(*ggml_q8(k)).astype(np.float32), dequant(*ggml_q8(v)).astype(np.float32)),
        fill=lambda kv: be._drv.memset_d8(kv.buf.ptr, 0xFF, kv.buf.nbytes),  # scales 0xFFFF: NaN where never written
        q_held=q_dp4a if be.tuning.attn_q8_dp4a else None)


def test_copy_blocks_copies_levels_and_scales(be, rng):
    from .test_cuda_ops import simple_meta

    Hkv, D, bs = 2, 64, 16
    layout = KVLayout(n_layers=3, num_blocks=6, block_size=bs, n_kv_heads=Hkv, head_dim_k=D, head_dim_v=D)
    kv = be.alloc_kv(layout)
    try:
        be._drv.memset_d8(kv.buf.ptr, 0, kv.buf.nbytes)
        meta = simple_meta(bs)
        meta.slot_mapping = (2 * bs + np.arange(bs)).astype(np.int32)  # block 2
        ctx = be.begin_step(meta)
        for layer in range(3):
            be.store_kv(dev(be, rng.standard_normal((bs, Hkv, D))), dev(be, rng.standard_normal((bs, Hkv, D))),
                        kv, layer, ctx)
        be.copy_kv_blocks(kv, [(2, 5)])
        for layer in range(3):
            for a in read_cache(be, kv, layer):
                assert np.array_equal(a[5 * bs: 6 * bs], a[2 * bs: 3 * bs]) and a[2 * bs: 3 * bs].any()
                assert not a[4 * bs: 5 * bs].any()
    finally:
        kv.buf.free()


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("qwen2", "Q8_0"), ("phi3", "Q8_0"), ("gemma3", "Q4_0"),
                                        ("gpt_oss", "Q8_0")])
def test_tiny_architectures_with_a_q8_0_cache(arch, qtype, tmp_path):
    from tiny_models import N_DECODE, N_PROMPT, VOCAB, engine_logits

    from .test_cuda_architectures import _path

    path = _path(arch, qtype, tmp_path)
    ids = np.random.default_rng().integers(0, VOCAB, N_PROMPT + N_DECODE)
    ref = engine_logits(path, ids, "numpy")
    scale = np.abs(ref).max()
    got8 = np.abs(engine_logits(path, ids, "cuda", kv_cache_type="q8_0") - ref).max(axis=-1) / scale
    got16 = np.abs(engine_logits(path, ids, "cuda", kv_cache_type="f16") - ref).max(axis=-1) / scale
    print(f"{arch} {qtype}: cuda q8_0 KV rel median {np.median(got8):.2e} max {got8.max():.2e}; "
          f"f16 KV max {got16.max():.2e}")
    # The weights' own quantization is in both (2e-2: test_cuda_architectures' bound); Q8_0 adds
    # each cached value's rounding to 1/254 of its 32's largest (the CPU backend's test: 1.5e-2
    # median). gpt-oss may route a token to another expert on a near-tie: a few positions.
    flips = 4 if arch == "gpt_oss" else 0
    assert np.sum(got8 > 4e-2) <= flips and np.median(got8) <= 2e-2, (arch, np.sort(got8)[-5:])
