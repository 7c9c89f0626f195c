"""The CPU backend: weights stay in their GGUF format, products run on the quantized blocks.

What it keeps resident is the file's own bytes, copied once out of the GGUF memory map (packed
matrices, Q/K/V and gate/up, as one copy of their parts), after which the map's pages are given
back as loading goes (`release_map`). Copies rather than views of the map: a page fault on a
mapped file maps the page cache's whole folio around it (large folios: up to megabytes), so views
of a few tensors kept nearly the whole file resident beside the packed copies (BENCHMARKS.md);
copied, resident memory is the file's size plus the KV cache pages in use. Matmuls and embedding lookups
run in cpu_kernels (numba, on the quantized blocks, multithreaded); norms, rope, glu and decode
attention in cpu_ops (numba, one call per op); the attention of long prompt chunks in NumPy (BLAS
products, chunked). The KV cache is float16 (default), Q8_0 or float32 (the load's kv_cache_type), sized by the
loader from the context and sequences asked for. The NumPy backend stays as the float32
reference these are checked against.
"""
from __future__ import annotations

import mmap
import os

import numpy as np
import threadpoolctl

from .. import quants
from ..gguf_scan import drop_pages
from ..tuning import Tuning
from . import cpu_kernels as K
from . import cpu_ops as ops
from .base import KVLayout, RopeSpec, StepMeta
from .numpy_backend import NumpyBackend, rope_angles

# A sequence with at least this many query tokens in a step takes the BLAS attention path (a
# prompt chunk); fewer (decode, short chunks) the fused numba kernel.
BLAS_ATTN_TOKENS = 16
# Query rows per BLAS attention block: bounds its scores to rows x context x heads floats.
ATTN_BLOCK = 256
# The attention's products are small: OpenBLAS's threads, spinning against numba's for the same
# cores, made them tens of times slower on a busy 2-core machine than one BLAS thread.
_BLAS = threadpoolctl.ThreadpoolController()


def _threading(layer: str, spin: int) -> None:
    """Picks numba's threading layer and libgomp's spin count (an explicit GOMP_SPINCOUNT wins);
    they take effect only before the process's first parallel call, so a later backend with
    other choices keeps the first one's (numba has one pool)."""
    import numba

    numba.config.THREADING_LAYER = layer
    os.environ.setdefault("GOMP_SPINCOUNT", str(max(0, int(spin))))


#: bytes copied out of the file map between two releases of the pages they came from
COPY_CHUNK = 16 << 20


def _copy_out(raw) -> np.ndarray:
    """A flat uint8 copy of raw's bytes. Where raw is a view of the file map, the map's pages are
    given back chunk by chunk, so a large tensor (Gemma 3's 178 MB embedding) is not resident
    twice, as pages and as the copy, at the end of its copy."""
    mm = getattr(raw, "_mmap", None)  # np.memmap views carry the map
    src = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    out = np.empty(src.size, np.uint8)
    base = None
    if isinstance(mm, mmap.mmap) and np.may_share_memory(src, raw):
        view = np.frombuffer(mm, np.uint8)
        base = view.ctypes.data
        del view
    for i in range(0, src.size, COPY_CHUNK):
        j = min(src.size, i + COPY_CHUNK)
        out[i:j] = src[i:j]
        if base is not None and not drop_pages(mm, src.ctypes.data + i - base, j - i):
            base = None
    return out


class CpuKV:
    """The paged cache, [layer, slot, kv head, dim]. f16 is held as uint16 bits (numba has no
    half type); q8_0 as int8 levels with a float16 scale (uint16 bits) per 32 values of a row,
    [layer, slot, kv head, dim / 32]: GGML's Q8_0 of each 32 values turned by a Walsh-Hadamard
    transform (cpu_ops.wht32)."""

    def __init__(self, layout: KVLayout, kind: str):
        slots = layout.num_blocks * layout.block_size
        dt = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}[kind]
        self.layout, self.kind = layout, kind
        # True or None, as the kernels' f16 argument takes it (cpu_ops)
        self.f16 = True if kind == "f16" else None
        shape = (layout.n_layers, slots, layout.n_kv_heads)
        self.k = np.zeros(shape + (layout.head_dim_k,), dt)
        self.v = np.zeros(shape + (layout.head_dim_v,), dt)
        # the scales, or None (the kernels' argument: numba compiles the branch it takes)
        self.ks = self.vs = None
        if kind == "q8_0":
            self.ks = np.zeros(shape + (layout.head_dim_k // 32,), np.uint16)
            self.vs = np.zeros(shape + (layout.head_dim_v // 32,), np.uint16)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.k, self.v, self.ks, self.vs) if a is not None))

    def scales(self, layer: int):
        """(k scales, v scales) of `layer`, or (None, None)."""
        return (None, None) if self.ks is None else (self.ks[layer], self.vs[layer])

    def keys_f32(self, layer: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, v = self.k[layer, slots], self.v[layer, slots]
        if self.kind == "f16":
            return k.view(np.float16).astype(np.float32), v.view(np.float16).astype(np.float32)
        if self.kind == "q8_0":
            return (_q8_f32(k, self.ks[layer, slots]), _q8_f32(v, self.vs[layer, slots]))
        return k, v


def _hadamard32() -> np.ndarray:
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < 32:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(32)).astype(np.float32)


_H32 = _hadamard32()  # cpu_ops.wht32 as a matrix (symmetric: its own inverse)


def _q8_f32(levels: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [..., d] of a Q8_0 cache's rows: levels [..., d] int8 times each 32's scale
    [..., d / 32], turned back by the Walsh-Hadamard transform the store applied."""
    d = scales.view(np.float16).astype(np.float32)
    blocks = levels.reshape(levels.shape[:-1] + (-1, 32)) * d[..., None]
    return (blocks @ _H32).reshape(levels.shape)


class CpuStep(StepMeta):
    """A step's meta plus what the ops derive from it once: each token's sequence, and which
    tokens the numba attention takes (the others' sequences go the BLAS way)."""

    def __init__(self, meta: StepMeta):
        self.__dict__.update(meta.__dict__)
        starts = np.asarray(self.q_starts)
        counts = np.diff(starts)
        self.tok_seq = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        long = counts >= BLAS_ATTN_TOKENS
        self.long_seqs = np.nonzero(long)[0]
        self.short_tokens = np.nonzero(~long[self.tok_seq])[0].astype(np.int32) if long.any() \
            else np.arange(len(self.tok_seq), dtype=np.int32)
        self.positions = np.ascontiguousarray(self.positions, np.int32)
        self.slot_mapping = np.ascontiguousarray(self.slot_mapping, np.int32)
        self.block_tables = np.ascontiguousarray(self.block_tables, np.int32)
        self.ctx_lens = np.ascontiguousarray(self.ctx_lens, np.int32)
        self.max_ctx = int(self.ctx_lens.max()) if len(self.ctx_lens) else 0
        self.max_pos = int(self.positions.max()) if len(self.positions) else 0  # the rope tables' reach


class CpuBackend(NumpyBackend):
    name = "cpu"
    kv_types = ("f16", "q8_0", "f32")
    kv_type = "f16"
    widen_packs = False

    def __init__(self, max_ram: int | None = None, tuning: Tuning | None = None, kv_type: str = "f16"):
        super().__init__(max_ram)
        if kv_type not in self.kv_types:
            raise ValueError(f"kv_type {kv_type!r}: not one of {self.kv_types}")
        self.kv_type = kv_type
        tuning = tuning or Tuning.from_env()
        _threading(tuning.cpu_threading, tuning.cpu_spin)
        self._rope: dict[int, tuple[RopeSpec, np.ndarray, np.ndarray]] = {}
        self._no_sinks = np.zeros(0, np.float32)

    # ---- memory -------------------------------------------------------------------------
    @staticmethod
    def _quantized(qtype, shape) -> bool:
        """Whether the weight stays in its storage format for the kernels. F32 tensors stay
        arrays (views of the map): norms, biases ([E, F] for experts), and F32 matrices, which
        NumPy's BLAS multiplies as well as anything."""
        return len(shape) >= 2 and int(qtype) != int(quants.T.F32) and K.supported(qtype)

    def before_weights(self) -> None:
        # numba's target started and LLVM's code paged out before the weights arrive (peak RSS)
        K.start_and_page_out_compiler()

    def load_weight(self, name, raw, qtype, shape):
        shape = tuple(int(s) for s in shape)
        if not self._quantized(qtype, shape):
            # F32 as it is in the file; F16/BF16 vectors and types the kernels lack decoded
            return np.array(quants.dequantize(raw, qtype, shape), np.float32, copy=True)
        data = _copy_out(raw)
        rows = int(np.prod(shape[:-1]))
        data = data.reshape(rows, -1)
        if len(shape) == 2:
            return K.QWeight(data, qtype, shape)
        per = shape[-2]  # experts: one weight per expert, views of the same bytes
        return [K.QWeight(data[e * per:(e + 1) * per], qtype, shape[-2:]) for e in range(rows // per)]

    def weight_nbytes(self, qtype, shape, raw_nbytes):
        if self._quantized(qtype, shape):
            return int(raw_nbytes)
        return int(np.prod(shape)) * 4

    def release_map(self, model) -> None:
        """Gives back the map's pages that loading read: every weight is a copy, so nothing maps
        them in again (metadata reads touch a few pages). Called as loading goes, so that the
        copies and the pages they came from are never all resident together (peak RSS)."""
        mm = getattr(getattr(model, "data", None), "_mmap", None)
        if mm is not None:
            drop_pages(mm, 0, len(mm))

    def alloc_kv(self, layout):
        return CpuKV(layout, self.kv_type)

    def step_bytes(self, hp, max_sequences: int, context_length: int, largest_weight: int = 0) -> int:
        """Peak host bytes of one step beyond weights and KV: a CPU_STEP_TOKENS chunk's float32
        activations (two layers' worth alive), one ATTN_BLOCK of BLAS attention scores against
        the whole context (scores, probabilities, mask) plus the chunk's keys and values in
        float32, the sampled rows' logits, and a product's x rounded to 16 bits (int16 levels,
        a scale per 32 values and sums per 16: 2.375 bytes a value) for the widest input."""
        from ..admission import CPU_STEP_TOKENS

        t = min(CPU_STEP_TOKENS, max(1, context_length))
        ctx = max(1, context_length)
        attn = 2 * (hp.n_heads * hp.head_dim + hp.n_kv_heads * (hp.head_dim + hp.head_dim_v))
        per_token = 4 * (6 * hp.d_model + attn + 3 * max(1, hp.d_ff))
        scores = 3 * 4 * hp.n_heads * min(t, ATTN_BLOCK) * ctx
        kv = 4 * ctx * hp.n_kv_heads * (hp.head_dim + hp.head_dim_v)
        logits = 2 * 4 * hp.vocab_size * max(1, max_sequences)
        x16 = (t + 8) * max(hp.d_model, hp.d_ff, hp.n_heads * hp.head_dim_v) * 19 // 8  # +8: the 8-row padding
        return 2 * per_token * t + scores + kv + logits + x16

    def begin_step(self, meta: StepMeta):
        return CpuStep(meta)

    # ---- ops ----------------------------------------------------------------------------
    def embed(self, w, ctx):
        if isinstance(w, K.QWeight):
            return K.embed_rows(w, np.asarray(ctx.token_ids, np.int64))
        return w[ctx.token_ids]

    def linear(self, x, w, bias=None):
        x = np.ascontiguousarray(x, np.float32)
        y = K.matmul(x, w) if isinstance(w, K.QWeight) else x @ w.T
        if bias is not None:
            y += bias
        return y

    def rms_norm(self, x, w, eps, residual=None):
        shape = x.shape
        x2 = np.ascontiguousarray(x, np.float32).reshape(-1, shape[-1])
        out = np.empty_like(x2)
        if residual is None:
            ops.rms_norm(x2, w, np.float32(eps), x2[:0], out, x2[:0])
            return out.reshape(shape), x
        s = np.empty_like(x2)
        ops.rms_norm(x2, w, np.float32(eps), np.ascontiguousarray(residual, np.float32).reshape(x2.shape), out, s)
        return out.reshape(shape), s.reshape(shape)

    def _tables(self, spec: RopeSpec, upto: int) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin rows for positions [0, upto) (float64 math, as the reference), grown by doubling."""
        have = self._rope.get(id(spec))
        if have is None or have[1].shape[0] < upto or have[0] is not spec:
            n = max(256, 1 << (int(upto) - 1).bit_length())
            cos, sin = rope_angles(np.arange(n), spec)
            have = self._rope[id(spec)] = (spec, np.ascontiguousarray(cos), np.ascontiguousarray(sin))
        return have[1], have[2]

    def rope(self, x, ctx, spec):
        cos, sin = self._tables(spec, ctx.max_pos + 1)
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty_like(x)
        ops.rope(x, cos, sin, ctx.positions, spec.dim, spec.neox, out)
        return out

    def qkv_rope_store(self, qkv, kv: CpuKV, layer, ctx, spec, n_heads, n_kv_heads, head_dim, head_dim_v):
        cos, sin = self._tables(spec, ctx.max_pos + 1)
        T = qkv.shape[0]
        q = np.empty((T, n_heads, head_dim), np.float32)
        tmp = np.empty(head_dim, np.float32)
        ks, vs = kv.scales(layer)
        ops.qkv_rope_store(np.ascontiguousarray(qkv, np.float32), cos, sin, ctx.positions, spec.dim, spec.neox,
                           ctx.slot_mapping, kv.k[layer], kv.v[layer], kv.f16, ks, vs, n_heads, n_kv_heads,
                           head_dim, head_dim_v, q, tmp)
        return q

    def store_kv(self, k, v, kv: CpuKV, layer, ctx):
        ks, vs = kv.scales(layer)
        ops.store_kv(np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32), ctx.slot_mapping,
                     kv.k[layer], kv.v[layer], kv.f16, ks, vs)

    def attention(self, q, k, v, kv: CpuKV, layer, ctx, *, scale, window=0, sinks=None, softcap=0.0):
        if k is not None:
            self.store_kv(k, v, kv, layer, ctx)
        T, hq, _ = q.shape
        dv = kv.layout.head_dim_v
        q = np.ascontiguousarray(q, np.float32)
        out = np.empty((T, hq, dv), np.float32)
        sk = self._no_sinks if sinks is None else np.ascontiguousarray(sinks, np.float32)
        if len(ctx.short_tokens):
            work = len(ctx.short_tokens) * hq * ctx.max_ctx * (q.shape[2] + dv)
            ks, vs = kv.scales(layer)
            ops.attention(q, kv.k[layer], kv.v[layer], kv.f16, ks, vs, ctx.short_tokens, ctx.tok_seq, ctx.positions,
                          ctx.ctx_lens, ctx.block_tables, ctx.block_size, np.float32(scale), int(window), sk,
                          np.float32(softcap), out, work)
        if len(ctx.long_seqs):
            with _BLAS.limit(limits=1, user_api="blas"):
                for b in ctx.long_seqs:
                    self._attention_blas(q, kv, layer, ctx, int(b), out, scale, window, sinks, softcap)
        return out.reshape(T, hq * dv)

    def _attention_blas(self, q, kv: CpuKV, layer, ctx, b, out, scale, window, sinks, softcap):
        """One sequence's chunk of many query tokens: BLAS products per kv head, ATTN_BLOCK query
        rows at a time, each block's scores over the keys it can see."""
        hq, hkv = q.shape[1], kv.layout.n_kv_heads
        group, bs = hq // hkv, ctx.block_size
        s0, s1 = int(ctx.q_starts[b]), int(ctx.q_starts[b + 1])
        n_ctx = int(ctx.ctx_lens[b])
        pos = np.arange(n_ctx)
        keys, vals = kv.keys_f32(layer, ctx.block_tables[b][pos // bs] * bs + pos % bs)
        kt = keys.transpose(1, 2, 0)                     # [hkv, dk, n]
        vt = vals.transpose(1, 0, 2)                     # [hkv, n, dv]
        sk = None if sinks is None else np.asarray(sinks, np.float32).reshape(hkv, group, 1, 1)
        for a0 in range(s0, s1, ATTN_BLOCK):
            a1 = min(s1, a0 + ATTN_BLOCK)
            qpos = ctx.positions[a0:a1]
            n = min(n_ctx, int(qpos.max()) + 1)
            lo = max(0, int(qpos.min()) - window + 1) if window > 0 else 0
            t = a1 - a0
            qb = q[a0:a1].reshape(t, hkv, group, -1).transpose(1, 2, 0, 3).reshape(hkv, group * t, -1)
            scores = np.matmul(qb, kt[:, :, lo:n]).reshape(hkv, group, t, n - lo)
            scores *= np.float32(scale)
            if softcap > 0:
                scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
            kp = pos[lo:n]
            hidden = kp[None, :] > qpos[:, None]
            if window > 0:
                hidden |= kp[None, :] <= (qpos[:, None] - window)
            scores[:, :, hidden] = -np.inf
            m = scores.max(axis=-1, keepdims=True)
            if sk is not None:
                m = np.maximum(m, sk)
            scores -= m
            np.exp(scores, out=scores)
            denom = scores.sum(axis=-1, keepdims=True)
            if sk is not None:
                denom += np.exp(sk - m)
            scores /= denom
            o = np.matmul(scores.reshape(hkv, group * t, n - lo), vt[:, lo:n])  # [hkv, g*t, dv]
            out[a0:a1] = o.reshape(hkv, group, t, -1).transpose(2, 0, 1, 3).reshape(t, hq, -1)

    def glu_fused(self, x, act="silu"):
        f = x.shape[-1] // 2
        out = np.empty((x.shape[0], f), np.float32)
        ops.glu(x[:, :f], x[:, f:], act != "silu", out)
        return out

    def silu_mul(self, gate, up):
        out = np.empty(gate.shape, np.float32)
        ops.glu(gate, up, False, out)
        return out

    def gelu_mul(self, gate, up):
        out = np.empty(gate.shape, np.float32)
        ops.glu(gate, up, True, out)
        return out

    def moe(self, x, router_logits, k, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, *,
            act="silu", alpha=1.702, limit=7.0):
        return self._moe(x, router_logits, k, w_gate, w_up, w_down, b_gate, b_up, b_down, act, alpha, limit)

    def _moe(self, x, router_logits, k, w_gate, w_up, w_down, b_gate, b_up, b_down, act, alpha, limit):
        T = x.shape[0]
        ids = np.argsort(-router_logits, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(router_logits, ids, axis=-1)
        p = np.exp(top - top.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out = np.zeros((T, self._rows(w_down)), np.float32)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            xe = np.ascontiguousarray(x[rows])
            g = self.linear(xe, w_gate[e], None if b_gate is None else b_gate[e])
            u = self.linear(xe, w_up[e], None if b_up is None else b_up[e])
            if act == "swiglu_oai":
                g = np.minimum(g, np.float32(limit))
                u = np.clip(u, -np.float32(limit), np.float32(limit))
                a = g / (1.0 + np.exp(-np.float32(alpha) * g)) * (u + 1.0)
            elif act == "silu":
                a = self.silu_mul(g, u)
            else:
                raise ValueError(f"unknown moe activation {act!r}")
            y = self.linear(a.astype(np.float32), w_down[e], None if b_down is None else b_down[e])
            np.add.at(out, rows, y * p[rows, slot][:, None])
        return out

    @staticmethod
    def _rows(w) -> int:
        return w[0].shape[0] if isinstance(w, list) else w.shape[1]
