"""The reference backend: every op in float32 NumPy on the CPU.

It is what the CPU backend's and every CUDA kernel's numerics are checked against (`--backend
numpy`), so it favours obviousness over speed: weights are dequantized once at load, attention gathers each
sequence's keys from the paged cache and does a plain softmax.
"""
from __future__ import annotations

import math

import numpy as np

from .. import quants
from .base import Backend, KVLayout, RopeSpec, StepMeta


class NumpyKV:
    def __init__(self, layout: KVLayout):
        slots = layout.num_blocks * layout.block_size
        self.layout = layout
        self.k = np.zeros((layout.n_layers, slots, layout.n_kv_heads, layout.head_dim_k), np.float32)
        self.v = np.zeros((layout.n_layers, slots, layout.n_kv_heads, layout.head_dim_v), np.float32)


def rope_angles(positions: np.ndarray, spec: RopeSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [T, dim/2] (float64 math, returned as float32)."""
    half = spec.dim // 2
    inv_freq = spec.base ** (-np.arange(0, half, dtype=np.float64) * 2.0 / spec.dim)
    if spec.freq_factors is not None:
        inv_freq = inv_freq / np.asarray(spec.freq_factors, np.float64)[:half]
    mscale = spec.attn_factor
    if spec.yarn is not None:
        y = spec.yarn
        # Per-dimension mix between interpolation (theta / factor) and extrapolation (theta),
        # ramped over the dims whose rotations per original context fall between beta_slow/fast.
        def corr_dim(n_rot: float) -> float:
            return spec.dim * math.log(y.orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(spec.base))
        low, high = corr_dim(y.beta_fast), corr_dim(y.beta_slow)
        if y.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(0.0, low), min(spec.dim - 1.0, high)
        ramp = (np.arange(half, dtype=np.float64) - low) / max(0.001, high - low)
        ramp_mix = (1.0 - np.clip(ramp, 0.0, 1.0)) * y.ext_factor
        interp = inv_freq / y.factor
        inv_freq = interp * (1 - ramp_mix) + inv_freq * ramp_mix
        mscale *= y.attn_factor
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return (np.cos(ang) * mscale).astype(np.float32), (np.sin(ang) * mscale).astype(np.float32)


class NumpyBackend(Backend):
    name = "numpy"
    kv_types = ("f32",)
    host_memory = True
    memory_name = "RAM (--max-ram)"

    def __init__(self, max_ram: int | None = None):
        # bytes a load may plan for (backends.factory.make_backend: --max-ram and the machine's available
        # memory); None: unbounded, as for a backend made directly
        self.max_ram = None if max_ram is None else int(max_ram)

    def memory_available(self):
        return self.max_ram

    def load_weight(self, name, raw, qtype, shape):
        w = quants.dequantize(raw, qtype, shape)
        if w.ndim == 2:
            # Column-major storage makes `x @ w.T` a product with a C-contiguous matrix, which
            # OpenBLAS runs several times faster than with a transposed view.
            w = np.asfortranarray(w)
        return w

    def weight_nbytes(self, qtype, shape, raw_nbytes):
        return int(np.prod(shape)) * 4

    def from_host(self, array):
        return np.ascontiguousarray(array, dtype=np.float32)

    def to_host(self, x):
        return np.asarray(x)

    def alloc_kv(self, layout):
        return NumpyKV(layout)

    # ---- ops ----------------------------------------------------------------------------
    def embed(self, w, ctx: StepMeta):
        return w[ctx.token_ids]

    def linear(self, x, w, bias=None):
        y = x @ w.T
        return y + bias if bias is not None else y

    def rms_norm(self, x, w, eps, residual=None):
        s = x if residual is None else x + residual
        ms = np.mean(np.square(s, dtype=np.float32), axis=-1, keepdims=True)
        return (s / np.sqrt(ms + eps)) * w, s

    def rope(self, x, ctx: StepMeta, spec: RopeSpec):
        cos, sin = rope_angles(ctx.positions, spec)
        cos, sin = cos[:, None, :], sin[:, None, :]
        out = x.copy()
        d = spec.dim
        if spec.neox:
            a, b = x[..., : d // 2], x[..., d // 2: d]
            out[..., : d // 2] = a * cos - b * sin
            out[..., d // 2: d] = a * sin + b * cos
        else:
            a, b = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2] = a * cos - b * sin
            out[..., 1:d:2] = a * sin + b * cos
        return out

    def store_kv(self, k, v, kv: NumpyKV, layer, ctx: StepMeta):
        keep = np.asarray(ctx.slot_mapping) >= 0
        kv.k[layer, ctx.slot_mapping[keep]] = k[keep]
        kv.v[layer, ctx.slot_mapping[keep]] = v[keep]

    def copy_kv_blocks(self, kv: NumpyKV, pairs):
        bs = kv.layout.block_size
        for src, dst in pairs:
            kv.k[:, dst * bs:(dst + 1) * bs] = kv.k[:, src * bs:(src + 1) * bs]
            kv.v[:, dst * bs:(dst + 1) * bs] = kv.v[:, src * bs:(src + 1) * bs]

    def attention(self, q, k, v, kv: NumpyKV, layer, ctx: StepMeta, *, scale, window=0, sinks=None, softcap=0.0):
        if k is not None:
            self.store_kv(k, v, kv, layer, ctx)
        T, hq, _ = q.shape
        hkv, dv = kv.layout.n_kv_heads, kv.layout.head_dim_v
        group = hq // hkv
        bs = ctx.block_size
        out = np.empty((T, hq, dv), np.float32)
        for b in range(ctx.num_seqs):
            s0, s1 = int(ctx.q_starts[b]), int(ctx.q_starts[b + 1])
            if s1 == s0:
                continue
            n_ctx = int(ctx.ctx_lens[b])
            pos = np.arange(n_ctx)
            slots = ctx.block_tables[b][pos // bs] * bs + pos % bs
            keys = kv.k[layer, slots]            # [n_ctx, hkv, dk]
            vals = kv.v[layer, slots]            # [n_ctx, hkv, dv]
            qb = q[s0:s1].reshape(s1 - s0, hkv, group, -1)
            scores = np.einsum("thgd,nhd->hgtn", qb, keys) * scale
            if softcap > 0:
                scores = softcap * np.tanh(scores / softcap)
            qpos = ctx.positions[s0:s1]
            visible = pos[None, :] <= qpos[:, None]
            if window > 0:
                visible &= pos[None, :] > (qpos[:, None] - window)
            scores = np.where(visible[None, None], scores, -np.inf)
            m = scores.max(axis=-1, keepdims=True)
            if sinks is not None:
                sk = np.asarray(sinks, np.float32).reshape(hkv, group)[:, :, None, None]
                m = np.maximum(m, sk)
            p = np.exp(scores - m)
            denom = p.sum(axis=-1, keepdims=True)
            if sinks is not None:
                denom = denom + np.exp(sk - m)
            p /= denom
            ob = np.einsum("hgtn,nhd->thgd", p, vals)
            out[s0:s1] = ob.reshape(s1 - s0, hq, dv)
        return out.reshape(T, hq * dv)

    def silu_mul(self, gate, up):
        return gate / (1.0 + np.exp(-gate)) * up

    def gelu_mul(self, gate, up):
        g = 0.5 * gate * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (gate + np.float32(0.044715) * gate ** 3)))
        return g * up

    def add(self, a, b):
        return a + b

    def scale(self, x, s):
        return x * np.float32(s)

    def gather_rows(self, x, ctx: StepMeta):
        return x[ctx.logits_rows]

    def moe(self, x, router_logits, k, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, *,
            act="silu", alpha=1.702, limit=7.0):
        T = x.shape[0]
        # stable argsort on -logits: the largest first, ties to the lower expert index
        ids = np.argsort(-router_logits, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(router_logits, ids, axis=-1)
        p = np.exp(top - top.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out = np.zeros((T, w_down.shape[1]), np.float32)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            xe = x[rows]
            g = xe @ w_gate[e].T
            u = xe @ w_up[e].T
            if b_gate is not None:
                g = g + b_gate[e]
            if b_up is not None:
                u = u + b_up[e]
            if act == "swiglu_oai":
                g = np.minimum(g, np.float32(limit))
                u = np.clip(u, -np.float32(limit), np.float32(limit))
                a = g / (1.0 + np.exp(-np.float32(alpha) * g)) * (u + 1.0)
            elif act == "silu":
                a = g / (1.0 + np.exp(-g)) * u
            else:
                raise ValueError(f"unknown moe activation {act!r}")
            y = a @ w_down[e].T
            if b_down is not None:
                y = y + b_down[e]
            np.add.at(out, rows, y * p[rows, slot][:, None])
        return out

    def split(self, x, sizes):
        return np.split(x, np.cumsum(sizes)[:-1], axis=-1)
