"""LLVM IR building blocks for the CPU kernels (cpu_formats.py, cpu_kernels.py).

Why IR rather than plain Numba loops: a GGUF block is a handful of scales and 16-32 packed bytes.
Written as Python loops over a block, LLVM fully unrolls the 16-iteration loop before its loop
vectorizer sees it, and the SLP vectorizer then gives up (Numba widens every uint8 to int64, and
the output buffer may alias the weights), so the decode runs one byte at a time: 1.3 G weights/s
per core for Q4_1, against 4.4 with the block decoded as one <32 x i8> vector here. Each format
therefore describes its block once, as a few vector operations on an `Emit` (integer levels with
their scales, 32 values at a time in value order), and `row_dot_x16` / `row_dequant` wrap that in
a loop over a row's blocks (`row_dot` / `row_dot_rows`: F16/BF16 rows against float x). LLVM lowers the generic vector types to whatever the host has (SSE, AVX2, NEON);
nothing here names an instruction set.
"""
from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
# FMA contraction only, no reassociation, for Emit's float operations (the decoders' scales and the
# other kernels). _row_part, whose bits must not depend on the kernel it is inlined into, uses no
# flags and explicit FMAs instead.
FAST = ("contract",)
#: every decoder returns vectors of this many values
LANES = 32


def _native_halves() -> bool:
    """Whether LLVM lowers half -> float to one instruction here (F16C on x86, any AArch64); on other
    hosts it would be a call into a runtime library that Numba's JIT may not link."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except Exception:  # pragma: no cover - feature query unavailable: keep the portable form
        return False


#: half -> float by the host's conversion instruction (exact for every half), else bit arithmetic
NATIVE_HALVES = _native_halves()


def vec(elt, n: int = LANES) -> ir.VectorType:
    return ir.VectorType(elt, n)


def i64(builder, v):
    """An integer argument widened to i64 (sign-extended) for address arithmetic."""
    return builder.sext(v, I64) if v.type.width < 64 else v


def source_key(*names: str) -> tuple:
    """The sha256 of these modules of this package as a tuple of ints, for a kernel's closure:
    Numba's cache key sees closure values but not the IR the intrinsics they call generate, and
    a tuple of ints is compiled in as a constant (a string would be unpickled on every call)."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in names:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return tuple(h.digest())


class Part(NamedTuple):
    """32 consecutive values of a block: scale * q + offset, scale and offset per 16 values
    (s0/b0 for values 0-15, s1/b1 for 16-31; the same object twice where they are uniform).
    Float formats (F16, BF16) give q as <32 x float> and no scale."""

    q: ir.Value  # <32 x iN> signed integer levels within int16 (or <32 x float>, s0 = s1 = None)
    s0: ir.Value | None
    s1: ir.Value | None
    b0: ir.Value | None = None
    b1: ir.Value | None = None

    @classmethod
    def uniform(cls, q, scale, offset=None):
        return cls(q, scale, scale, offset, offset)


class Emit:
    """A builder with the handful of operations block decoders need; Python ints become constants
    (splatted to the other operand's vector width)."""

    f32 = F32

    def __init__(self, builder: ir.IRBuilder):
        self.b = builder

    # ---- constants and shapes
    def const(self, ty, value):
        if isinstance(ty, ir.VectorType):
            return ir.Constant(ty, [ir.Constant(ty.element, v) for v in value] if isinstance(value, (list, tuple))
                               else [ir.Constant(ty.element, value)] * ty.count)
        return ir.Constant(ty, value)

    def _like(self, v, other):
        return self.const(other.type, v) if isinstance(v, (int, float, list)) else v

    def splat(self, scalar, n: int = LANES):
        vt = vec(scalar.type, n)
        v = self.b.insert_element(ir.Constant(vt, ir.Undefined), scalar, ir.Constant(I32, 0))
        return self.b.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))

    def concat(self, a, c):
        n = a.type.count
        return self.b.shuffle_vector(a, c, ir.Constant(vec(I32, 2 * n), list(range(2 * n))))

    def halves(self, s0, s1):
        """<32 x float> whose first 16 lanes are scalar s0 and last 16 are s1 (per-16 scales)."""
        return self.concat(self.splat(s0, 16), self.splat(s1, 16))

    @staticmethod
    def vec_ptr(bits: int, n: int = LANES):
        return vec(ir.IntType(bits), n).as_pointer()

    @staticmethod
    def vec_f32(n: int = LANES):
        return vec(F32, n)

    # ---- memory (p is an i8* to the block; offsets in bytes)
    def ptr(self, p, off: int):
        return self.b.gep(p, [ir.Constant(I64, off)]) if off else p

    def load_bytes(self, p, off: int, n: int):
        return self.b.load(self.b.bitcast(self.ptr(p, off), vec(I8, n).as_pointer()), align=1)

    def byte(self, p, off: int):
        """The byte at p+off as an i32 (zero-extended)."""
        return self.b.zext(self.b.load(self.ptr(p, off)), I32)

    def u32(self, p, off: int):
        return self.b.load(self.b.bitcast(self.ptr(p, off), I32.as_pointer()), align=1)

    def f16_bits(self, h):
        """IEEE half bits (i32 or <n x i32>, upper bits clear) -> float: exact for every finite half."""
        if NATIVE_HALVES:
            return self.halves_f32(self.b.trunc(h, vec(I16, h.type.count) if isinstance(h.type, ir.VectorType) else I16))
        sign = self.shl(self.and_(h, 0x8000), 16)
        mag = self.shl(self.and_(h, 0x7FFF), 13)
        ft = vec(F32, h.type.count) if isinstance(h.type, ir.VectorType) else F32
        return self.fmul(self.b.bitcast(self.or_(sign, mag), ft), self.const(ft, 2.0 ** 112))

    def halves_f32(self, h):
        """IEEE half bits (i16 or <n x i16>) -> float by the conversion instruction (NATIVE_HALVES):
        exact for every half, infinities and NaNs included."""
        if not isinstance(h.type, ir.VectorType):
            return self.b.fpext(self.b.bitcast(h, ir.HalfType()), F32)
        ht = vec(ir.HalfType(), h.type.count)
        return self.b.fpext(self.b.bitcast(h, ht), vec(F32, h.type.count))

    def f16(self, p, off: int):
        """The little-endian IEEE half at p+off as a float, exact for every finite half: by the
        host's conversion instruction where it has one (NATIVE_HALVES), else by bit arithmetic
        (the multiply by 2**112 rebiases the exponent, subnormals included)."""
        if not NATIVE_HALVES:
            h = self.b.load(self.b.bitcast(self.ptr(p, off), I16.as_pointer()), align=1)
            return self.f16_bits(self.b.zext(h, I32))
        # Read as one lane of a 4-byte load within the block (every block is at least 17 bytes):
        # a lone 2-byte load is inserted into whatever register is free, often a loop's
        # accumulator, a false dependency that chained each block of a row to the one before.
        at, lane = (off, 0) if off < 2 else (off - 2, 1)
        pair = self.b.load(self.b.bitcast(self.ptr(p, at), vec(I16, 2).as_pointer()), align=1)
        return self.b.extract_element(self.halves_f32(pair), ir.Constant(I32, lane))

    # ---- integer ops (scalars or vectors; int operands become constants)
    def and_(self, a, c):
        return self.b.and_(a, self._like(c, a))

    def or_(self, a, c):
        return self.b.or_(a, self._like(c, a))

    def shr(self, a, c):
        return a if isinstance(c, int) and c == 0 else self.b.lshr(a, self._like(c, a))

    def shl(self, a, c):
        return a if isinstance(c, int) and c == 0 else self.b.shl(a, self._like(c, a))

    def add(self, a, c):
        return self.b.add(a, self._like(c, a))

    def sub(self, a, c):
        return self.b.sub(a, self._like(c, a))

    def zext(self, v, elt=I32):
        return self.b.zext(v, vec(elt, v.type.count) if isinstance(v.type, ir.VectorType) else elt)

    def sext(self, v, elt=I32):
        return self.b.sext(v, vec(elt, v.type.count) if isinstance(v.type, ir.VectorType) else elt)

    def select(self, cond, a, c):
        return self.b.select(cond, a, c)

    def eq(self, a, c):
        return self.b.icmp_unsigned("==", a, self._like(c, a))

    def ne(self, a, c):
        return self.b.icmp_unsigned("!=", a, self._like(c, a))

    def lt(self, a, c):
        return self.b.icmp_unsigned("<", a, self._like(c, a))

    # ---- float
    def uf(self, v):
        """Unsigned integer (vector) to float."""
        t = vec(F32, v.type.count) if isinstance(v.type, ir.VectorType) else F32
        return self.b.uitofp(v, t)

    def sf(self, v):
        t = vec(F32, v.type.count) if isinstance(v.type, ir.VectorType) else F32
        return self.b.sitofp(v, t)

    def fmul(self, a, c):
        return self.b.fmul(a, c, flags=FAST)

    def fadd(self, a, c):
        return self.b.fadd(a, c, flags=FAST)

    def fsub(self, a, c):
        return self.b.fsub(a, c, flags=FAST)

    def fneg(self, a):
        return self.b.fsub(self.const(a.type, 0.0), a, flags=FAST)

    def per_half(self, a, c, n: int = LANES):
        """<n x float>: scalar a in the first n/2 lanes, c in the rest (one splat if a is c)."""
        return self.splat(a, n) if a is c else self.concat(self.splat(a, n // 2), self.splat(c, n // 2))

    def values(self, part: Part):
        """A Part as <32 x float>."""
        if part.s0 is None:
            return part.q
        v = self.fmul(self.sf(part.q), self.per_half(part.s0, part.s1))
        return v if part.b0 is None else self.fadd(v, self.per_half(part.b0, part.b1))

    def pair_dot(self, a, c):
        """<2n x i16> a, c -> <n x i32> sums of adjacent products (x86 lowers it to pmaddwd)."""
        n = a.type.count
        p = self.b.mul(self.b.sext(a, vec(I32, n)), self.b.sext(c, vec(I32, n)))
        ev = self.b.shuffle_vector(p, p, ir.Constant(vec(I32, n // 2), list(range(0, n, 2))))
        od = self.b.shuffle_vector(p, p, ir.Constant(vec(I32, n // 2), list(range(1, n, 2))))
        return self.b.add(ev, od)

    def nibbles(self, q):
        """<n x i8> packed bytes -> (low nibbles, high nibbles), still <n x i8>: bit work on bytes
        is a quarter of the vector operations of the same work on int32 lanes."""
        return self.and_(q, 15), self.shr(q, 4)

    def to_i16(self, q):
        w = q.type.element.width
        return q if w == 16 else (self.b.sext(q, vec(I16, q.type.count)) if w < 16 else self.b.trunc(q, vec(I16, q.type.count)))

    def hsum(self, v):
        n = v.type.count
        while n > 1:
            h = n // 2
            lo = self.b.shuffle_vector(v, v, ir.Constant(vec(I32, h), list(range(h))))
            hi = self.b.shuffle_vector(v, v, ir.Constant(vec(I32, h), list(range(h, n))))
            v = self.fadd(lo, hi)
            n = h
        return self.b.extract_element(v, ir.Constant(I32, 0))


def _data(context, builder, aty, aval, off):
    """i8* to element `off` of a Numba array (any dtype; `off` counts elements)."""
    arr = context.make_array(aty)(context, builder, aval)
    return builder.gep(arr.data, [off])


def _fma(b, x, y, z):
    """x * y + z with one rounding (float or <n x float>)."""
    t = x.type
    name = f"llvm.fma.v{t.count}f32" if isinstance(t, ir.VectorType) else "llvm.fma.f32"
    return b.call(cgutils.get_or_insert_function(b.module, ir.FunctionType(t, [t, t, t]), name), [x, y, z])


def _row_part(e: Emit, parts, xp, acc):
    """acc (<8 x float>) plus one block of float values (F16/BF16 parts: no scale) times one row
    of x, in 8-lane pieces: the part's whole contribution first, then one add into acc (acc's
    dependency chain is one add a part). Explicit fused multiply-adds and no contraction flags:
    the IR fixes every rounding, so row_dot and row_dot_rows (which both use this) give the same
    bits for a row whatever rows are beside it."""
    b = e.b
    v8 = vec(F32, 8)
    for j, part in enumerate(parts):
        assert part.s0 is None, "block formats go through row_dot_x16"
        xs = [b.load(b.bitcast(e.ptr(xp, j * LANES + 8 * c), v8.as_pointer()), align=4) for c in range(4)]
        qs = [b.shuffle_vector(part.q, part.q, ir.Constant(vec(I32, 8), list(range(8 * c, 8 * c + 8))))
              for c in range(4)]
        t = _fma(b, qs[3], xs[3], _fma(b, qs[2], xs[2], _fma(b, qs[1], xs[1], b.fmul(qs[0], xs[0]))))
        acc = b.fadd(acc, t)
    return acc


def row_dot(block_bytes: int, block_values: int, decode):
    """An intrinsic dot(w, w_off, n_blocks, x, x_off) -> float32: the dot product of n_blocks
    blocks starting at byte w_off of uint8 array w with float32 x from element x_off. `decode(e, p)`
    returns the block's Parts in order."""

    @intrinsic
    def dot(typingctx, w, w_off, n_blocks, x, x_off):
        sig = types.float32(w, w_off, n_blocks, x, x_off)

        def codegen(context, builder, signature, args):
            e = Emit(builder)
            wbase = builder.bitcast(_data(context, builder, signature.args[0], args[0], args[1]), I8.as_pointer())
            xbase = _data(context, builder, signature.args[3], args[3], args[4])
            acc = cgutils.alloca_once_value(builder, e.const(vec(F32, 8), 0.0))
            nb = i64(builder, args[2])
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                p = builder.gep(wbase, [builder.mul(b, e.const(I64, block_bytes))])
                xp = builder.gep(xbase, [builder.mul(b, e.const(I64, block_values))])
                builder.store(_row_part(e, decode(e, p), xp, builder.load(acc)), acc)
            return e.hsum(builder.load(acc))

        return sig, codegen

    return dot


def row_dot_rows(block_bytes: int, block_values: int, decode, rows: int):
    """An intrinsic dots(w, w_off, n_blocks, x, x_off, x_stride, y, y_off, y_stride): one weight row
    against `rows` rows of x (x_off + i * x_stride), into y[y_off + i * y_stride]. Each block is
    decoded once for all of them; each x row keeps an 8-lane accumulator (rows = 8: 8 + 4 vector
    registers with AVX2), so the loop is bound by FMAs rather than by decoding."""

    @intrinsic
    def dots(typingctx, w, w_off, n_blocks, x, x_off, x_stride, y, y_off, y_stride):
        sig = types.none(w, w_off, n_blocks, x, x_off, x_stride, y, y_off, y_stride)

        def codegen(context, builder, signature, args):
            e = Emit(builder)
            wbase = builder.bitcast(_data(context, builder, signature.args[0], args[0], args[1]), I8.as_pointer())
            xbase = _data(context, builder, signature.args[3], args[3], args[4])
            xs = i64(builder, args[5])
            xrows = [builder.gep(xbase, [builder.mul(xs, e.const(I64, i))]) for i in range(rows)]
            accs = [cgutils.alloca_once_value(builder, e.const(vec(F32, 8), 0.0)) for _ in range(rows)]
            with cgutils.for_range(builder, i64(builder, args[2])) as loop:
                b = loop.index
                p = builder.gep(wbase, [builder.mul(b, e.const(I64, block_bytes))])
                xo = builder.mul(b, e.const(I64, block_values))
                parts = decode(e, p)
                for i in range(rows):
                    builder.store(_row_part(e, parts, builder.gep(xrows[i], [xo]), builder.load(accs[i])), accs[i])
            ybase = _data(context, builder, signature.args[6], args[6], args[7])
            ys = i64(builder, args[8])
            for i in range(rows):
                builder.store(e.hsum(builder.load(accs[i])), builder.gep(ybase, [builder.mul(ys, e.const(I64, i))]))
            return context.get_dummy_value()

        return sig, codegen

    return dots


#: x's 16-bit levels span [-X16_MAX, X16_MAX] per 32 values
X16_MAX = 32767


def row_dot_x16(block_bytes: int, block_values: int, decode, rows: int):
    """An intrinsic dots(w, w_off, n_blocks, xq, xq_off, xq_stride, xd, xd_off, xd_stride, xs, xs_off,
    xs_stride, y, y_off, y_stride): one weight row against `rows` rows of x rounded to 16 bits per 32
    values (x ~ xq * xd: int16 levels, one float xd per 32 values; xs: the rounded x's sums per 16
    values, for the offsets), into y[y_off + i * y_stride].

    Levels times xq are summed in int32, two products at a time (pmaddwd on x86), exactly; each
    part's sums are then converted and scaled once (scale * xd), and the offsets multiply xs. That
    is a quarter of the float kernels' vector work for Q4_1 (no level is converted to float), at
    x's rounding of at most amax/65534 per value (the float path's own rounding is ~2**-24).
    Every row's float operations come in the same order whatever `rows` is, so the 1-row and
    8-row kernels give a row the same bits."""
    groups = block_values // LANES

    @intrinsic
    def dots(typingctx, w, w_off, n_blocks, xq, xq_off, xq_stride, xd, xd_off, xd_stride, xs, xs_off, xs_stride,
             y, y_off, y_stride):
        sig = types.none(w, w_off, n_blocks, xq, xq_off, xq_stride, xd, xd_off, xd_stride, xs, xs_off, xs_stride,
                         y, y_off, y_stride)

        def codegen(context, builder, signature, args):
            e, b = Emit(builder), builder
            a = signature.args

            def bases(i):  # `rows` pointers into array argument i, offset i+1, stride i+2
                base = _data(context, b, a[i], args[i], i64(b, args[i + 1]))
                return [b.gep(base, [b.mul(i64(b, args[i + 2]), e.const(I64, r))]) for r in range(rows)]

            wbase = b.bitcast(_data(context, b, a[0], args[0], i64(b, args[1])), I8.as_pointer())
            xq_rows, xd_rows, xs_rows, y_rows = bases(3), bases(6), bases(9), bases(12)
            v8 = vec(F32, 8)
            accs = [cgutils.alloca_once_value(b, e.const(v8, 0.0)) for _ in range(rows)]
            offs = [cgutils.alloca_once_value(b, e.const(F32, 0.0)) for _ in range(rows)]
            half = [ir.Constant(vec(I32, 16), list(range(16 * h, 16 * h + 16))) for h in range(2)]
            with cgutils.for_range(b, i64(b, args[2])) as loop:
                p = b.gep(wbase, [b.mul(loop.index, e.const(I64, block_bytes))])
                for j, part in enumerate(decode(e, p)):
                    g = b.add(b.mul(loop.index, e.const(I64, groups)), e.const(I64, j))
                    q = e.to_i16(part.q)
                    qh = [b.shuffle_vector(q, q, h) for h in half]
                    g2 = b.mul(g, e.const(I64, 2))
                    for r in range(rows):
                        xp = b.gep(xq_rows[r], [b.mul(g, e.const(I64, LANES))])
                        x = b.load(b.bitcast(xp, vec(I16, LANES).as_pointer()), align=2)
                        p0, p1 = (e.pair_dot(qh[h], b.shuffle_vector(x, x, half[h])) for h in range(2))
                        dx = b.load(b.gep(xd_rows[r], [g]))
                        acc = b.load(accs[r])
                        if part.s1 is part.s0:
                            acc = _fma(b, e.sf(b.add(p0, p1)), e.splat(b.fmul(part.s0, dx), 8), acc)
                        else:
                            acc = _fma(b, e.sf(p0), e.splat(b.fmul(part.s0, dx), 8), acc)
                            acc = _fma(b, e.sf(p1), e.splat(b.fmul(part.s1, dx), 8), acc)
                        b.store(acc, accs[r])
                        if part.b0 is not None:
                            xs0 = b.load(b.gep(xs_rows[r], [g2]))
                            xs1 = b.load(b.gep(xs_rows[r], [b.add(g2, e.const(I64, 1))]))
                            b.store(_fma(b, part.b1, xs1, _fma(b, part.b0, xs0, b.load(offs[r]))), offs[r])
            for r in range(rows):
                b.store(b.fadd(e.hsum(b.load(accs[r])), b.load(offs[r])), y_rows[r])
            return context.get_dummy_value()

        return sig, codegen

    return dots


def row_dequant(block_bytes: int, block_values: int, decode):
    """An intrinsic dequant(w, w_off, n_blocks, out, out_off): decode n_blocks blocks from byte w_off
    of w into float32 out from element out_off."""

    @intrinsic
    def dequant(typingctx, w, w_off, n_blocks, out, out_off):
        sig = types.none(w, w_off, n_blocks, out, out_off)

        def codegen(context, builder, signature, args):
            e = Emit(builder)
            wbase = builder.bitcast(_data(context, builder, signature.args[0], args[0], args[1]), I8.as_pointer())
            obase = _data(context, builder, signature.args[3], args[3], args[4])
            nb = i64(builder, args[2])
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                p = builder.gep(wbase, [builder.mul(b, e.const(I64, block_bytes))])
                op = builder.gep(obase, [builder.mul(b, e.const(I64, block_values))])
                for i, part in enumerate(decode(e, p)):
                    builder.store(e.values(part), builder.bitcast(e.ptr(op, i * LANES), vec(F32).as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dequant
