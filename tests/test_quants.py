"""Storage formats: orcd's decoding vs an independent float64 decoder written here from the block
layouts in ggml-common.h, vs gguf's own decoder on the real model files, plus quantize round trips.

The float64 decoder below deliberately shares no code with gguf.quants: it unpacks every block
field by byte offset, bit by bit, in plain Python/NumPy loops over sub-blocks.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from orcd_grpc import quants
from orcd_grpc.errors import InvalidArgument

# --------------------------------------------------------------------------------------------
# Independent float64 reference decoder (one block at a time; layouts per ggml-common.h)
# --------------------------------------------------------------------------------------------


def _f16(b: np.ndarray, off: int) -> float:
    return float(np.frombuffer(bytes(b[off:off + 2]), dtype="<f2")[0])


def _u32(b: np.ndarray, off: int) -> int:
    return int.from_bytes(bytes(b[off:off + 4]), "little")


def _ref_q4_0(b):  # {f16 d; u8 qs[16]}: low nibbles are x[0..15], high nibbles x[16..31]
    d = _f16(b, 0)
    qs = b[2:18].astype(np.int64)
    return np.concatenate([(qs & 15) - 8, (qs >> 4) - 8]) * d


def _ref_q4_1(b):  # {f16 d; f16 m; u8 qs[16]}: x = d*q + m
    d, m = _f16(b, 0), _f16(b, 2)
    qs = b[4:20].astype(np.int64)
    return np.concatenate([qs & 15, qs >> 4]) * d + m


def _q5_vals(qh: int, qs: np.ndarray) -> np.ndarray:
    # bit j of qh is the 5th bit of element j (j < 16) ; bit j+16 that of element j+16
    lo = np.array([(int(qs[j]) & 15) | (((qh >> j) & 1) << 4) for j in range(16)])
    hi = np.array([(int(qs[j]) >> 4) | (((qh >> (j + 16)) & 1) << 4) for j in range(16)])
    return np.concatenate([lo, hi]).astype(np.int64)


def _ref_q5_0(b):  # {f16 d; u8 qh[4]; u8 qs[16]}: x = d*(q - 16)
    return (_q5_vals(_u32(b, 2), b[6:22]) - 16) * _f16(b, 0)


def _ref_q5_1(b):  # {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: x = d*q + m
    return _q5_vals(_u32(b, 4), b[8:24]) * _f16(b, 0) + _f16(b, 2)


def _ref_q8_0(b):  # {f16 d; i8 qs[32]}
    return b[2:34].view(np.int8).astype(np.int64) * _f16(b, 0)


def _k4_scale_min(j: int, q: np.ndarray) -> tuple[int, int]:
    # 12 bytes hold 8 6-bit scales and 8 6-bit mins (ggml's get_scale_min_k4)
    q = [int(v) for v in q]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _ref_q4_k(b):  # {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}, 8 sub-blocks of 32
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc = b[4:16]
    qs = b[16:144].astype(np.int64)
    out = []
    for chunk in range(4):  # each 32 bytes of qs -> 64 values: low nibbles then high nibbles
        q = qs[chunk * 32:(chunk + 1) * 32]
        s0, m0 = _k4_scale_min(2 * chunk, sc)
        s1, m1 = _k4_scale_min(2 * chunk + 1, sc)
        out.append(d * s0 * (q & 15) - dmin * m0)
        out.append(d * s1 * (q >> 4) - dmin * m1)
    return np.concatenate(out)


def _ref_q5_k(b):  # {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc = b[4:16]
    qh = b[16:48].astype(np.int64)
    qs = b[48:176].astype(np.int64)
    out = []
    for chunk in range(4):  # sub-block 2c takes qh bit 2c, sub-block 2c+1 takes qh bit 2c+1
        q = qs[chunk * 32:(chunk + 1) * 32]
        s0, m0 = _k4_scale_min(2 * chunk, sc)
        s1, m1 = _k4_scale_min(2 * chunk + 1, sc)
        h0 = ((qh >> (2 * chunk)) & 1) << 4
        h1 = ((qh >> (2 * chunk + 1)) & 1) << 4
        out.append(d * s0 * ((q & 15) + h0) - dmin * m0)
        out.append(d * s1 * ((q >> 4) + h1) - dmin * m1)
    return np.concatenate(out)


def _ref_q6_k(b):  # {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}, 16 sub-blocks of 16
    ql = b[0:128].astype(np.int64)
    qh = b[128:192].astype(np.int64)
    sc = b[192:208].view(np.int8).astype(np.int64)
    d = _f16(b, 208)
    y = np.zeros(256)
    for half in range(2):  # each half: 64 ql bytes, 32 qh bytes, 8 scales -> 128 values
        L, H, S = ql[64 * half:64 * half + 64], qh[32 * half:32 * half + 32], sc[8 * half:8 * half + 8]
        for l in range(32):
            q1 = ((L[l] & 15) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = ((L[l + 32] & 15) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            i = l // 16
            base = 128 * half
            y[base + l] = d * S[i] * q1
            y[base + l + 32] = d * S[i + 2] * q2
            y[base + l + 64] = d * S[i + 4] * q3
            y[base + l + 96] = d * S[i + 6] * q4
    return y


_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX FP4 magnitudes for codes 0..7


def _ref_mxfp4(b):  # {u8 e (E8M0); u8 qs[16]}: x = 2^(e-127) * e2m1(code); low nibbles first
    scale = 2.0 ** (int(b[0]) - 127)

    def fp4(c):
        return (-1.0 if c & 8 else 1.0) * _E2M1[c & 7]

    qs = [int(v) for v in b[1:17]]
    return np.array([fp4(c & 15) for c in qs] + [fp4(c >> 4) for c in qs]) * scale


def _ref_f16(b):
    return np.frombuffer(bytes(b), dtype="<f2").astype(np.float64)


def _ref_bf16(b):
    u = np.frombuffer(bytes(b), dtype="<u2").astype(np.uint32) << 16
    return u.view(np.float32).astype(np.float64)


def _ref_f32(b):
    return np.frombuffer(bytes(b), dtype="<f4").astype(np.float64)


REF = {
    T.F32: _ref_f32, T.F16: _ref_f16, T.BF16: _ref_bf16, T.Q4_0: _ref_q4_0, T.Q4_1: _ref_q4_1,
    T.Q5_0: _ref_q5_0, T.Q5_1: _ref_q5_1, T.Q8_0: _ref_q8_0, T.Q4_K: _ref_q4_k, T.Q5_K: _ref_q5_k,
    T.Q6_K: _ref_q6_k, T.MXFP4: _ref_mxfp4,
}
# Offsets of the f16 scale fields in each block, so random blocks get finite, sane scales.
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
# Formats whose every value is (f16 or power-of-two scale) x (small int): float32 holds them exactly.
EXACT = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q5_0, T.Q8_0, T.MXFP4}


def ref_decode(raw: np.ndarray, qtype) -> np.ndarray:
    bs, ts = quants.block_size(qtype)
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, ts)
    return np.concatenate([REF[qtype](blk) for blk in blocks])


def random_blocks(qtype, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for ``n_blocks`` blocks, with random but finite scales (both signs)."""
    bs, ts = quants.block_size(qtype)
    if qtype == T.F32:
        return rng.standard_normal(n_blocks * bs).astype(np.float32).view(np.uint8).reshape(n_blocks, ts)
    if qtype == T.F16:
        return rng.standard_normal(n_blocks * bs).astype(np.float16).view(np.uint8).reshape(n_blocks, ts)
    if qtype == T.BF16:
        x = rng.standard_normal(n_blocks * bs).astype(np.float32)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, ts)
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    if qtype == T.MXFP4:
        raw[:, 0] = rng.integers(100, 140, size=n_blocks, dtype=np.uint8)  # 2^-27 .. 2^12
    for off in F16_FIELDS.get(qtype, []):
        scale = (rng.uniform(1e-4, 0.1, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


ALL_TYPES = sorted(quants.SUPPORTED, key=int)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_float64_reference(qtype):
    rng = np.random.default_rng(1000 + int(qtype))
    bs, ts = quants.block_size(qtype)
    # 3 rows of 2 blocks (of 256 for K-quants): exercises row reshaping, not just one block
    rows, blocks_per_row = 3, 2
    raw = random_blocks(qtype, rows * blocks_per_row, rng).reshape(rows, blocks_per_row * ts)
    shape = (rows, blocks_per_row * bs)
    ours = quants.dequantize(raw, qtype, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    ref = ref_decode(raw, qtype).reshape(shape)
    assert np.all(np.isfinite(ref)) and np.abs(ref).max() > 0
    if qtype in EXACT:
        np.testing.assert_array_equal(ours.astype(np.float64), ref)
    else:
        # offsets / two-level scales are computed in float32 by ggml: allow a few float32 ulps of
        # each block's magnitude (the reference is exact float64)
        blocks_ref = ref.reshape(-1, bs)
        tol = 8 * np.finfo(np.float32).eps * np.abs(blocks_ref).max(axis=1, keepdims=True)
        err = np.abs(ours.reshape(-1, bs).astype(np.float64) - blocks_ref)
        assert np.all(err <= tol), (qtype.name, float((err / tol).max()))
    # and orcd's path is bit-exact with gguf's own
    np.testing.assert_array_equal(ours, gq.dequantize(raw, qtype).reshape(shape))


def test_reference_decoder_is_not_trivially_equal():
    """Guard for the guard: flipping one nibble must change the reference decode."""
    rng = np.random.default_rng(7)
    raw = random_blocks(T.Q4_K, 1, rng)
    a = ref_decode(raw, T.Q4_K)
    raw2 = raw.copy()
    raw2[0, 16] ^= 0x0F
    assert not np.array_equal(a, ref_decode(raw2, T.Q4_K))


# Per-block worst-case error of gguf's reference quantizers (x is the block, amax = max|x|).
def _roundtrip_bound(qtype, blk: np.ndarray) -> float:
    amax = np.abs(blk).max()
    rng_ = blk.max() - blk.min()
    if qtype == T.Q8_0:
        return amax / 127 * 0.55  # half a step, plus the f16 rounding of the scale
    if qtype == T.Q4_0:
        return amax / 8 * 1.01  # the side opposite the max can clip by one full step
    if qtype == T.Q5_0:
        return amax / 16 * 1.01
    if qtype == T.Q4_1:
        return rng_ / 15 * 0.55 + abs(blk.min()) * 2 ** -10
    if qtype == T.Q5_1:
        return rng_ / 31 * 0.55 + abs(blk.min()) * 2 ** -10
    if qtype == T.MXFP4:
        # scale 2^(floor(log2 amax) - 2) / 2; the grid tops out at 6 units, so the largest
        # values clip by up to 2 units of the half-scale (4 x d)
        d = 2.0 ** (np.floor(np.log2(amax)) - 3)
        return 4 * d
    if qtype == T.F16:
        return amax * 2 ** -11
    if qtype == T.BF16:
        return amax * 2 ** -8
    if qtype == T.F32:
        return 0.0
    raise AssertionError(qtype)


QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_roundtrip_error_bounds(qtype):
    rng = np.random.default_rng(2000 + int(qtype))
    x = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 3.0, (8, 1))).astype(np.float32)
    raw = quants.quantize(x, qtype)
    y = quants.dequantize(raw, qtype, x.shape)
    bs, _ = quants.block_size(qtype)
    bs = max(bs, 32)
    xb, yb = x.reshape(-1, bs).astype(np.float64), y.reshape(-1, bs).astype(np.float64)
    for i in range(xb.shape[0]):
        bound = _roundtrip_bound(qtype, xb[i])
        err = np.abs(xb[i] - yb[i]).max()
        assert err <= bound, (qtype.name, i, err, bound)
    # the decoded bytes also agree with the float64 reference decoder
    ref = ref_decode(raw, qtype).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(ref).max())
    # an overall quality check that would catch a scale off by a factor of two
    rel_rms = np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2))
    assert rel_rms < {T.Q4_0: 0.12, T.Q4_1: 0.12, T.Q5_0: 0.06, T.Q5_1: 0.06, T.Q8_0: 0.008,
                      T.MXFP4: 0.2}.get(qtype, 0.004), (qtype.name, rel_rms)


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.Q2_K, T.Q3_K, T.IQ4_NL, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_refused_with_its_name(qtype):
    with pytest.raises(InvalidArgument) as ei:
        quants.check_supported(qtype, "blk.3.ffn_down.weight")
    assert qtype.name in str(ei.value) and "blk.3.ffn_down.weight" in str(ei.value)
    with pytest.raises(InvalidArgument, match=qtype.name):
        quants.dequantize(np.zeros(256, np.uint8), qtype, (1, 256))


def test_unknown_type_number_refused():
    with pytest.raises(InvalidArgument, match="type#999"):
        quants.check_supported(999, "token_embd.weight")


def test_wrong_byte_count_refused():
    raw = np.zeros((2, 34), np.uint8)
    with pytest.raises(InvalidArgument):
        quants.dequantize(raw, T.Q8_0, (2, 64))


# --------------------------------------------------------------------------------------------
# Real model files: every tensor decodes bit-exactly as gguf's own decoder does
# --------------------------------------------------------------------------------------------

_CACHE = pathlib.Path(os.environ.get("ORCD_MODEL_DIR", pathlib.Path.home() / ".cache/orcd/models"))


def _real(request, fixture: str, filename: str) -> pathlib.Path:
    if (_CACHE / filename).is_file():  # already fetched: no need for the download machinery
        return _CACHE / filename
    return request.getfixturevalue(fixture)


@pytest.mark.parametrize("fixture,filename,expect_types", [
    ("gemma3_path", "gemma-3-270m.gguf", {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}),
    ("smollm2_path", "smollm2-135m-instruct.gguf", {"Q4_1", "Q8_0"}),
])
def test_real_file_every_tensor_bit_exact(request, fixture, filename, expect_types):
    import gguf

    reader = gguf.GGUFReader(_real(request, fixture, filename))
    seen = set()
    rng = np.random.default_rng(3)
    for t in reader.tensors:
        seen.add(t.tensor_type.name)
        ours = quants.dequantize_reader_tensor(t)
        assert ours.shape == tuple(reversed([int(s) for s in t.shape])), t.name
        if ours.size <= 8_000_000:
            theirs = gq.dequantize(t.data, t.tensor_type)
            np.testing.assert_array_equal(ours, theirs, err_msg=t.name)
        else:
            # the embedding tables (~100M values) would take most of this test's time through
            # gguf's row-group loop: compare 512 random rows there, decoded from the file's bytes
            rows = np.sort(rng.choice(ours.shape[0], 512, replace=False))
            theirs = gq.dequantize(np.asarray(t.data)[rows], t.tensor_type)
            np.testing.assert_array_equal(ours[rows], theirs, err_msg=t.name)
        assert np.all(np.isfinite(ours)), t.name
        if t.tensor_type != T.F32:
            # spot-check two random rows of real data against the float64 reference decoder
            data = np.asarray(t.data).reshape(ours.shape[0] if ours.ndim > 1 else 1, -1)
            for r in rng.integers(0, data.shape[0], 2):
                ref = ref_decode(data[r], t.tensor_type)
                got = ours.reshape(data.shape[0], -1)[r].astype(np.float64)
                tol = 8 * np.finfo(np.float32).eps * max(np.abs(ref).max(), 1e-30)
                assert np.abs(got - ref).max() <= tol, (t.name, r)
    assert expect_types <= seen, seen


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q8_0])
def test_widen_to_q8_0_keeps_every_weight(qtype):
    """widen_to_q8_0 re-encodes without rounding: gguf's own decoder reads the same floats from the
    Q8_0 blocks as from the originals (fresh random weights each run, bit-exact)."""
    rng = np.random.default_rng()
    x = (rng.standard_normal((48, 320)) * rng.uniform(0.01, 3)).astype(np.float32)
    raw = gq.quantize(x, qtype)
    wide = quants.widen_to_q8_0(raw, qtype).reshape(48, -1)
    assert wide.shape == (48, 320 // 32 * 34)
    np.testing.assert_array_equal(gq.dequantize(wide, T.Q8_0), gq.dequantize(raw, qtype))


def test_widen_to_q8_0_refuses_formats_with_an_offset():
    with pytest.raises(ValueError, match="Q4_1"):
        quants.widen_to_q8_0(np.zeros(20 * 4, np.uint8), T.Q4_1)
