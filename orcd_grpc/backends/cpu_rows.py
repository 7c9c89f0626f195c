"""Vector helpers over float32 rows of a head, for the CPU attention kernel (cpu_ops): a cache
row loaded (F16 widened), dot products, an exponential and axpy, 8 lanes at a time.

Written as IR (on cpu_llvm's `Emit`) for the same reason as the block decoders: Numba's loops
over 16-bit cache rows and short dot products stayed scalar (about 2 ns a value), where these
run a vector per step. Each adds in one fixed order (8 lanes, then the same halving tree), so a
result never depends on how a caller was compiled.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .cpu_llvm import F32, I16, I32, I64, NATIVE_HALVES, Emit, _data, i64, vec

def _chunks(builder, n):
    """(full 8-lane chunks, the first tail index) of n values."""
    n = i64(builder, n)
    full = builder.udiv(n, ir.Constant(I64, 8))
    return n, full, builder.mul(full, ir.Constant(I64, 8))


@intrinsic
def load_row(typingctx, src, src_off, n, dst, dst_off):
    """dst[dst_off:dst_off+n] (float32) = src[src_off:src_off+n]: a float32 source copied, a uint16
    one read as IEEE halves: exact for every half, subnormals, infinities and NaNs (by the host's
    conversion instruction, or rebiased by a multiply by 2**112 with the exponent of infinities and
    NaNs set to all ones)."""
    sig = types.none(src, src_off, n, dst, dst_off)
    halves = src.dtype == types.uint16

    def codegen(context, builder, signature, args):
        e = Emit(builder)
        sp = _data(context, builder, signature.args[0], args[0], i64(builder, args[1]))
        dp = _data(context, builder, signature.args[3], args[3], i64(builder, args[4]))
        count, full, tail = _chunks(builder, args[2])
        if not halves:
            v8 = vec(F32, 8).as_pointer()
            with cgutils.for_range(builder, full) as loop:
                o = builder.mul(loop.index, ir.Constant(I64, 8))
                x = builder.load(builder.bitcast(builder.gep(sp, [o]), v8), align=4)
                builder.store(x, builder.bitcast(builder.gep(dp, [o]), v8), align=4)
            with cgutils.for_range_slice(builder, tail, count, ir.Constant(I64, 1), inc=True) as (i, _):
                builder.store(builder.load(builder.gep(sp, [i])), builder.gep(dp, [i]))
            return context.get_dummy_value()

        def one(h):  # i32 or <8 x i32> half bits
            if NATIVE_HALVES:
                return e.halves_f32(builder.trunc(h, vec(I16, 8) if isinstance(h.type, ir.VectorType) else I16))
            inf_nan = builder.select(builder.icmp_unsigned("==", e.and_(h, 0x7C00), e._like(0x7C00, h)),
                                     e._like(0x7F800000, h), e._like(0, h))
            bits = e.or_(e.or_(e.shl(e.and_(h, 0x8000), 16), e.shl(e.and_(h, 0x7FFF), 13)), inf_nan)
            ft = vec(F32, 8) if isinstance(h.type, ir.VectorType) else F32
            return e.fmul(builder.bitcast(bits, ft), e.const(ft, 2.0 ** 112))

        with cgutils.for_range(builder, full) as loop:
            o = builder.mul(loop.index, ir.Constant(I64, 8))
            h = builder.zext(builder.load(builder.bitcast(builder.gep(sp, [o]), vec(I16, 8).as_pointer()), align=2),
                             vec(I32, 8))
            builder.store(one(h), builder.bitcast(builder.gep(dp, [o]), vec(F32, 8).as_pointer()), align=4)
        with cgutils.for_range_slice(builder, tail, count, ir.Constant(I64, 1), inc=True) as (i, _):
            builder.store(one(builder.zext(builder.load(builder.gep(sp, [i])), I32)), builder.gep(dp, [i]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot_f32(typingctx, a, a_off, b, b_off, n):
    """sum a[a_off+i] * b[b_off+i] for i < n (float32 arrays): four 8-lane sums over 32 values at
    a time (independent chains: a head's 64-128 values are a few steps of each), the remaining
    8-value chunks into the first, the four added pairwise, a halving tree, then the tail."""
    sig = types.float32(a, a_off, b, b_off, n)

    def codegen(context, builder, signature, args):
        e = Emit(builder)
        ap = _data(context, builder, signature.args[0], args[0], i64(builder, args[1]))
        bp = _data(context, builder, signature.args[2], args[2], i64(builder, args[3]))
        accs = [cgutils.alloca_once_value(builder, e.const(vec(F32, 8), 0.0)) for _ in range(4)]
        count, full, tail = _chunks(builder, args[4])
        v8 = vec(F32, 8).as_pointer()

        def fma_at(acc, o):
            x = builder.load(builder.bitcast(builder.gep(ap, [o]), v8), align=4)
            y = builder.load(builder.bitcast(builder.gep(bp, [o]), v8), align=4)
            builder.store(e.fadd(builder.load(acc), e.fmul(x, y)), acc)

        quads = builder.udiv(full, ir.Constant(I64, 4))
        with cgutils.for_range(builder, quads) as loop:
            o = builder.mul(loop.index, ir.Constant(I64, 32))
            for j in range(4):
                fma_at(accs[j], builder.add(o, ir.Constant(I64, 8 * j)))
        with cgutils.for_range_slice(builder, builder.mul(quads, ir.Constant(I64, 4)), full, ir.Constant(I64, 1),
                                     inc=True) as (c, _):
            fma_at(accs[0], builder.mul(c, ir.Constant(I64, 8)))
        v = [builder.load(acc) for acc in accs]
        total = e.fadd(e.fadd(v[0], v[1]), e.fadd(v[2], v[3]))
        s = cgutils.alloca_once_value(builder, e.hsum(total))
        with cgutils.for_range_slice(builder, tail, count, ir.Constant(I64, 1), inc=True) as (i, _):
            t = e.fmul(builder.load(builder.gep(ap, [i])), builder.load(builder.gep(bp, [i])))
            builder.store(e.fadd(builder.load(s), t), s)
        return builder.load(s)

    return sig, codegen


@intrinsic
def axpy_f32(typingctx, alpha, x, x_off, y, y_off, n):
    """y[y_off+i] += alpha * x[x_off+i] for i < n (float32 arrays)."""
    sig = types.none(alpha, x, x_off, y, y_off, n)

    def codegen(context, builder, signature, args):
        e = Emit(builder)
        a = args[0] if args[0].type == F32 else builder.fptrunc(args[0], F32)
        xp = _data(context, builder, signature.args[1], args[1], i64(builder, args[2]))
        yp = _data(context, builder, signature.args[3], args[3], i64(builder, args[4]))
        a8 = e.splat(a, 8)
        count, full, tail = _chunks(builder, args[5])
        v8 = vec(F32, 8).as_pointer()
        with cgutils.for_range(builder, full) as loop:
            o = builder.mul(loop.index, ir.Constant(I64, 8))
            py = builder.bitcast(builder.gep(yp, [o]), v8)
            x = builder.load(builder.bitcast(builder.gep(xp, [o]), v8), align=4)
            builder.store(e.fadd(builder.load(py, align=4), e.fmul(a8, x)), py, align=4)
        with cgutils.for_range_slice(builder, tail, count, ir.Constant(I64, 1), inc=True) as (i, _):
            py = builder.gep(yp, [i])
            builder.store(e.fadd(builder.load(py), e.fmul(a, builder.load(builder.gep(xp, [i])))), py)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def exp_shift_f32(typingctx, x, x_off, n, m):
    """x[x_off+i] = exp(x[x_off+i] - m) for i < n (float32, in place; m a float32 at least every x,
    so each argument is <= 0): Cephes' expf (a degree-5 polynomial on [-ln2/2, ln2/2] times a power
    of two), about 1 ulp, 8 lanes at a time; arguments below -87.3 give 0, as float32's exp does."""
    sig = types.none(x, x_off, n, m)

    def codegen(context, builder, signature, args):
        e = Emit(builder)
        xp = _data(context, builder, signature.args[0], args[0], i64(builder, args[1]))
        mv = args[3] if args[3].type == F32 else builder.fptrunc(args[3], F32)

        def expf(v, lanes):
            ft = vec(F32, lanes) if lanes > 1 else F32
            it = vec(I32, lanes) if lanes > 1 else I32
            c = lambda k: e.const(ft, k)  # noqa: E731
            low = builder.fcmp_ordered("<", v, c(-87.3))
            v = builder.select(low, c(-87.3), v)
            floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ft, [ft]),
                                                   f"llvm.floor.v{lanes}f32" if lanes > 1 else "llvm.floor.f32")
            fx = builder.call(floor, [e.fadd(e.fmul(v, c(1.44269504088896341)), c(0.5))])
            r = e.fsub(e.fsub(v, e.fmul(fx, c(0.693359375))), e.fmul(fx, c(-2.12194440e-4)))
            y = c(1.9875691500e-4)
            for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
                y = e.fadd(e.fmul(y, r), c(k))
            y = e.fadd(e.fadd(e.fmul(e.fmul(y, r), r), r), c(1.0))
            pow2 = builder.bitcast(e.shl(e.add(builder.fptosi(fx, it), 127), 23), ft)
            return builder.select(low, c(0.0), e.fmul(y, pow2))

        count, full, tail = _chunks(builder, args[2])
        v8 = vec(F32, 8).as_pointer()
        m8 = e.splat(mv, 8)
        with cgutils.for_range(builder, full) as loop:
            p = builder.bitcast(builder.gep(xp, [builder.mul(loop.index, ir.Constant(I64, 8))]), v8)
            builder.store(expf(e.fsub(builder.load(p, align=4), m8), 8), p, align=4)
        with cgutils.for_range_slice(builder, tail, count, ir.Constant(I64, 1), inc=True) as (i, _):
            p = builder.gep(xp, [i])
            builder.store(expf(e.fsub(builder.load(p), mv), 1), p)
        return context.get_dummy_value()

    return sig, codegen
