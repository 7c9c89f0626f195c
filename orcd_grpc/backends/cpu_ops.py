"""The CPU backend's element-wise and attention kernels (numba), beside cpu_kernels' matmuls.

Why numba here too: at one decode token the work of a norm, a rope or one layer's attention is a
few microseconds, and the same op in NumPy is several array expressions of a few microseconds each
(temporaries, dispatch); fused into one compiled call per op, a decode step is its matmuls.

numba has no float16 on the CPU, so an F16 KV cache is held as uint16 bits: stores round to
nearest even here (as NumPy's astype does) and loads widen them with integer operations. The
kernels' `f16` argument tells which: True for such a cache, None for a float32 one (numba compiles
each separately and drops the other branch). A Q8_0 cache passes its scale arrays (`ks`, `vs`,
None otherwise): int8 levels, a float16 scale per 32 values of a row, the values turned by a
Walsh-Hadamard transform first (wht32).
"""
from __future__ import annotations

import math
import types

import numba
import numpy as np
from numba.extending import overload

from .cpu_llvm import source_key
from .cpu_rows import axpy_f32, dot_f32, exp_shift_f32, load_row

_JIT = dict(cache=True, nogil=True, fastmath=False)
_PAR = dict(_JIT, parallel=True)
# Below this many multiply-adds an op runs on the calling thread: waking numba's pool costs tens of
# microseconds on a quiet machine and a scheduler time slice on a busy one, more than the work.
PARALLEL_MIN_WORK = 1 << 18


def _both(fn):
    """fn compiled twice: (serial, parallel); prange is a plain range in the serial one. The
    parallel one is a copy under its own name: numba's disk cache keys entries by name and
    signature, not by the parallel flag."""
    par = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_par", fn.__defaults__, fn.__closure__)
    par.__qualname__ = fn.__qualname__ + "_par"
    return numba.njit(**_JIT)(fn), numba.njit(**_PAR)(par)



@numba.njit(**_JIT)
def f16_bits(u):
    """float32 bits (uint32) -> float16 bits, rounded to nearest even; overflow to inf."""
    sign = (u >> 16) & 0x8000
    e = (u >> 23) & 0xFF
    m = u & 0x7FFFFF
    if e == 0xFF:
        return sign | 0x7C00 | (0x200 if m else 0)
    e16 = np.int64(e) - 112
    if e16 >= 0x1F:
        return sign | 0x7C00
    if e16 <= 0:
        if e16 < -10:
            return sign
        m = m | 0x800000
        shift = np.int64(14) - e16
        half = m >> shift
        rem = m & ((np.uint32(1) << shift) - 1)
        mid = np.uint32(1) << (shift - 1)
        if rem > mid or (rem == mid and (half & 1)):
            half += 1
        return sign | half
    half = sign | (np.uint32(e16) << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (half & 1)):
        half += 1  # a carry out of the mantissa bumps the exponent, as it should
    return half


@numba.njit(**_JIT)
def _put(cache, scales, slot, h, row, f16):
    """Writes float32 `row` into cache[slot, h]: float32, float16 bits when f16 is True, or Q8_0
    when `scales` is an array (numba prunes the branches on None at compile time)."""
    if scales is not None:
        _put_q8(cache, scales, slot, h, row)
    elif f16 is None:
        for d in range(row.shape[0]):
            cache[slot, h, d] = row[d]
    else:
        for d in range(row.shape[0]):
            cache[slot, h, d] = f16_bits(np.float32(row[d]).view(np.uint32))


@numba.njit(**_JIT)
def wht32(x, a):
    """x[a:a + 32] = H x[a:a + 32], H the orthonormal 32-point Walsh-Hadamard transform (its own
    inverse), in float32, butterflies in a fixed order (the tests repeat it bit for bit)."""
    h = 1
    while h < 32:
        for i in range(a, a + 32, 2 * h):
            for j in range(i, i + h):
                u, v = x[j], x[j + h]
                x[j], x[j + h] = u + v, u - v
        h *= 2
    for j in range(a, a + 32):
        x[j] *= np.float32(0.17677669529663687)  # 1 / sqrt(32)


@numba.njit(**_JIT)
def _put_q8(cache, scales, slot, h, row):
    """GGML's Q8_0, bit for bit as gguf's quantize writes it, of each 32 values of the row turned
    by wht32: per block d = amax / 127 in float32, stored as a half; levels round(y * (1 / d)),
    halves away from zero. The transform spreads a block's outlier (keys have a few large
    channels) over its 32 values, so the others are not rounded to a step set by it; scores and
    outputs are the same through H, which attention applies to the queries and its output."""
    y = np.empty(32, np.float32)
    for b in range(row.shape[0] // 32):
        for j in range(32):
            y[j] = row[b * 32 + j]
        wht32(y, 0)
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(y[j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        scales[slot, h, b] = f16_bits(np.float32(d).view(np.uint32))
        for j in range(32):
            x = y[j] * inv
            r = math.floor(abs(x) + np.float32(0.5))
            cache[slot, h, b * 32 + j] = np.int8(r if x >= 0 else -r)


def _rms_norm(x, w, eps, res, out, s_out):
    """Rows of x [N, d]: out = s / rms(s) * w with s = x, or s = x + res (written to s_out) when
    res has rows."""
    n, d = x.shape
    add = res.shape[0] == n
    for i in numba.prange(n):
        acc = 0.0
        for j in range(d):
            v = x[i, j]
            if add:
                v += res[i, j]
                s_out[i, j] = v
            acc += np.float64(v) * v
        inv = np.float32(1.0 / math.sqrt(acc / d + eps))
        for j in range(d):
            v = x[i, j]
            if add:
                v = s_out[i, j]
            out[i, j] = v * inv * w[j]


@numba.njit(**_JIT)
def _rotate(src, dst, c, s, dim, neox):
    half = dim // 2
    for i in range(half):
        if neox:
            a, b = src[i], src[i + half]
            dst[i] = a * c[i] - b * s[i]
            dst[i + half] = a * s[i] + b * c[i]
        else:
            a, b = src[2 * i], src[2 * i + 1]
            dst[2 * i] = a * c[i] - b * s[i]
            dst[2 * i + 1] = a * s[i] + b * c[i]
    for i in range(dim, src.shape[0]):
        dst[i] = src[i]


def _rope(x, cos, sin, positions, dim, neox, out):
    """out [T, H, D] = x rotated by the rows of the cos/sin tables at positions."""
    T, H, _ = x.shape
    for t in numba.prange(T):
        p = positions[t]
        for h in range(H):
            _rotate(x[t, h], out[t, h], cos[p], sin[p], dim, neox)


@numba.njit(**_JIT)
def qkv_rope_store(qkv, cos, sin, positions, dim, neox, slots, kc, vc, f16, ks, vs, hq, hkv, dk, dv, q_out, tmp):
    """A fused projection's rows [T, hq*dk + hkv*dk + hkv*dv]: q roped into q_out [T, hq, dk];
    k roped and v written into the cache at slots (slot < 0: not written)."""
    for t in range(qkv.shape[0]):
        p = positions[t]
        row = qkv[t]
        for h in range(hq):
            _rotate(row[h * dk:(h + 1) * dk], q_out[t, h], cos[p], sin[p], dim, neox)
        if slots[t] < 0:
            continue
        base = hq * dk
        for h in range(hkv):
            _rotate(row[base + h * dk: base + (h + 1) * dk], tmp, cos[p], sin[p], dim, neox)
            _put(kc, ks, slots[t], h, tmp[:dk], f16)
        base += hkv * dk
        for h in range(hkv):
            _put(vc, vs, slots[t], h, row[base + h * dv: base + (h + 1) * dv], f16)


@numba.njit(**_JIT)
def store_kv(k, v, slots, kc, vc, f16, ks, vs):
    for t in range(k.shape[0]):
        if slots[t] < 0:
            continue
        for h in range(k.shape[1]):
            _put(kc, ks, slots[t], h, k[t, h], f16)
            _put(vc, vs, slots[t], h, v[t, h], f16)


def _load(cache, scales, slot, h, n, dst, srow):
    """dst[:n] = cache[slot, h] widened to float32: a float32 or F16 row (scales None), or a Q8_0
    row (srow: room for its scales). Compiled code only (the overload below): numba prunes a
    branch on `x is None` only where x is None, so each cache type gets its own body."""
    raise NotImplementedError


@overload(_load)
def _load_typed(cache, scales, slot, h, n, dst, srow):
    if isinstance(scales, numba.types.NoneType):
        def plain(cache, scales, slot, h, n, dst, srow):
            load_row(cache, (slot * cache.shape[1] + h) * n, n, dst, 0)
        return plain

    def q8_0(cache, scales, slot, h, n, dst, srow):
        load_row(scales[slot, h], 0, n // 32, srow, 0)
        src = cache[slot, h]
        for b in range(n // 32):  # a block at a time: the inner loop vectorizes
            d = srow[b]
            for j in range(b * 32, b * 32 + 32):
                dst[j] = d * np.float32(src[j])
    return q8_0


def _query(q, t, h0, group, dk, qb, scales):
    """qb [group * dk] = the query rows of heads h0.. of token t, turned by wht32 per 32 values
    for a Q8_0 cache (scales not None), as they are otherwise. Compiled code only."""
    raise NotImplementedError


@overload(_query)
def _query_typed(q, t, h0, group, dk, qb, scales):
    turn = not isinstance(scales, numba.types.NoneType)

    def impl(q, t, h0, group, dk, qb, scales):
        for g in range(group):
            for d in range(dk):
                qb[g * dk + d] = q[t, h0 + g, d]
            if turn:
                for a in range(g * dk, (g + 1) * dk, 32):
                    wht32(qb, a)
    return impl


def _unturn(acc, g, dv, scales):
    """acc[g] turned back by wht32 (a Q8_0 cache's values are stored turned). Compiled only."""
    raise NotImplementedError


@overload(_unturn)
def _unturn_typed(acc, g, dv, scales):
    if isinstance(scales, numba.types.NoneType):
        return lambda acc, g, dv, scales: None

    def impl(acc, g, dv, scales):
        row = acc[g]
        for a in range(0, dv, 32):
            wht32(row, a)
    return impl


def _make_attention(deps: tuple):
    """The decode attention kernel. `deps` (cpu_llvm.source_key of the modules whose helpers it
    inlines) only lands in the closure, where Numba's cache key sees it."""

    def _attention(q, kc, vc, f16, ks, vs, tokens, tok_seq, positions, ctx_lens, tables, bs, scale, window, sinks,
                   softcap, out):
        """Causal attention for the query rows `tokens` of q [T, hq, dk] over the paged cache; out
        [T, hq, dv]. One work item per (token, kv head) does the query heads that share it: the
        key rows are widened to float32 once for all of them, all scores first, then one softmax
        and one pass over the value rows (no running rescale). sinks: [hq] logits that join the
        denominator only (an empty array: none). Row products are cpu_rows' 8-lane helpers."""
        if len(deps) == 0:
            return
        hq = q.shape[1]
        hkv, dk, dv = kc.shape[1], kc.shape[2], vc.shape[2]
        group = hq // hkv
        has_sinks = sinks.shape[0] > 0
        for item in numba.prange(tokens.shape[0] * hkv):
            t = tokens[item // hkv]
            kh = item % hkv
            h0 = kh * group
            b = tok_seq[t]
            qpos = positions[t]
            hi = min(ctx_lens[b], qpos + 1)
            lo = max(0, qpos - window + 1) if window > 0 else 0
            n = max(0, hi - lo)
            sc = np.empty((group, n), np.float32)
            row = np.empty(max(dk, dv), np.float32)  # one cache row, widened to float32 once
            srow = np.empty(max(dk, dv) // 32 + 1, np.float32)  # a Q8_0 row's scales
            qb = np.empty(group * dk, np.float32)
            _query(q, t, h0, group, dk, qb, ks)
            for i in range(n):
                p = lo + i
                _load(kc, ks, tables[b, p // bs] * bs + p % bs, kh, dk, row, srow)
                for g in range(group):
                    s = dot_f32(qb, g * dk, row, 0, dk) * scale
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    sc[g, i] = s
            total = np.empty(group, np.float32)
            acc = np.zeros((group, dv), np.float32)
            for g in range(group):
                m = sinks[h0 + g] if has_sinks else -np.inf
                for i in range(n):
                    m = max(m, sc[g, i])
                z = math.exp(sinks[h0 + g] - m) if has_sinks else 0.0
                if n > 0:
                    exp_shift_f32(sc, g * n, n, np.float32(m))
                for i in range(n):
                    z += sc[g, i]
                total[g] = z
            for i in range(n):
                p = lo + i
                _load(vc, vs, tables[b, p // bs] * bs + p % bs, kh, dv, row, srow)
                for g in range(group):
                    axpy_f32(sc[g, i], row, 0, acc, g * dv, dv)
            for g in range(group):
                _unturn(acc, g, dv, vs)
                inv = np.float32(1.0 / total[g]) if total[g] > 0 else np.float32(0.0)
                for d in range(dv):
                    out[t, h0 + g, d] = acc[g, d] * inv

    return _attention


_attention = _make_attention(source_key("cpu_rows.py", "cpu_llvm.py"))


def _glu(gate, up, gelu, out):
    """out = act(gate) * up, act silu or gelu (tanh form), over [T, F] (gate/up may be views)."""
    T, F = out.shape
    c = math.sqrt(2.0 / math.pi)
    for t in numba.prange(T):
        for j in range(F):
            g = gate[t, j]
            if gelu:
                a = 0.5 * g * (1.0 + math.tanh(c * (g + 0.044715 * g * g * g)))
            else:
                a = g / (1.0 + math.exp(-g))
            out[t, j] = a * up[t, j]


_RMS, _ROPE, _ATTN, _GLU = _both(_rms_norm), _both(_rope), _both(_attention), _both(_glu)


def rms_norm(x, w, eps, res, out, s_out):
    _RMS[x.size >= PARALLEL_MIN_WORK](x, w, eps, res, out, s_out)


def rope(x, cos, sin, positions, dim, neox, out):
    _ROPE[x.size >= PARALLEL_MIN_WORK](x, cos, sin, positions, dim, neox, out)


def attention(q, kc, vc, f16, ks, vs, tokens, tok_seq, positions, ctx_lens, tables, bs, scale, window, sinks,
              softcap, out, work):
    """work: about the multiply-adds of the call (picks the serial or the parallel compile)."""
    _ATTN[work >= PARALLEL_MIN_WORK](q, kc, vc, f16, ks, vs, tokens, tok_seq, positions, ctx_lens, tables, bs, scale,
                                     window, sinks, softcap, out)


def glu(gate, up, gelu, out):
    _GLU[out.size >= PARALLEL_MIN_WORK](gate, up, gelu, out)
