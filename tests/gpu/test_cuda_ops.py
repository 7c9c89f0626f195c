"""Every CUDA backend op against the NumPy reference, on fresh random inputs.

Outputs come from the step workspace, which is poisoned with NaN before each op so an element a
kernel fails to write shows up as NaN. Tolerances are relative errors ||out - ref|| / ||ref||:
- float32 elementwise / norm / rope: 1e-5 (fast-math exp/tanh, reduction order);
- attention: 3e-4 against a reference fed the same f16-rounded K/V that the f16 cache holds (the
  cache format itself costs ~2^-11 relative per element; test_cuda_models covers it end to end);
  2e-3 on tensor cores (attn_mma: queries and softmax weights rounded to f16 too);
- linear / embed through cuda_quant: see there; a smoke check here at 1e-3 (f16 tensor-core tiles).
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from orcd_grpc.backends.base import KVLayout, RopeSpec, StepMeta, YarnSpec
from orcd_grpc.backends.numpy_backend import NumpyBackend
from orcd_grpc.errors import Internal, ResourceExhausted

pytestmark = pytest.mark.gpu

NAN_BITS = 0x7FC00000


@pytest.fixture(scope="module")
def be():
    from orcd_grpc.backends.cuda import CudaBackend

    b = CudaBackend(workspace_bytes=256 << 20)
    yield b
    b.close()


def tune(monkeypatch, be, **switches):
    """The shared backend under other Tuning values for one test (restored after it). Its kernels
    are looked up afresh, so a compile-time switch (ORCD_GEMM_PIPE) loads its own build."""
    monkeypatch.setattr(be, "tuning", dataclasses.replace(be.tuning, **switches))
    monkeypatch.setattr(be, "_kernels", {})


@pytest.fixture
def rng(request):
    # Fresh inputs per test (and per parameter set), reproducible from the test id.
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), "non-finite output (unwritten element?)"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def poison(be):
    be.synchronize()
    be._drv.memset_d32(be.ws.base, NAN_BITS, be.ws.size // 4)


def dev(be, a):
    return be.from_host(np.asarray(a, np.float32))


def simple_meta(T, positions=None):
    pos = np.arange(T, dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
    return StepMeta(token_ids=np.zeros(T, np.int32), positions=pos, q_starts=np.array([0, T], np.int32),
                    ctx_lens=np.array([T], np.int32), slot_mapping=np.arange(T, dtype=np.int32),
                    block_tables=np.zeros((1, 1), np.int32), block_size=max(T, 1),
                    logits_rows=np.array([T - 1], np.int32))


def decode_meta(B):
    """A decode step of B sequences, one token each (the backend's decode-step kernels)."""
    return StepMeta(token_ids=np.zeros(B, np.int32), positions=np.zeros(B, np.int32),
                    q_starts=np.arange(B + 1, dtype=np.int32), ctx_lens=np.ones(B, np.int32),
                    slot_mapping=np.arange(B, dtype=np.int32), block_tables=np.arange(B, dtype=np.int32)[:, None],
                    block_size=1, logits_rows=np.arange(B, dtype=np.int32))


# ---- norm -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (33, 1003), (5, 2304), (3, 5120), (2, 8192), (1, 12288),
                                   (9, 4, 64), (13, 7, 128), (3, 2, 256), (5, 3, 30)])
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm(be, rng, shape, with_res):
    ref = NumpyBackend()
    x = rng.standard_normal(shape, dtype=np.float32)
    r = rng.standard_normal(shape, dtype=np.float32) if with_res else None
    w = rng.standard_normal(shape[-1], dtype=np.float32)
    exp_out, exp_s = ref.rms_norm(x, w, 1e-6, r)
    be.begin_step(simple_meta(1))
    poison(be)
    out, s = be.rms_norm(dev(be, x), dev(be, w), 1e-6, dev(be, r) if with_res else None)
    assert out.shape == shape and s.shape == shape
    assert rel(be.to_host(out), exp_out) < 1e-5
    assert rel(be.to_host(s), exp_s) < 1e-6


def _check_q8(be, t, ref):
    """t.q8 (the int8 rounding its kernel wrote beside it, ORCD_FUSE_Q8) against float64 ref: each
    32-element block's scale is max|ref| / 127 (1e-5), each byte ref's rounding to it (off by one
    only where ref sits within float error of a .5 tie: < 0.1 % of bytes)."""
    xq = be.to_host(t.q8[0]).view(np.int8).reshape(-1, 32).astype(np.int64)
    xd = be.to_host(t.q8[1]).astype(np.float64)
    blocks = np.asarray(ref, np.float64).reshape(-1, 32)
    m = np.abs(blocks).max(axis=1)
    np.testing.assert_allclose(xd, m / 127, rtol=1e-5)
    q = np.rint(blocks / np.where(m > 0, m / 127, 1.0)[:, None])
    off = np.abs(xq - q)
    assert off.max() <= 1 and (off > 0).mean() < 1e-3, (off.max(), (off > 0).mean())


@pytest.mark.parametrize("rows", [1, 5, 8])
@pytest.mark.parametrize("d", [576, 896, 2304, 3072, 5120, 8192])
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm_q8(be, rng, d, with_res, rows, monkeypatch):
    """rms_norm_block_q8 (ORCD_FUSE_Q8): the rows as before plus their int8 rounding, which the
    next int8 GEMV takes instead of quantizing again, to the same output bit for bit."""
    import gguf

    tune(monkeypatch, be, fuse_q8=True, gemv_int8_min=0)
    ref = NumpyBackend()
    x = rng.standard_normal((rows, d), dtype=np.float32) * rng.uniform(0.1, 10, (rows, d)).astype(np.float32)
    r = rng.standard_normal((rows, d), dtype=np.float32) if with_res else None
    w = rng.standard_normal(d, dtype=np.float32)
    exp_out, exp_s = ref.rms_norm(x, w, 1e-6, r)
    n = 300
    raw = gguf.quants.quantize(rng.standard_normal((n, d), dtype=np.float32) * 0.1, gguf.GGMLQuantizationType.Q8_0)
    wd = be.load_weight("w", raw, gguf.GGMLQuantizationType.Q8_0, (n, d))
    be.begin_step(simple_meta(1))
    poison(be)
    out, s = be.rms_norm(dev(be, x), dev(be, w), 1e-6, dev(be, r) if with_res else None)
    assert out.q8 is not None
    assert rel(be.to_host(out), exp_out) < 1e-5
    assert rel(be.to_host(s), exp_s) < 1e-6
    _check_q8(be, out, exp_out)
    fused = be.to_host(be.linear(out, wd))
    plain = be.to_host(be.linear(dev(be, be.to_host(out)), wd))  # the same row, quantized by quantize_x8
    np.testing.assert_array_equal(fused, plain)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("F", [96, 1536, 4864, 8192])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_glu_fused_q8(be, rng, F, act, rows, monkeypatch):
    """silu/gelu_halves_q8 (ORCD_FUSE_Q8): act(gate) * up for each of a few rows, and its int8 rounding"""
    tune(monkeypatch, be, fuse_q8=True)
    ref = NumpyBackend()
    x = rng.standard_normal((rows, 2 * F), dtype=np.float32) * 3
    exp = ref.glu_fused(x, act)
    be.begin_step(simple_meta(1))
    poison(be)
    y = be.glu_fused(dev(be, x), act)
    assert y.q8 is not None and y.shape == (rows, F)
    assert rel(be.to_host(y), exp) < 1e-5
    _check_q8(be, y, exp)


# ---- rope -----------------------------------------------------------------------------------
ROPES = {
    "normal": dict(neox=False),
    "neox": dict(neox=True),
    "partial": dict(neox=True, dim_frac=0.5),
    "freq_factors": dict(neox=True, ff=True),
    "yarn": dict(neox=True, yarn=YarnSpec(factor=4.0, orig_ctx=4096, attn_factor=1.1386)),
    "attn_factor": dict(neox=False, attn_factor=0.9),
}


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("kind", list(ROPES))
def test_rope(be, rng, D, kind):
    cfg = ROPES[kind]
    T, H = 37, 5
    dim = int(D * cfg.get("dim_frac", 1))
    ff = rng.uniform(1.0, 8.0, dim // 2).astype(np.float32) if cfg.get("ff") else None
    spec = RopeSpec(dim=dim, base=10000.0 if D != 256 else 1e6, neox=cfg["neox"], freq_factors=ff,
                    yarn=cfg.get("yarn"), attn_factor=cfg.get("attn_factor", 1.0))
    pos = rng.integers(0, 6000, T).astype(np.int32)
    x = rng.standard_normal((T, H, D), dtype=np.float32)
    meta = simple_meta(T, pos)
    exp = NumpyBackend().rope(x, meta, spec)
    ctx = be.begin_step(meta)
    poison(be)
    y = be.rope(dev(be, x), ctx, spec)
    assert rel(be.to_host(y), exp) < 2e-5


@pytest.mark.parametrize("Hq,Hkv,D,rot_frac,neox", [(14, 2, 64, 1, True), (32, 32, 96, 0.75, True),
                                                     (9, 3, 64, 1, False), (64, 8, 64, 1, True)])
def test_qkv_rope_store(be, rng, Hq, Hkv, D, rot_frac, neox, monkeypatch):
    """The fused q/k/v -> rope -> cache kernel (ORCD_FUSE_QKV_ROPE=1) against NumPy's split +
    rope + store, at scattered slots with one padding token (slot -1: nothing stored)."""
    tune(monkeypatch, be, fuse_qkv_rope=True)
    T, nslots = 23, 64
    spec = RopeSpec(dim=int(D * rot_frac), base=10000.0, neox=neox)
    pos = rng.integers(0, 5000, T).astype(np.int32)
    meta = simple_meta(T, pos)
    meta.slot_mapping = rng.permutation(nslots)[:T].astype(np.int32)
    meta.slot_mapping[5] = -1
    layout = KVLayout(n_layers=2, num_blocks=4, block_size=16, n_kv_heads=Hkv, head_dim_k=D, head_dim_v=D)
    qkv = rng.standard_normal((T, (Hq + 2 * Hkv) * D), dtype=np.float32)
    ref = NumpyBackend()
    kv_ref = ref.alloc_kv(layout)
    q_exp = ref.qkv_rope_store(qkv, kv_ref, 1, meta, spec, Hq, Hkv, D, D)
    kv_dev = be.alloc_kv(layout)
    try:
        be._drv.memset_d16(kv_dev.buf.ptr, 0x7E00, kv_dev.buf.nbytes // 2)  # NaN: unwritten rows stay NaN
        ctx = be.begin_step(meta)
        poison(be)
        q = be.qkv_rope_store(dev(be, qkv), kv_dev, 1, ctx, spec, Hq, Hkv, D, D)
        assert rel(be.to_host(q), q_exp) < 2e-5
        be.synchronize()
        per = nslots * Hkv * D
        host = np.empty(2 * 2 * per, np.float16)  # K of both layers, then V of both layers
        be._drv.memcpy_dtoh(host, kv_dev.buf.ptr)
        k_got = host[per: 2 * per].reshape(nslots, Hkv, D).astype(np.float32)
        v_got = host[3 * per: 4 * per].reshape(nslots, Hkv, D).astype(np.float32)
        keep = meta.slot_mapping >= 0
        s = meta.slot_mapping[keep]
        np.testing.assert_allclose(k_got[s], kv_ref.k[1, s].astype(np.float16).astype(np.float32), rtol=2e-3,
                                   atol=2e-3)
        np.testing.assert_array_equal(v_got[s], kv_ref.v[1, s].astype(np.float16).astype(np.float32))
        untouched = np.setdiff1d(np.arange(nslots), s)
        assert np.isnan(k_got[untouched]).all() and np.isnan(v_got[untouched]).all()
    finally:
        kv_dev.buf.free()


# ---- elementwise ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1536), (7, 1003), (129, 8192), (3, 5)])
def test_elementwise(be, rng, shape):
    ref = NumpyBackend()
    a = rng.standard_normal(shape, dtype=np.float32) * 3
    b = rng.standard_normal(shape, dtype=np.float32)
    be.begin_step(simple_meta(1))
    for name, args, exp in [("silu_mul", (a, b), ref.silu_mul(a, b)), ("gelu_mul", (a, b), ref.gelu_mul(a, b)),
                            ("add", (a, b), ref.add(a, b))]:
        poison(be)
        out = getattr(be, name)(*(dev(be, t) for t in args))
        assert rel(be.to_host(out), exp) < 1e-5, name
    poison(be)
    assert rel(be.to_host(be.scale(dev(be, a), 0.37)), ref.scale(a, 0.37)) < 1e-6


def test_split_and_gather(be, rng):
    T = 11
    x = rng.standard_normal((T, 576 + 192 + 193), dtype=np.float32)
    meta = simple_meta(T)
    meta.logits_rows = np.array([10, 3, 0, 7], np.int32)
    ctx = be.begin_step(meta)
    poison(be)
    parts = be.split(dev(be, x), [576, 192, 193])
    for got, exp in zip(parts, NumpyBackend().split(x, [576, 192, 193])):
        np.testing.assert_array_equal(be.to_host(got), exp)
    g = be.gather_rows(dev(be, x), ctx)
    np.testing.assert_array_equal(be.to_host(g), x[meta.logits_rows])


@pytest.mark.parametrize("rows", [1, 3])
def test_split_views(be, rng, rows, monkeypatch):
    """ORCD_SPLIT_VIEWS: a one-row split hands back views (no copy), which later kernels
    read as the pieces; more rows, or a width that is not a multiple of 4, still copy."""
    tune(monkeypatch, be, split_views=True)
    sizes = [896, 128]
    x = rng.standard_normal((rows, sum(sizes)), dtype=np.float32)
    be.begin_step(simple_meta(1))
    poison(be)
    xd = dev(be, x)
    q, k = be.split(xd, sizes)
    assert (q.ptr == xd.ptr and k.ptr == xd.ptr + 4 * 896) == (rows == 1)
    for got, exp in zip((q, k), NumpyBackend().split(x, sizes)):
        np.testing.assert_array_equal(be.to_host(got), exp)
    y = be.add(k, k)  # a kernel reading the view
    np.testing.assert_array_equal(be.to_host(y), 2 * x[:, 896:])
    odd = be.split(dev(be, x[:1, :1022]), [1021, 1])
    assert odd[0].ptr != xd.ptr
    np.testing.assert_array_equal(be.to_host(odd[1]), x[:1, 1021:1022])


# ---- attention -----------------------------------------------------------------------------
def _steps(rng, prompt_lens, decode_extra, block_size, num_blocks):
    """Two steps over B sequences sharing one paged cache with shuffled blocks: a prefill of
    prompt_lens[b] tokens, then `decode_extra[b]` more tokens each (1 = decode, >1 = chunked
    prefill continuing), so the second step attends over keys written by the first."""
    B = len(prompt_lens)
    free = list(rng.permutation(num_blocks))
    totals = [p + e for p, e in zip(prompt_lens, decode_extra)]
    tables = [[int(free.pop()) for _ in range(-(-t // block_size))] for t in totals]
    width = max(len(t) for t in tables)
    bt = np.full((B, width), -1, np.int32)
    for b, t in enumerate(tables):
        bt[b, : len(t)] = t
    metas, done = [], [0] * B
    for n_new in (prompt_lens, decode_extra):
        pos, slots, starts, ctx = [], [], [0], []
        for b in range(B):
            p = np.arange(done[b], done[b] + n_new[b], dtype=np.int32)
            pos.append(p)
            slots.append(bt[b][p // block_size] * block_size + p % block_size)
            starts.append(starts[-1] + n_new[b])
            done[b] += n_new[b]
            ctx.append(done[b])
        T = starts[-1]
        metas.append(StepMeta(token_ids=np.zeros(T, np.int32), positions=np.concatenate(pos),
                              q_starts=np.array(starts, np.int32), ctx_lens=np.array(ctx, np.int32),
                              slot_mapping=np.concatenate(slots).astype(np.int32), block_tables=bt,
                              block_size=block_size, logits_rows=np.array([T - 1], np.int32)))
    return metas


ATTN_CASES = [
    # (Hq, Hkv, D, prompt_lens, extra, window, sinks, softcap)
    (4, 4, 64, [37], [1], 0, False, 0.0),                 # MHA, decode
    (9, 3, 64, [70, 5, 33], [1, 1, 1], 0, False, 0.0),     # SmolLM2 shape, batch of decodes
    (14, 2, 64, [45, 90], [17, 1], 0, False, 0.0),         # GQA 7, chunked prefill + decode
    (16, 2, 128, [100, 3], [1, 29], 0, False, 0.0),        # GQA 8
    (8, 1, 256, [61, 20], [1, 3], 0, False, 0.0),          # gemma-like head dim 256
    (8, 4, 256, [80], [1], 24, False, 50.0),               # sliding window + softcap
    (12, 4, 64, [53, 64], [9, 1], 16, True, 0.0),          # gpt-oss: window + sinks
    (6, 2, 128, [130], [0], 0, True, 0.0),                 # prefill only, T not a tile multiple
    (5, 5, 96, [19, 41], [2, 1], 0, False, 30.0),          # head dim 96, softcap
    # decode steps take the split-key path (flash-decoding, attn_combine): long and short
    # contexts, empty slices, window + sinks across slices
    (14, 2, 64, [1500, 3], [1, 1], 0, False, 0.0),         # qwen2.5 shape, 32 slices
    (64, 8, 64, [700, 300, 129], [1, 1, 1], 128, True, 0.0),  # gpt-oss: window + sinks
    (32, 32, 96, [900], [1], 0, False, 0.0),               # phi3 shape
    (32, 32, 96, [40, 260, 7, 129], [1, 1, 1, 1], 0, False, 0.0),  # phi3 shape, batch of decodes
    (4, 1, 256, [300, 2], [1, 1], 64, False, 30.0),        # gemma3 shape: window + softcap decode
    (9, 3, 64, [65, 0, 31], [1, 1, 1], 0, True, 0.0),      # a sequence that joins with one token
    # attn_dec_g1/_g2 give a lane 8 V dims: 2 of 4 keys a load (Dv 128), idle lanes (Dv 160)
    (16, 8, 128, [200, 33, 1], [1, 1, 1], 0, False, 0.0),  # GQA 2
    (4, 4, 160, [90, 7], [1, 1], 0, True, 0.0),            # MHA, 3 of 64-dim chunks, sinks
    # long contexts: more than 32 live slices, whose merge spans several of each lane's splits
    (14, 2, 64, [2100], [1], 0, False, 0.0),               # qwen2.5 shape at B=1: 132 slices, 66 live
    (2, 2, 64, [4500], [1], 0, True, 0.0),                 # MHA at B=1 (attn_dec): 256 slices, 36 live
]
# Decode-only steps of GQA models with an f16 cache of head dim 64/96/128 run attn_decm_d* (tensor
# cores); other MHA decode steps (and any at large batches) run attn_dec_* (split across key slices
# or not); the rest run attn_dN_b. With attn_decm off (attn_dec_mma 0) the GQA steps take the older
# routes, still those of a Q8_0 cache, of head dim 256 and of groups over 16: all must agree.
_NO_DECM = {"attn_dec_mma": 0}
ATTN_MODES = {"default": {}, "one-slice": {"attn_splits": 1},
              "tiled-decode": {**_NO_DECM, "attn_dec_max_group": 0, "attn_dec_min_heads": 1 << 30},
              # ORCD_ATTN_SPLITS=4: at most 4 key slices, every decode kernel
              "four-slices": {"attn_splits": 4},
              "dec-gqa-four-slices": {**_NO_DECM, "attn_dec_max_group": 8, "attn_splits": 4},
              # attn_dec for every group size it supports (by default only MHA models get it)
              "dec-gqa": {**_NO_DECM, "attn_dec_max_group": 8},
              "dec-gqa-one-slice": {**_NO_DECM, "attn_dec_max_group": 8, "attn_splits": 1},
              "dec-by-batch": {**_NO_DECM, "attn_dec_min_heads": 2},
              "no-decm": _NO_DECM,
              # attn_combine merges the slices (ORCD_ATTN_MERGE=0) instead of the last key-slice CTA
              "combine-launch": {"attn_merge": False},
              "dec-gqa-combine-launch": {**_NO_DECM, "attn_dec_max_group": 8, "attn_merge": False},
              # prefill steps on attn_dN_b instead of tensor cores (attn_mma_d*, the default)
              "no-mma": {"attn_mma": False},
              # attn_decm_d* for MHA decode steps too (every group size up to 16)
              "dec-mma": {"attn_dec_mma": 1}, "dec-mma-one-slice": {"attn_dec_mma": 1, "attn_splits": 1},
              "dec-mma-four-slices": {"attn_dec_mma": 1, "attn_splits": 4},
              "dec-mma-combine-launch": {"attn_dec_mma": 1, "attn_merge": False}}


def check_attention_case(be, rng, case, label, *, cached, fill, outlier_keys=False, q_held=None):
    """Both steps of an ATTN_CASES case (_steps) through be.attention over a fresh paged cache,
    each against the NumPy backend fed cached(k, v): the K/V the device cache holds, so the
    comparison isolates the kernels' arithmetic from the cache format. fill(kv) poisons the
    device cache first (never-written rows must not reach the output); outlier_keys gives the
    keys a few large channels, as real ones have. Bound 3e-4, or 2e-3 where the step ran on
    tensor cores (attn_mma and attn_decm round the scaled queries and the softmax weights to f16,
    2^-11 each). q_held(q, scale, kernels): the queries as the kernels that ran hold them, for the
    reference (default: as given). Returns how many steps also wrote out's int8 rounding (out.q8:
    ORCD_FUSE_ATTN_Q8), each checked against the step's own float output."""
    Hq, Hkv, D, plens, extra, window, with_sinks, softcap = case
    rounded = 0
    bs = 16
    # every sequence's blocks plus slack, so the shuffled tables do not run out on long prompts
    nblocks = sum(-(-(p + e) // bs) for p, e in zip(plens, extra)) + 8
    layout = KVLayout(n_layers=2, num_blocks=nblocks, block_size=bs, n_kv_heads=Hkv, head_dim_k=D, head_dim_v=D)
    ref = NumpyBackend()
    kv_ref, kv_dev = ref.alloc_kv(layout), be.alloc_kv(layout)
    fill(kv_dev)
    sinks = rng.standard_normal(Hq).astype(np.float32) if with_sinks else None
    scale = 1 / np.sqrt(D)
    layer = 1
    try:
        for meta in _steps(rng, plens, extra, bs, nblocks):
            T = meta.num_tokens
            if T == 0:
                continue
            q = rng.standard_normal((T, Hq, D), dtype=np.float32)
            k = rng.standard_normal((T, Hkv, D), dtype=np.float32)
            if outlier_keys:
                k *= rng.choice([1, 1, 1, 8], D).astype(np.float32)
            v = rng.standard_normal((T, Hkv, D), dtype=np.float32)
            k_held, v_held = cached(k, v)
            ctx = be.begin_step(meta)
            poison(be)  # synchronizes: what _recent lists after this are the step's own kernels
            out = be.attention(dev(be, q), dev(be, k), dev(be, v), kv_dev, layer, ctx, scale=scale,
                               window=window, sinks=dev(be, sinks) if with_sinks else None, softcap=softcap)
            ran = list(be._recent)
            q_ref = q if q_held is None else q_held(q, scale, ran)
            exp = ref.attention(q_ref, k_held, v_held, kv_ref, layer, meta, scale=scale, window=window, sinks=sinks,
                                softcap=softcap)
            mma = any(name.startswith(("attn_mma", "attn_decm")) for name in ran)
            assert out.shape == (T, Hq * D)
            got = be.to_host(out)
            assert rel(got, exp) < (2e-3 if mma else 3e-4), (case, label)
            if out.q8 is not None:
                _check_q8(be, out, got)
                rounded += 1
    finally:
        kv_dev.buf.free()
    return rounded


@pytest.mark.parametrize("mode", list(ATTN_MODES))
@pytest.mark.parametrize("case", ATTN_CASES, ids=[f"case{i}" for i in range(len(ATTN_CASES))])
def test_attention(be, rng, case, mode, monkeypatch):
    tune(monkeypatch, be, **ATTN_MODES[mode])
    check_attention_case(
        be, rng, case, mode,
        cached=lambda k, v: (k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)),
        fill=lambda kv: be._drv.memset_d16(kv.buf.ptr, 0x7E00, kv.buf.nbytes // 2))  # f16 NaN


@pytest.mark.parametrize("mode", ["default", "combine-launch", "dec-mma", "dec-gqa"])
@pytest.mark.parametrize("case", [ATTN_CASES[i] for i in (9, 10, 11, 12)], ids=["qwen", "gpt-oss", "phi3", "phi3-batch"])
def test_attention_writes_its_int8_rounding(be, rng, case, mode, monkeypatch):
    """ORCD_FUSE_ATTN_Q8: a split decode step's merge (attn_dec's or attn_decm's last slice, or
    attn_combine) also writes the output's int8 rounding for the output projection: every such
    step's levels and scales against the step's own float output (_check_q8), and the floats as
    check_attention_case bounds them."""
    tune(monkeypatch, be, **ATTN_MODES[mode], fuse_attn_q8=True)
    rounded = check_attention_case(
        be, rng, case, mode,
        cached=lambda k, v: (k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)),
        fill=lambda kv: be._drv.memset_d16(kv.buf.ptr, 0x7E00, kv.buf.nbytes // 2))
    assert rounded >= 1, (case, mode)


# ---- linear / embed (cuda_quant) ---------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("T", [1, 5, 67])
def test_linear_and_embed(be, rng, qtype, T):
    pytest.importorskip("orcd_grpc.backends.cuda_quant")
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    n, k = 200, 320
    w = rng.standard_normal((n, k), dtype=np.float32) * 0.1
    raw = w if qtype == "F32" else gguf.quants.quantize(w, qt)
    ref = NumpyBackend()
    w_ref = ref.load_weight("w", raw, qt, (n, k))
    x = rng.standard_normal((T, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    wd = be.load_weight("w", raw, qt, (n, k))
    meta = simple_meta(T)
    meta.token_ids = rng.integers(0, n, T).astype(np.int32)
    ctx = be.begin_step(meta)
    poison(be)
    y = be.linear(dev(be, x), wd, dev(be, bias))
    assert rel(be.to_host(y), ref.linear(x, w_ref, bias)) < 2e-3
    e = be.embed(wd, ctx)
    assert rel(be.to_host(e), ref.embed(w_ref, meta)) < 1e-6


# ---- memory and errors ---------------------------------------------------------------------
def test_max_vram_refuses_before_allocating():
    from orcd_grpc.backends.cuda import CudaBackend

    b = CudaBackend(max_vram=96 << 20, workspace_bytes=32 << 20)
    try:
        free_before = b.memory_available()
        assert free_before <= 64 << 20
        with pytest.raises(ResourceExhausted):
            b.from_host(np.ones((80 << 20) // 4, np.float32))
        assert b.memory_available() == free_before  # nothing was taken
        x = np.arange(1000, dtype=np.float32)
        np.testing.assert_array_equal(b.to_host(b.scale(b.from_host(x), 2.0)), 2 * x)  # still works
        with pytest.raises(ResourceExhausted):
            b.alloc_kv(KVLayout(4, 4096, 16, 8, 128, 128))
    finally:
        b.close()
    assert b.budget.used == 0


def test_cuda_error_becomes_internal(be):
    import numpy as np

    k = be._k("elementwise", "add_f32", "PPPqf")
    with pytest.raises(Internal, match="add_f32"):
        be._launch(k, (1, 1, 1), (2048, 1, 1), 0, 0, 0, np.int64(1), np.float32(0))  # too many threads
    be.synchronize()
    x = np.arange(17, dtype=np.float32)
    np.testing.assert_array_equal(be.to_host(be.add(dev(be, x), dev(be, x))), 2 * x)


def test_gpu_info(be):
    info = be.gpu_info()
    assert set(info) >= {"name", "compute_capability", "vram_total", "vram_free", "driver_version",
                         "cuda_version", "multiprocessors"}
    assert info["vram_total"] > 0 and info["multiprocessors"] > 0


# ---- sampling --------------------------------------------------------------------------------
def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kept_probs(x, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Host reference of the filters (top-k, then top-p over the top-k mass, then min-p)."""
    x = x.astype(np.float64)
    keep = np.ones(x.size, bool)
    if 0 < top_k < x.size:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    z = np.where(keep, (x - x.max()) / temperature, -np.inf)
    p = np.exp(z) / np.exp(z).sum()
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        cum = np.cumsum(p[order])
        t = x[order][np.searchsorted(cum, top_p * cum[-1] * (1 - 1e-12))]
        keep &= x >= t
    if min_p > 0:
        keep &= x >= x.max() + temperature * np.log(min_p)
    q = np.where(keep, np.exp((x - x.max()) / temperature), 0.0)
    return q / q.sum()


@pytest.mark.parametrize("V", [1000, 32003, 262144])
def test_sample_greedy_and_logprobs(be, rng, V):
    R = 6
    x = (rng.standard_normal((R, V)) * 3).astype(np.float32)
    x[2, 17] = x[2, 901] = x[2].max() + 1.0  # a tie: the lowest index wins, as np.argmax
    be.begin_step(simple_meta(1))
    toks, lps, tid, tlp = be.sample(dev(be, x), [{"temperature": 0.0}] * R, n_top=5)
    np.testing.assert_array_equal(toks, x.argmax(-1))
    ls = _log_softmax(x)
    np.testing.assert_allclose(lps, ls[np.arange(R), toks], atol=2e-4)
    np.testing.assert_array_equal(tid, np.argsort(-x, axis=-1, kind="stable")[:, :5])
    np.testing.assert_allclose(tlp, np.take_along_axis(ls, tid, -1), atol=2e-4)


@pytest.mark.parametrize("filters", [dict(), dict(top_k=40), dict(top_p=0.8), dict(min_p=0.05),
                                     dict(top_k=50, top_p=0.9, min_p=0.01)])
def test_sample_distribution(be, rng, filters):
    V, N, temp = 1000, 20000, 0.7
    row = (rng.standard_normal(V) * 2).astype(np.float32)
    x = np.broadcast_to(row, (N, V)).copy()
    params = [dict(temperature=temp, seed=1234, counter=i, **filters) for i in range(N)]
    be.begin_step(simple_meta(1))
    xd = dev(be, x)
    toks, lps = be.sample(xd, params)
    expect = _kept_probs(row, temp, **filters)
    assert expect[toks].min() > 0, "sampled a filtered-out token"
    freq = np.bincount(toks, minlength=V) / N
    tv = 0.5 * np.abs(freq - expect).sum()
    assert tv < 0.06, f"total variation {tv:.3f}"  # sampling noise at N=20000 is ~0.02
    np.testing.assert_allclose(lps, _log_softmax(row)[toks], atol=2e-4)
    again, _ = be.sample(xd, params)
    np.testing.assert_array_equal(again, toks)  # same seed and counters: same tokens
    other, _ = be.sample(xd, [dict(p, seed=99) for p in params])
    assert (other != toks).mean() > 0.2


def test_sample_penalties(be, rng):
    V = 5003
    x = (rng.standard_normal((3, V)) * 2).astype(np.float32)
    top = x.argmax(-1)
    x[1, top[1]] = -abs(x[1, top[1]])  # a negative logit is multiplied by the penalty
    prompt = [int(top[0]), 7, 7, 11]
    params = [dict(temperature=0, repetition_penalty=1e4, prompt_ids=prompt),
              dict(temperature=0, repetition_penalty=2.0, prompt_ids=[int(x[1].argmax())]),
              dict(temperature=0, presence_penalty=1.5, frequency_penalty=0.7,
                   output_ids=[int(top[2])] * 3 + [5])]
    ref = x.astype(np.float64).copy()
    for i in set(prompt):
        ref[0, i] = ref[0, i] / 1e4 if ref[0, i] > 0 else ref[0, i] * 1e4
    i = int(x[1].argmax())
    ref[1, i] = ref[1, i] / 2 if ref[1, i] > 0 else ref[1, i] * 2
    ref[2, top[2]] -= 1.5 + 0.7 * 3
    ref[2, 5] -= 1.5 + 0.7
    be.begin_step(simple_meta(1))
    toks, lps = be.sample(dev(be, x), params)
    np.testing.assert_array_equal(toks, ref.argmax(-1))
    np.testing.assert_allclose(lps, _log_softmax(x)[np.arange(3), toks], atol=2e-4)  # raw distribution


# ---- MoE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,k,act,T", [(8, 2, "silu", 5), (33, 4, "swiglu_oai", 13), (32, 4, "swiglu_oai", 1)])
def test_moe(be, rng, E, k, act, T):
    pytest.importorskip("orcd_grpc.backends.cuda_quant")
    import gguf

    qt = gguf.GGMLQuantizationType.Q8_0
    d, F = 96, 64
    ref = NumpyBackend()
    if not hasattr(ref, "moe"):
        pytest.skip("NumPy reference has no moe op")

    def weight(name, shape, scale):
        w = (rng.standard_normal(shape) * scale).astype(np.float32)
        raw = gguf.quants.quantize(w.reshape(-1, shape[-1]), qt).reshape(shape[0], shape[1], -1)
        return ref.load_weight(name, raw, qt, shape), be.load_weight(name, raw, qt, shape)

    wg, wu, wd = weight("g", (E, F, d), 0.2), weight("u", (E, F, d), 0.2), weight("d", (E, d, F), 0.2)
    bg, bu, bd = (rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((E, F), (E, F), (E, d)))
    x = rng.standard_normal((T, d), dtype=np.float32)
    logits = rng.standard_normal((T, E), dtype=np.float32)
    exp = ref.moe(x, logits, k, wg[0], wu[0], wd[0], bg, bu, bd, act=act)
    be.begin_step(simple_meta(T))
    poison(be)
    out = be.moe(dev(be, x), dev(be, logits), k, wg[1], wu[1], wd[1], dev(be, bg), dev(be, bu), dev(be, bd), act=act)
    assert rel(be.to_host(out), exp) < 1e-4


def _act_ref(g, u, act, alpha=1.702, limit=7.0):
    g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
    if act == "swiglu_oai":
        g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
        return g / (1 + np.exp(-alpha * g)) * (u + 1)
    return g / (1 + np.exp(-g)) * u


@pytest.mark.parametrize("act", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("slots,F", [(4, 2880), (12, 64), (2048, 2880)])
def test_moe_act_q8(be, rng, act, slots, F):
    """moe_act_q8: the experts' activation written only as its int8 rounding (the int8 down
    projection's input): each block's scale and bytes against float64 (_check_q8's bounds)."""
    n = slots * F
    g = rng.standard_normal(n).astype(np.float32) * 3
    u = rng.standard_normal(n).astype(np.float32) * 3
    be.begin_step(simple_meta(1))
    poison(be)
    aq, ad = be._q8_scratch(n)
    gd, ud = dev(be, g), dev(be, u)  # held: a dropped tensor's memory is freed (and handed out again) at once
    be._launch(be._k("moe", "moe_act_q8", "PPPPqiff"), (-(-n // 256), 1, 1), (256, 1, 1), gd.ptr, ud.ptr,
               aq.ptr, ad.ptr, np.int64(n), np.int32(act == "swiglu_oai"), np.float32(1.702), np.float32(7.0))
    _check_q8(be, SimpleNamespace(q8=(aq, ad)), _act_ref(g, u, act))


@pytest.mark.parametrize("T", [1, 3, 64])
def test_moe_on_the_int8_paths(be, rng, T, monkeypatch):
    """be.moe with every expert matmul on the int8 input (gate and up paired at a few slots, the
    grouped int8 GEMM at 64 decode rows, the activation rounded by moe_act_q8): against the float64
    NumPy engine within the int8 bound (2e-2), and moe_act_q8 launched in place of moe_act."""
    import gguf

    tune(monkeypatch, be, gemv_int8_min=0)
    qt = gguf.GGMLQuantizationType.Q8_0
    E, k, d, F = 32, 4, 256, 128
    ref = NumpyBackend()

    def weight(name, shape):
        w = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        raw = gguf.quants.quantize(w.reshape(-1, shape[-1]), qt).reshape(shape[0], shape[1], -1)
        return ref.load_weight(name, raw, qt, shape), be.load_weight(name, raw, qt, shape)

    wg, wu, wd = weight("g", (E, F, d)), weight("u", (E, F, d)), weight("d", (E, d, F))
    bg, bu, bd = (rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((E, F), (E, F), (E, d)))
    x = rng.standard_normal((T, d), dtype=np.float32)
    logits = rng.standard_normal((T, E), dtype=np.float32) * 3
    exp = ref.moe(x, logits, k, wg[0], wu[0], wd[0], bg, bu, bd, act="swiglu_oai")
    be.begin_step(decode_meta(T))
    args = [dev(be, a) for a in (x, logits, bg, bu, bd)]
    poison(be)  # synchronizes: what _recent lists after this are be.moe's own kernels
    out = be.moe(args[0], args[1], k, wg[1], wu[1], wd[1], *args[2:], act="swiglu_oai")
    ran = list(be._recent)
    assert "moe_act_q8" in ran and "moe_act" not in ran, ran
    assert rel(be.to_host(out), exp) < 2e-2


def test_rope_yarn_untruncated(be, rng):
    spec = RopeSpec(dim=64, base=150000.0, neox=True,
                    yarn=YarnSpec(factor=32.0, orig_ctx=4096, attn_factor=1.35, truncate=False))
    T, H = 19, 3
    pos = rng.integers(0, 100000, T).astype(np.int32)
    x = rng.standard_normal((T, H, 64), dtype=np.float32)
    meta = simple_meta(T, pos)
    exp = NumpyBackend().rope(x, meta, spec)
    ctx = be.begin_step(meta)
    poison(be)
    assert rel(be.to_host(be.rope(dev(be, x), ctx, spec)), exp) < 2e-5
