"""cpu_kernels against gguf-py's NumPy decoder and float64 NumPy products.

Weights: random matrices quantized by gguf.quants.quantize where it has an encoder, otherwise
random block bytes with finite, moderate scales (every bit pattern of the levels is valid). The
reference is gguf.quants.dequantize(raw) in float64 times fresh random x.

Tolerance: the kernels accumulate in float32 (vector partial sums, reassociated), so each output
may be off by a few k * 2**-24 of the sum of |x_j * w_j|; we allow 1e-5 of that sum per element,
below the worst-case float32 bound (k * 6e-8 = 4.6e-5 for k = 768) but far above what a wrong
level, scale or nibble order gives (the size of a whole term).
"""
from __future__ import annotations

import secrets
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

import gguf  # noqa: E402
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from orcd_grpc.backends import cpu_kernels as ck  # noqa: E402

ENCODED = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4]
K_QUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# the formats whose products round x to 16 bits first
BLOCK_FORMATS = set(ENCODED + K_QUANTS) - {T.F32, T.F16, T.BF16}
# byte offsets of each K-quant block's f16 scales (d, and dmin where there is one)
F16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def make_weight(qt, n, k, rng):
    """(raw uint8 [n, row_bytes], float64 reference [n, k])."""
    if qt in ENCODED:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qt)
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)
    else:
        bs, ts = GGML_QUANT_SIZES[qt]
        blocks = rng.integers(0, 256, size=(n * k // bs, ts), dtype=np.uint8)
        for off in F16_FIELDS[qt]:
            scale = rng.uniform(1e-3, 1e-1, blocks.shape[0]) * rng.choice([-1, 1], blocks.shape[0])
            blocks[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
        raw = blocks.reshape(n, -1)
    return raw, gguf.quants.dequantize(raw, qt).astype(np.float64).reshape(n, k)


def check_product(y, x, ref_w, qt):
    """y against float64 x @ W.T. For the block formats x is rounded to 16 bits per 32 values
    first, x_j off by at most amax(group of j)/65534, so each output may also be off by
    sum_j |w_j| * amax(group of j) / 65534 (~1.5e-5 of the group's largest x per weight)."""
    x64 = x.astype(np.float64)
    ref = x64 @ ref_w.T
    bound = 1e-5 * (np.abs(x64) @ np.abs(ref_w).T) + 1e-30
    if qt in BLOCK_FORMATS:
        amax = np.repeat(np.abs(x64).reshape(x.shape[0], -1, 32).max(axis=2), 32, axis=1)
        bound += (amax / 65534) @ np.abs(ref_w).T * (1 + 1e-5)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(np.isfinite(y))
    err = np.abs(y - ref)
    assert np.all(err <= bound), f"worst {np.max(err / bound):.2f} of the bound"


def k_for(qt):
    bs = GGML_QUANT_SIZES[qt][0]
    return 768 if bs == 256 else 320  # several blocks (F16/BF16: ten 32-value groups)


@pytest.mark.parametrize("qt", ENCODED + K_QUANTS, ids=lambda t: t.name)
def test_matmul_matches_float64_reference(qt):
    rng = np.random.default_rng(int(qt) + 100)
    n, k = 37, k_for(qt)  # 37 rows: not a multiple of the thread count
    raw, ref_w = make_weight(qt, n, k, rng)
    w = ck.QWeight(raw, qt, (n, k))
    assert ck.supported(qt)
    for m in (1, 2, 3, 17):  # per-row kernel for 1 and 2, 8-row kernel (padded) for 3 and 17
        x = rng.standard_normal((m, k)).astype(np.float32)
        check_product(ck.matmul(x, w), x, ref_w, qt)
    np.testing.assert_allclose(ck.dequantize(w), ref_w, rtol=1e-6, atol=1e-7 * np.abs(ref_w).max())


@pytest.mark.parametrize("qt", sorted(BLOCK_FORMATS), ids=lambda t: t.name)
def test_x_is_rounded_to_16_bits_and_no_further(qt):
    """The block formats' products differ from float x's by x's 16-bit rounding (the bound in
    check_product), and by more than float32 rounding alone would give: x really is rounded, and
    a kernel rounding x to 8 bits (256 times the error) fails."""
    rng = np.random.default_rng(int(qt) + 200)
    n, k = 37, k_for(qt)
    raw, ref_w = make_weight(qt, n, k, rng)
    w = ck.QWeight(raw, qt, (n, k))
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = ck.matmul(x, w)
    check_product(y, x, ref_w, qt)
    ref = x.astype(np.float64) @ ref_w.T
    assert np.max(np.abs(y - ref) / (np.abs(x) @ np.abs(ref_w).T)) > 1e-7  # not float x


@pytest.mark.parametrize("qt", sorted(set(ENCODED + K_QUANTS) - {T.F32}), ids=lambda t: t.name)
def test_rows_do_not_depend_on_the_rows_beside_them(qt):
    """A row of x alone (the per-row kernel), with one other, and among 16 others (the 8-row
    kernel) gives the same bits: a sample of n > 1 is the one-sample request with its seed, a
    decode row the same beside a prompt's rows."""
    rng = np.random.default_rng(int(qt) + 300)
    n, k = 37, k_for(qt)
    raw, _ = make_weight(qt, n, k, rng)
    w = ck.QWeight(raw, qt, (n, k))
    x = rng.standard_normal((17, k)).astype(np.float32)
    together = ck.matmul(x, w)
    for i in (0, 7, 16):
        assert np.array_equal(ck.matmul(x[i:i + 1], w)[0], together[i])
        assert np.array_equal(ck.matmul(x[i:i + 2], w)[0], together[i])


@pytest.mark.parametrize("qt", [T.Q4_1, T.Q8_0, T.Q6_K, T.F16, T.BF16], ids=lambda t: t.name)
def test_both_paths_for_one_x(qt, monkeypatch):
    """16 rows (two whole 8-row passes) through either kernel."""
    rng = np.random.default_rng(7)
    n, k = 41, k_for(qt)
    raw, ref_w = make_weight(qt, n, k, rng)
    w = ck.QWeight(raw, qt, (n, k))
    x = rng.standard_normal((16, k)).astype(np.float32)
    check_product(ck.matmul(x, w), x, ref_w, qt)
    monkeypatch.setattr(ck, "GEMM_MIN_M", 10**9)  # every row of x through the per-row kernel
    check_product(ck.matmul(x, w), x, ref_w, qt)


@pytest.mark.parametrize("qt", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_formats_with_rows_not_in_32_value_groups(qt, monkeypatch):
    """k = 70: F16/BF16 take the plain loop (m = 1) and decoded chunks through BLAS (m > 1)."""
    rng = np.random.default_rng(13)
    n, k = 23, 70
    raw, ref_w = make_weight(qt, n, k, rng)
    w = ck.QWeight(raw, qt, (n, k))
    monkeypatch.setattr(ck, "CHUNK_ELEMS", 8 * k)
    for m in (1, 5):
        x = rng.standard_normal((m, k)).astype(np.float32)
        check_product(ck.matmul(x, w), x, ref_w, qt)
    np.testing.assert_allclose(ck.embed_rows(w, [3, 0, 22]), ref_w[[3, 0, 22]], rtol=1e-6)


@pytest.mark.parametrize("qt", [T.Q8_0, T.Q4_K, T.F16], ids=lambda t: t.name)
def test_embed_rows(qt):
    rng = np.random.default_rng(11)
    n, k = 29, k_for(qt)
    raw, ref_w = make_weight(qt, n, k, rng)
    w = ck.QWeight(raw, qt, (n, k))
    ids = np.array([0, 28, 5, 5, 17], np.int32)
    np.testing.assert_allclose(ck.embed_rows(w, ids), ref_w[ids], rtol=1e-6, atol=1e-7 * np.abs(ref_w).max())
    assert ck.embed_rows(w, np.array([], np.int64)).shape == (0, k)
    with pytest.raises(IndexError):
        ck.embed_rows(w, [29])
    with pytest.raises(IndexError):
        ck.embed_rows(w, [-1])


def test_single_row_and_single_block():
    rng = np.random.default_rng(3)
    raw, ref_w = make_weight(T.Q4_0, 1, 32, rng)
    w = ck.QWeight(raw, T.Q4_0, (1, 32))
    for m in (1, 4):
        x = rng.standard_normal((m, 32)).astype(np.float32)
        check_product(ck.matmul(x, w), x, ref_w, T.Q4_0)


def test_raw_is_a_view_of_contiguous_bytes():
    rng = np.random.default_rng(5)
    raw, _ = make_weight(T.Q8_0, 8, 64, rng)
    flat = raw.reshape(-1)
    w = ck.QWeight(flat, T.Q8_0, (8, 64))
    assert np.shares_memory(w.raw, flat) and w.raw.shape == (8, 2 * 34)
    assert not w.raw.flags.writeable and flat.flags.writeable  # one compiled type, caller's array untouched


def test_bad_shapes_are_refused():
    rng = np.random.default_rng(9)
    raw, _ = make_weight(T.Q8_0, 4, 64, rng)
    with pytest.raises(ValueError, match="bytes"):
        ck.QWeight(raw, T.Q8_0, (5, 64))
    with pytest.raises(ValueError, match="block"):
        ck.QWeight(raw, T.Q8_0, (4, 60))
    w = ck.QWeight(raw, T.Q8_0, (4, 64))
    with pytest.raises(ValueError, match="x must be"):
        ck.matmul(np.zeros((2, 32), np.float32), w)
    assert not ck.supported(T.IQ2_XXS)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        ck.QWeight(raw, T.IQ2_XXS, (4, 64))


def test_mxfp4_every_code_decodes_exactly():
    """All 256 byte values in every position of a block (both nibbles, both signs, all codes)."""
    blocks = np.zeros((256, 17), np.uint8)
    blocks[:, 0] = 127  # scale 2**0 (stored halved)
    blocks[:, 1:] = np.arange(256, dtype=np.uint8)[:, None]
    raw = blocks.reshape(8, -1)
    w = ck.QWeight(raw, T.MXFP4, (8, 32 * 32))
    np.testing.assert_array_equal(ck.dequantize(w), gguf.quants.dequantize(raw, T.MXFP4).reshape(8, -1))


# byte offsets of the f16 scales of the 32-value formats
F16_FIELDS_32 = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,)}


@pytest.mark.parametrize("qt", list(F16_FIELDS_32) + K_QUANTS, ids=lambda t: t.name)
def test_every_finite_half_scale_decodes_exactly(qt):
    """Each block's f16 scales take every finite half (subnormals included), one per block, in each
    scale field: the decoded rows equal gguf's, which widens halves with NumPy. The kernels read
    scales by the host's conversion instruction where it has one (cpu_llvm.NATIVE_HALVES), else
    by bit arithmetic; a wrong lane or offset of the 4-byte read gives another scale."""
    halves = np.arange(1 << 16, dtype=np.uint16)
    halves = halves[np.isfinite(halves.view(np.float16))]
    bs, ts = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, size=(halves.size, ts), dtype=np.uint8)
    fields = (F16_FIELDS_32 | F16_FIELDS)[qt]
    for i, off in enumerate(fields):  # the other field gets a shuffled order, so pairs vary
        h = halves if i == 0 else rng.permutation(halves)
        blocks[:, off:off + 2] = h.view(np.uint8).reshape(-1, 2)
    n = 256  # rows of whole blocks
    per_row = -(-halves.size // n)
    pad = per_row * n - halves.size
    blocks = np.concatenate([blocks, blocks[:pad]]).reshape(n, per_row * ts)
    w = ck.QWeight(blocks, qt, (n, per_row * bs))
    ref = gguf.quants.dequantize(blocks, qt).reshape(n, -1)
    got = ck.dequantize(w)
    np.testing.assert_array_equal(got, ref.astype(np.float32))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("qt", [T.Q4_1, T.Q8_0, T.Q4_K, T.F16], ids=lambda t: t.name)
def test_a_non_finite_x_gives_non_finite_outputs(qt, bad):
    """Rounding x to 16 bits must not turn an infinity or a NaN into finite levels: the row's
    outputs are NaN (or infinite) as with float x, which is what the checks on logits look for;
    the other rows stay finite, in both kernels."""
    rng = np.random.default_rng(17)
    n, k = 13, k_for(qt)
    raw, ref_w = make_weight(qt, n, k, rng)
    w = ck.QWeight(raw, qt, (n, k))
    for m in (1, 9):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[0, 5] = bad
        y = ck.matmul(x, w)
        assert not np.any(np.isfinite(y[0])), y[0]
        assert np.all(np.isfinite(y[1:]))


def _llvm_code_resident() -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                inside = line.rstrip().endswith("libllvmlite.so") and "w" not in head[1]
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT and /proc are Linux's")
def test_llvm_code_is_paged_out_and_products_still_run():
    """The CPU backend starts numba's target, then gives LLVM's code pages back before the
    weights load (resident memory); the kernels keep working after it."""
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    qw = ck.QWeight(np.frombuffer(gguf.quants.quantize(w, T.Q8_0), np.uint8).copy(), T.Q8_0, w.shape)
    ck.matmul(x, qw)
    before = _llvm_code_resident()
    if not ck.start_and_page_out_compiler():
        pytest.skip("this kernel refuses MADV_PAGEOUT")
    after = _llvm_code_resident()
    assert after < min(before / 2, 16 << 20), (before, after)
    ref = x.astype(np.float64) @ gguf.quants.dequantize(qw.raw, T.Q8_0).reshape(w.shape).astype(np.float64).T
    np.testing.assert_allclose(ck.matmul(x, qw), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max(), err_msg=str(seed))
