"""GGUF block layouts as vector decoders (see cpu_llvm.py for why IR).

Each decoder gets an `Emit` and an i8* to one block and returns the block's values, 32 at a time
in value order, as `Part`s: integer levels q (<32 x i8> or wider, signed) with a scale and an
optional offset per 16 values, value = scale * q + offset. The float kernels expand that to
<32 x float>; the int8 kernels multiply q with 8-bit activations and apply scale (and offset
times the activations' sum) per 16 values. The layouts are ggml's (ggml-common.h); gguf-py's
`quants.py` decodes the same bytes with NumPy, and tests/test_cpu_kernels.py compares the two on
every format.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from gguf import GGMLQuantizationType as T

from .cpu_llvm import I8, I32, Emit, Part, vec


class Format(NamedTuple):
    block_bytes: int
    block_values: int
    decode: Callable


def _nibble_block(e: Emit, p, q_off: int):
    """Values 0-15 in the low nibbles of 16 bytes, 16-31 in the high ones, as <32 x i8>."""
    return e.concat(*e.nibbles(e.load_bytes(p, q_off, 16)))


def _fifth_bits(e: Emit, p, off: int):
    """Bit j of the little-endian u32 at p+off, shifted to bit 4, for j = 0..31 (<32 x i8>)."""
    qh = e.splat(e.u32(p, off))
    bit = e.and_(qh, [1 << j for j in range(32)])
    return e.shl(e.b.zext(e.ne(bit, 0), vec(I8, 32)), 4)


def q4_0(e: Emit, p):
    return [Part.uniform(e.sub(_nibble_block(e, p, 2), 8), e.f16(p, 0))]


def q4_1(e: Emit, p):
    return [Part.uniform(_nibble_block(e, p, 4), e.f16(p, 0), e.f16(p, 2))]


def q5_0(e: Emit, p):
    q = e.or_(_nibble_block(e, p, 6), _fifth_bits(e, p, 2))
    return [Part.uniform(e.sub(q, 16), e.f16(p, 0))]


def q5_1(e: Emit, p):
    q = e.or_(_nibble_block(e, p, 8), _fifth_bits(e, p, 4))
    return [Part.uniform(q, e.f16(p, 0), e.f16(p, 2))]


def q8_0(e: Emit, p):
    return [Part.uniform(e.load_bytes(p, 2, 32), e.f16(p, 0))]


def mxfp4(e: Emit, p):
    # E2M1 codes (sign, 2-bit exponent, 1-bit mantissa), doubled so that they are integers:
    # 0 1 2 3 4 6 8 12; the E8M0 scale is stored as half of 2**(e-127) to compensate.
    # With t the low three bits, the magnitude is t + max(t - 4, 0) + (2 if t == 7): constant
    # operations on bytes (a per-lane shift would need int32 lanes on x86).
    c = _nibble_block(e, p, 1)
    t = e.and_(c, 7)
    over = e.sub(t, 4)
    over = e.select(e.b.icmp_signed(">", over, e.const(over.type, 0)), over, e.const(over.type, 0))
    mag = e.add(e.add(t, over), e.shl(e.b.zext(e.eq(t, 7), t.type), 1))
    val = e.select(e.ne(e.and_(c, 8), 0), e.sub(e.const(mag.type, 0), mag), mag)
    sc = e.byte(p, 0)
    bits = e.select(e.lt(sc, 2), e.shl(e.const(I32, 0x00200000), sc), e.shl(e.sub(sc, 1), 23))
    return [Part.uniform(val, e.b.bitcast(bits, e.f32))]


def _k_scale_min(e: Emit, p, off: int, j: int):
    """Q4_K/Q5_K: the 6-bit (scale, min) of sub-block j, packed in 12 bytes at p+off."""
    s = lambda i: e.byte(p, off + i)  # noqa: E731
    if j < 4:
        return e.and_(s(j), 63), e.and_(s(j + 4), 63)
    sc = e.or_(e.and_(s(j + 4), 15), e.shl(e.shr(s(j - 4), 6), 4))
    mn = e.or_(e.shr(s(j + 4), 4), e.shl(e.shr(s(j), 6), 4))
    return sc, mn


def _k_scales(e: Emit, p, off: int, d, dmin):
    out = []
    for j in range(8):
        sc, mn = _k_scale_min(e, p, off, j)
        out.append((e.fmul(d, e.uf(sc)), e.fneg(e.fmul(dmin, e.uf(mn)))))
    return out


def q4_k(e: Emit, p):
    sm = _k_scales(e, p, 4, e.f16(p, 0), e.f16(p, 2))
    out = []
    for c in range(4):  # 32 bytes each: sub-block 2c in the low nibbles, 2c+1 in the high ones
        lo, hi = e.nibbles(e.load_bytes(p, 16 + 32 * c, 32))
        out += [Part.uniform(lo, *sm[2 * c]), Part.uniform(hi, *sm[2 * c + 1])]
    return out


def q5_k(e: Emit, p):
    sm = _k_scales(e, p, 4, e.f16(p, 0), e.f16(p, 2))
    qh = e.load_bytes(p, 16, 32)  # bit j of byte l: the fifth bit of value l of sub-block j
    out = []
    for c in range(4):
        lo, hi = e.nibbles(e.load_bytes(p, 48 + 32 * c, 32))
        for j, q in ((2 * c, lo), (2 * c + 1, hi)):
            q = e.or_(q, e.shl(e.and_(e.shr(qh, j), 1), 4))
            out.append(Part.uniform(q, *sm[j]))
    return out


def q6_k(e: Emit, p):
    d = e.f16(p, 208)
    out = []
    for h in range(2):  # 128 values: low bits in ql[64h:64h+64], high two bits in qh[32h:32h+32]
        qh = e.load_bytes(p, 128 + 32 * h, 32)
        ql = [e.load_bytes(p, 64 * h + 32 * t, 32) for t in range(2)]
        for u in range(4):  # vector 4h+u: nibble (u // 2) of ql half (u % 2), crumb u of qh
            q = e.or_(e.and_(e.shr(ql[u % 2], 4 * (u // 2)), 15), e.shl(e.and_(e.shr(qh, 2 * u), 3), 4))
            v = 4 * h + u
            s0, s1 = (e.fmul(d, e.sf(e.sext(e.b.load(e.ptr(p, 192 + 2 * v + i)), I32))) for i in range(2))
            out.append(Part(e.sub(q, 32), s0, s1))
    return out


def q2_k(e: Emit, p):
    d, dmin = e.f16(p, 80), e.f16(p, 82)
    out = []
    for h in range(2):
        qs = e.load_bytes(p, 16 + 32 * h, 32)
        for s in range(4):
            v = 4 * h + s
            sc = [e.byte(p, 2 * v + i) for i in range(2)]
            s0, s1 = (e.fmul(d, e.uf(e.and_(x, 15))) for x in sc)
            b0, b1 = (e.fneg(e.fmul(dmin, e.uf(e.shr(x, 4)))) for x in sc)
            out.append(Part(e.and_(e.shr(qs, 2 * s), 3), s0, s1, b0, b1))
    return out


def _q3_scale(e: Emit, p, i: int):
    """Q3_K: the signed 6-bit scale i (0..15): low 4 bits in bytes 96..103, high 2 in 104..107."""
    lo = e.and_(e.shr(e.byte(p, 96 + i % 8), 4 * (i // 8)), 15)
    hi = e.and_(e.shr(e.byte(p, 104 + i % 4), 2 * (i // 4)), 3)
    return e.sub(e.or_(lo, e.shl(hi, 4)), 32)


def q3_k(e: Emit, p):
    d = e.f16(p, 108)
    hm = e.load_bytes(p, 0, 32)
    out = []
    for h in range(2):
        qs = e.load_bytes(p, 32 + 32 * h, 32)
        for s in range(4):
            v = 4 * h + s
            # level = low two bits - 4 unless bit v of hmask[l] is set
            q = e.or_(e.and_(e.shr(qs, 2 * s), 3), e.shl(e.and_(e.shr(hm, v), 1), 2))
            s0, s1 = (e.fmul(d, e.sf(_q3_scale(e, p, 2 * v + i))) for i in range(2))
            out.append(Part(e.sub(q, 4), s0, s1))
    return out


def _halves32(e: Emit, p):
    return e.zext(e.b.load(e.b.bitcast(p, e.vec_ptr(16, 32)), align=1))


def f16(e: Emit, p):
    return [Part(e.f16_bits(_halves32(e, p)), None, None)]


def bf16(e: Emit, p):
    return [Part(e.b.bitcast(e.shl(_halves32(e, p), 16), e.vec_f32()), None, None)]


#: F16/BF16 as 32-value "blocks", for rows whose length is a multiple of 32 (float x: no 16-bit rounding)
FLOAT_FORMATS: dict[T, Format] = {T.F16: Format(64, 32, f16), T.BF16: Format(64, 32, bf16)}

FORMATS: dict[T, Format] = {
    T.Q4_0: Format(18, 32, q4_0),
    T.Q4_1: Format(20, 32, q4_1),
    T.Q5_0: Format(22, 32, q5_0),
    T.Q5_1: Format(24, 32, q5_1),
    T.Q8_0: Format(34, 32, q8_0),
    T.MXFP4: Format(17, 32, mxfp4),
    T.Q2_K: Format(84, 256, q2_k),
    T.Q3_K: Format(110, 256, q3_k),
    T.Q4_K: Format(144, 256, q4_k),
    T.Q5_K: Format(176, 256, q5_k),
    T.Q6_K: Format(210, 256, q6_k),
}
