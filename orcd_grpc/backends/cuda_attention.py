"""Rope, the paged KV cache (f16 or Q8_0) and attention on the CUDA backend, and how decode
attention is split.

Decode steps (one query token per sequence) cannot fill the GPU with a CTA per (sequence, kv
head), so the keys are cut into slices whose partials are merged (flash-decoding). The slice
count depends only on the batch shape and the device's SM count, never on context lengths, so a
captured graph stays valid as contexts grow.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgument
from .base import KVLayout, RopeSpec
from .cuda_context import DeviceLimits
from .cuda_step import CudaStep

if TYPE_CHECKING:
    from .cuda import CudaBackend

_ATTN_DPL = (1, 2, 3, 4, 5, 6, 8)  # attn_d<DPL>_b variants in attention.cu: head dims up to 32 * DPL
_ATTN_MAX_SPLITS = 256  # merge_split_row's MAX_SPLITS (weights of a row's splits in shared memory)
_ATTN_COUNTERS = 1 << 16  # (sequence, kv head) pairs attn_dec can merge in-kernel (256 KiB of counters)


def tiled_target_ctas(limits: DeviceLimits) -> int:
    """attn_dN CTAs a split decode launch aims at: two per SM (264 on an H100) use its bandwidth."""
    return 2 * limits.sms


def dec_target_ctas(limits: DeviceLimits) -> int:
    """attn_dec CTAs (4 warps each) a split decode launch aims at: four per SM."""
    return 4 * limits.sms


def _key_splits(target_ctas: int, pairs: int, most: int = _ATTN_MAX_SPLITS) -> int:
    """Key slices per (sequence, kv head) for a decode step: enough CTAs to reach target_ctas, at
    most `most`. A function of the batch shape only, so a captured graph stays valid as contexts grow."""
    return max(1, min(most, _ATTN_MAX_SPLITS, -(-target_ctas // pairs)))


def rope_inv_freq(spec: RopeSpec) -> tuple[np.ndarray, float]:
    """float64 inverse frequencies [dim/2] with freq factors and the YaRN mix folded in, and the
    factor on cos/sin; the same math as the NumPy reference's rope_angles."""
    half = spec.dim // 2
    inv_freq = spec.base ** (-np.arange(0, half, dtype=np.float64) * 2.0 / spec.dim)
    if spec.freq_factors is not None:
        inv_freq = inv_freq / np.asarray(spec.freq_factors, np.float64).ravel()[:half]
    mscale = float(spec.attn_factor)
    if spec.yarn is not None:
        y = spec.yarn

        def corr_dim(n_rot: float) -> float:
            return spec.dim * math.log(y.orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(spec.base))

        low, high = corr_dim(y.beta_fast), corr_dim(y.beta_slow)
        if getattr(y, "truncate", True):  # llama.cpp floors/ceils the ramp ends; gpt-oss does not
            low, high = math.floor(low), math.ceil(high)
        low, high = max(0.0, low), min(spec.dim - 1.0, high)
        ramp = (np.arange(half, dtype=np.float64) - low) / max(0.001, high - low)
        ramp_mix = (1.0 - np.clip(ramp, 0.0, 1.0)) * y.ext_factor
        inv_freq = inv_freq / y.factor * (1 - ramp_mix) + inv_freq * ramp_mix
        mscale *= y.attn_factor
    return inv_freq, mscale


class CudaKV:
    """Paged cache in one allocation: K [L, slots, Hkv, Dk] then V [L, slots, Hkv, Dv], f16 or
    (kind "q8_0") int8 levels, followed for q8_0 by their half scales, K [L, slots, Hkv, Dk / 32]
    then V [L, slots, Hkv, Dv / 32] (attention.cu says how the blocks are turned)."""

    def __init__(self, backend: "CudaBackend", layout: KVLayout, kind: str = "f16"):
        if kind == "q8_0" and (layout.head_dim_k % 32 or layout.head_dim_v % 32):
            raise InvalidArgument(f"q8_0 needs head dimensions in blocks of 32, not {layout.head_dim_k}/"
                                  f"{layout.head_dim_v}", field="kv_cache_type")
        self.layout, self.kind = layout, kind
        slots = layout.num_blocks * layout.block_size
        width = 1 if kind == "q8_0" else 2
        self.k_layer = slots * layout.n_kv_heads * layout.head_dim_k * width
        self.v_layer = slots * layout.n_kv_heads * layout.head_dim_v * width
        scales = 2 * (self.k_layer + self.v_layer) // 32 if kind == "q8_0" else 0  # a half per 32 levels
        self.buf = backend._persistent(layout.n_layers * (self.k_layer + self.v_layer + scales), "KV cache")
        self.k_base = self.buf.ptr
        self.v_base = self.buf.ptr + layout.n_layers * self.k_layer
        self.ks_base = self.v_base + layout.n_layers * self.v_layer  # q8_0's scales (else unused)
        self.vs_base = self.ks_base + layout.n_layers * self.k_layer // 16

    @property
    def q8(self) -> bool:
        return self.kind == "q8_0"

    def k_ptr(self, layer: int) -> int:
        return self.k_base + layer * self.k_layer

    def v_ptr(self, layer: int) -> int:
        return self.v_base + layer * self.v_layer

    def scale_ptrs(self, layer: int) -> tuple[int, int]:
        """q8_0: (K scales, V scales) of `layer`."""
        return self.ks_base + layer * self.k_layer // 16, self.vs_base + layer * self.v_layer // 16

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes


class AttentionMixin:
    """CudaBackend's rope, KV store and attention ops (state set up in CudaBackend._init)."""

    def _rope_table(self, spec: RopeSpec):
        hit = self._rope_cache.get(id(spec))
        if hit is not None and hit[0] is spec:
            return hit[1], hit[2]
        inv_freq, mscale = rope_inv_freq(spec)
        arr = np.ascontiguousarray(inv_freq, np.float64)
        buf = self._persistent(arr.nbytes, "rope table")
        self._drv.memcpy_htod(buf.ptr, arr)
        self._rope_cache[id(spec)] = (spec, buf, float(mscale))  # holding spec keeps its id unique
        return buf, float(mscale)

    def rope(self, x, ctx: CudaStep, spec: RopeSpec):
        T, H, D = x.shape
        buf, mscale = self._rope_table(spec)
        y = self._out(x.shape)
        rot = int(spec.dim)
        total = T * H * (D - rot // 2)
        k = self._k("rope", "rope_f32", "PPPPiiiiif")
        self._launch(k, (max(1, -(-total // 256)), 1, 1), (256, 1, 1), x.ptr, y.ptr, ctx.positions, buf.ptr,
                     np.int32(T), np.int32(H), np.int32(D), np.int32(rot), np.int32(1 if spec.neox else 0),
                     np.float32(mscale))
        return y

    def rope_pair(self, q, k, ctx: CudaStep, spec: RopeSpec):
        T, Hq, D = q.shape
        Hk = k.shape[1]
        if k.shape[0] != T or k.shape[2] != D:
            return self.rope(q, ctx, spec), self.rope(k, ctx, spec)
        buf, mscale = self._rope_table(spec)
        yq, yk = self._out(q.shape), self._out(k.shape)
        rot = int(spec.dim)
        total = T * (Hq + Hk) * (D - rot // 2)
        kern = self._k("rope", "rope_pair_f32", "PPPPPPiiiiiif")
        self._launch(kern, (max(1, -(-total // 256)), 1, 1), (256, 1, 1), q.ptr, yq.ptr, k.ptr, yk.ptr,
                     ctx.positions, buf.ptr, np.int32(T), np.int32(Hq), np.int32(Hk), np.int32(D), np.int32(rot),
                     np.int32(1 if spec.neox else 0), np.float32(mscale))
        return yq, yk

    def store_kv(self, k, v, kv: CudaKV, layer, ctx: CudaStep):
        T, Hkv, Dk = k.shape
        Dv = v.shape[2]
        if T and kv.q8:
            kst = self._k("attention", "kv_store_q8", "PPPPPPPiiii")
            warps = Hkv * (Dk + Dv) // 32  # a warp per 32 values
            self._launch(kst, (max(1, min(-(-warps // 8), 64)), T, 1), (256, 1, 1), k.ptr, v.ptr, ctx.slot_mapping,
                         kv.k_ptr(layer), kv.v_ptr(layer), *kv.scale_ptrs(layer), np.int32(T), np.int32(Hkv),
                         np.int32(Dk), np.int32(Dv))
        elif T:
            kst = self._k("attention", "kv_store_f16", "PPPPPiiii")
            per = Hkv * (Dk + Dv)
            self._launch(kst, (max(1, min(-(-per // 256), 64)), T, 1), (256, 1, 1), k.ptr, v.ptr, ctx.slot_mapping,
                         kv.k_ptr(layer), kv.v_ptr(layer), np.int32(T), np.int32(Hkv), np.int32(Dk), np.int32(Dv))

    def copy_kv_blocks(self, kv: CudaKV, pairs):
        """kv_copy_block per pair, queued on the stream: after the step that wrote src, before
        any step that writes dst."""
        L = kv.layout
        if (L.head_dim_k | L.head_dim_v) % 2:
            raise InvalidArgument(f"odd head dims {L.head_dim_k}/{L.head_dim_v}: KV blocks are copied in "
                                  "32-bit words", field="kv_cache")
        # The values, then q8_0's scales (a 16th of the levels' bytes: a whole number of words per
        # block, head dims being multiples of 32): each region's kernel arguments but the pair.
        slots = L.num_blocks * L.block_size
        spans = [(kv.k_base, kv.v_base, kv.k_layer, kv.v_layer)]
        if kv.q8:
            spans.append((kv.ks_base, kv.vs_base, kv.k_layer // 16, kv.v_layer // 16))
        regions = []
        for k_base, v_base, k_layer, v_layer in spans:
            k_words, v_words = k_layer // slots * L.block_size // 4, v_layer // slots * L.block_size // 4
            regions.append(((max(1, min(-(-max(k_words, v_words) // 256), 64)), L.n_layers, 2),
                            (k_base, v_base, np.int64(k_layer // 4), np.int64(v_layer // 4), np.int32(k_words),
                             np.int32(v_words))))
        kern = self._k("attention", "kv_copy_block", "PPqqiiii")
        for src, dst in pairs:
            if not (0 <= src < L.num_blocks and 0 <= dst < L.num_blocks):
                raise InvalidArgument(f"KV block pair ({src}, {dst}) outside the cache's {L.num_blocks} blocks",
                                      field="kv_cache")
            for grid, args in regions:
                self._launch(kern, grid, (256, 1, 1), *args, np.int32(src), np.int32(dst))

    def qkv_rope_store(self, qkv, kv: CudaKV, layer, ctx: CudaStep, spec: RopeSpec, n_heads, n_kv_heads, head_dim,
                       head_dim_v):
        """One kernel: the q part roped into a new tensor, k roped and v stored straight into the
        cache, converted to f16 or turned and rounded to Q8_0 (split + rope + kv store were three
        launches per layer)."""
        T = qkv.shape[0]
        L = kv.layout
        if (not self.tuning.fuse_qkv_rope or qkv.shape[-1] != (n_heads + n_kv_heads) * head_dim + n_kv_heads * head_dim_v
                or (L.n_kv_heads, L.head_dim_k, L.head_dim_v) != (n_kv_heads, head_dim, head_dim_v)):
            return super().qkv_rope_store(qkv, kv, layer, ctx, spec, n_heads, n_kv_heads, head_dim, head_dim_v)
        buf, mscale = self._rope_table(spec)
        q = self._out((T, n_heads, head_dim))
        if T:
            rot = int(spec.dim)
            if kv.q8:  # a warp per 32 values
                per = ((n_heads + n_kv_heads) * head_dim + n_kv_heads * head_dim_v) // 32
                kern = self._k("rope", "qkv_rope_store_q8", "PPPPPPPPPiiiiiiif")
                grid, caches = (max(1, min(-(-per // 8), 64)), T, 1), (kv.k_ptr(layer), kv.v_ptr(layer),
                                                                        *kv.scale_ptrs(layer))
            else:
                per = (n_heads + n_kv_heads) * (head_dim - rot // 2) + n_kv_heads * head_dim_v
                kern = self._k("rope", "qkv_rope_store_f32", "PPPPPPPiiiiiiif")
                grid, caches = (max(1, min(-(-per // 256), 32)), T, 1), (kv.k_ptr(layer), kv.v_ptr(layer))
            self._launch(kern, grid, (256, 1, 1), qkv.ptr, q.ptr, *caches, ctx.positions, ctx.slot_mapping, buf.ptr,
                         np.int32(T), np.int32(n_heads), np.int32(n_kv_heads), np.int32(head_dim),
                         np.int32(head_dim_v), np.int32(rot), np.int32(1 if spec.neox else 0), np.float32(mscale))
        return q

    def attention(self, q, k, v, kv: CudaKV, layer, ctx: CudaStep, *, scale, window=0, sinks=None, softcap=0.0):
        T, Hq, Dk = q.shape
        L = kv.layout
        Hkv, Dv = L.n_kv_heads, L.head_dim_v
        if Dk != L.head_dim_k or (k is not None and k.shape[1:] != (Hkv, Dk)) or Dk % 2 or Dv % 2 or Hq % Hkv:
            raise InvalidArgument(f"attention shapes q{q.shape} k{None if k is None else k.shape} do not fit the "
                                  f"cache ({Hkv} kv heads, dims {L.head_dim_k}/{Dv})", field="attention")
        if k is not None:
            self.store_kv(k, v, kv, layer, ctx)
        out = self._out((T, Hq * Dv))
        if T == 0:
            return out
        group = Hq // Hkv
        if (ctx.max_q == 1 and 0 < self.tuning.attn_dec_mma <= group <= 16 and not kv.q8 and Dk == Dv
                and Dk in (64, 96, 128)):
            return self._decode_attention(q, kv, layer, ctx, out, Hq, Hkv, Dk, Dv, group, scale, window, sinks,
                                          softcap, mma=True)
        # attn_dec_*_n1/_n2 (Dv <= 128) hold Dk <= 64 * ceil(Dv / 64) key dims in their staged tiles
        if (ctx.max_q == 1 and Dk % 8 == 0 and Dk <= 256 and Dv <= 256 and group <= 8
                and (Dv > 128 or Dk <= 64 * -(-Dv // 64))
                and (group <= self.tuning.attn_dec_max_group or ctx.B * Hkv >= self.tuning.attn_dec_min_heads)):
            return self._decode_attention(q, kv, layer, ctx, out, Hq, Hkv, Dk, Dv, group, scale, window, sinks,
                                          softcap)
        if (self.tuning.attn_mma and not kv.q8 and Dk == Dv and Dk in (64, 96, 128)
                and ctx.max_q * group > 32):
            return self._mma_attention(q, kv, layer, ctx, out, Hq, Hkv, Dk, group, scale, window, sinks, softcap)
        dpl_need = -(-max(Dk, Dv) // 32)
        dpl = next((d for d in _ATTN_DPL if d >= dpl_need), None)
        if dpl is None:
            raise InvalidArgument(f"head dim {max(Dk, Dv)} exceeds the attention kernel's 256", field="attention")
        name = f"attn_d{dpl}_q8" if kv.q8 else f"attn_d{dpl}_b"
        kern = self._k("attention", name, "PPPPPPPPPPiiiiiifiPfiP" if kv.q8 else "PPPPPPPPiiiiiifiPfiP")
        smem = 4 * (32 * Dk + 32 * (Dk + 1) + 32 * Dv)
        if smem > 48 * 1024 and (name, smem) not in self._attr_set:
            kern.fn.set_attribute(self._drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            self._attr_set.add((name, smem))
        tiles = max(1, -(-ctx.max_q * group // 32))
        # Decode (one tile of rows per sequence): B * Hkv CTAs cannot fill the GPU, so the keys
        # are split across CTAs and merged by attn_combine (flash-decoding). The split count
        # depends only on the batch shape, so a captured graph stays valid as contexts grow.
        splits = 1
        if tiles == 1:
            splits = _key_splits(tiled_target_ctas(self.limits), ctx.B * Hkv, self._split_cap(ctx))
        part = self._out((T * Hq, splits, Dv + 2)) if splits > 1 else None
        self._launch(kern, (splits if splits > 1 else tiles, ctx.B, Hkv), (256, 1, 1), q.ptr, kv.k_ptr(layer),
                     kv.v_ptr(layer), *self._scale_args(kv, layer), out.ptr, ctx.q_starts, ctx.positions, ctx.ctx_lens, ctx.block_tables,
                     np.int32(ctx.max_blocks), np.int32(ctx.block_size), np.int32(Hq), np.int32(Hkv), np.int32(Dk),
                     np.int32(Dv), np.float32(scale), np.int32(window or 0), sinks.ptr if sinks is not None else 0,
                     np.float32(softcap or 0.0), np.int32(splits), part.ptr if part is not None else 0, shared=smem)
        if part is not None:
            self._combine(part, out, sinks, T * Hq, Hq, Dv, splits)
        return out

    def _split_cap(self, ctx) -> int:
        """The most key slices a decode step's rows may take: tuning.attn_splits, or
        tuning.attn_splits_deep for a deep step (CudaStep.deep: its deepest sequence, or its graph's key)."""
        deep = self.tuning.attn_splits_deep
        return deep if deep and ctx.deep else self.tuning.attn_splits

    def _mma_attention(self, q, kv, layer, ctx, out, Hq, Hkv, D, group, scale, window, sinks, softcap):
        """attn_mma_d<D>: a prefill step's attention on tensor cores, one 4-warp CTA per 64 query rows
        of a (sequence, kv head); no key split (a prefill has rows enough to fill the GPU)."""
        name = f"attn_mma_d{D}"
        kern = self._k("attention_mma", name, "PPPPPPPPiiiifiPf")
        smem = 2 * (64 + 2 * 64) * (D + 8)  # Q, K and V tiles in f16, rows padded by 8
        if smem > 48 * 1024 and (name, smem) not in self._attr_set:
            kern.fn.set_attribute(self._drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            self._attr_set.add((name, smem))
        self._launch(kern, (-(-ctx.max_q * group // 64), ctx.B, Hkv), (128, 1, 1), q.ptr, kv.k_ptr(layer),
                     kv.v_ptr(layer), out.ptr, ctx.q_starts, ctx.positions, ctx.ctx_lens, ctx.block_tables,
                     np.int32(ctx.max_blocks), np.int32(ctx.block_size), np.int32(Hq), np.int32(Hkv),
                     np.float32(scale), np.int32(window or 0), sinks.ptr if sinks is not None else 0,
                     np.float32(softcap or 0.0), shared=smem)
        return out

    @staticmethod
    def _scale_args(kv: CudaKV, layer: int) -> tuple[int, ...]:
        """The *_q8 kernels' scale pointers after the levels' (none for an f16 cache)."""
        return kv.scale_ptrs(layer) if kv.q8 else ()

    def _combine(self, part, out, sinks, rows, Hq, Dv, splits):
        """attn_combine: merges the split-key partials of `rows` (token, q head) rows into out (and
        into out.q8 where the decode step asked for it: _merge_q8)."""
        comb = self._k("attention", "attn_combine", "PPPiiiiPP")
        q8 = (out.q8[0].ptr, out.q8[1].ptr) if out.q8 is not None else (0, 0)
        self._launch(comb, (-(-rows // 8), 1, 1), (256, 1, 1), part.ptr, out.ptr, sinks.ptr if sinks is not None else 0,
                     np.int32(rows), np.int32(Hq), np.int32(Dv), np.int32(splits), *q8)

    def _decode_attention(self, q, kv, layer, ctx, out, Hq, Hkv, Dk, Dv, group, scale, window, sinks, softcap,
                          mma=False):
        """A step of decode tokens only: attn_dec_g<GM>_n<NC> (or with mma, attn_decm_d<D> on tensor
        cores), one 4-warp CTA per (key slice, sequence, kv head). As with attn_dN, the split count
        depends only on the batch shape (graph-safe)."""
        smem = 0
        if mma:
            name = f"attn_decm_d{Dk}"
            kern = self._k("attention_mma", name, "PPPPPPPPiiiiiifiPfiPPPP")
            smem = 2 * (16 + 4 * 2 * 32) * (Dk + 8)  # 16 q rows, each of 4 warps' 32 K and 32 V rows: f16, padded by 8
            if smem > 48 * 1024 and (name, smem) not in self._attr_set:
                kern.fn.set_attribute(self._drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                self._attr_set.add((name, smem))
        else:
            gm = next(g for g in (1, 2, 4, 8) if g >= group)
            kern = self._k("attention_decode", f"attn_dec_g{gm}_n{-(-Dv // 64)}" + ("_q8" if kv.q8 else ""),
                           "PPPPPPPPPPiiiiiifiPfiPPPP" if kv.q8 else "PPPPPPPPiiiiiifiPfiPPPP")
        splits = _key_splits(dec_target_ctas(self.limits), ctx.B * Hkv, self._split_cap(ctx))
        part = self._out((ctx.T * Hq, splits, Dv + 2)) if splits > 1 else None
        counters = 0
        if part is not None and self.tuning.attn_merge and ctx.B * Hkv <= _ATTN_COUNTERS:
            if self._attn_counters is None:  # first decode step: eager, never inside a graph capture
                self._attn_counters = self._persistent(4 * _ATTN_COUNTERS, "attention counters")
                self._drv.memset_d32(self._attn_counters.ptr, 0, _ATTN_COUNTERS)
            counters = self._attn_counters.ptr
        self._launch(kern, (splits, ctx.B, Hkv), (128, 1, 1), q.ptr, kv.k_ptr(layer), kv.v_ptr(layer),
                     *self._scale_args(kv, layer), out.ptr,
                     ctx.q_starts, ctx.positions, ctx.ctx_lens, ctx.block_tables, np.int32(ctx.max_blocks),
                     np.int32(ctx.block_size), np.int32(Hq), np.int32(Hkv), np.int32(Dk), np.int32(Dv),
                     np.float32(scale), np.int32(window or 0), sinks.ptr if sinks is not None else 0,
                     np.float32(softcap or 0.0), np.int32(splits), part.ptr if part is not None else 0, counters,
                     *self._merge_q8(out, part, ctx.T, Hq * Dv, Dv), shared=smem)
        if part is not None and not counters:
            self._combine(part, out, sinks, ctx.T * Hq, Hq, Dv, splits)
        return out

    def _merge_q8(self, out, part, T: int, d: int, Dv: int) -> tuple[int, int]:
        """(levels, scales) pointers for the merge of a split decode step to write out's int8
        rounding into (out.q8, for the output projection's int8 GEMV: ORCD_FUSE_ATTN_Q8), or (0, 0).
        Only the merge writes it, so a step of one key slice a row gets none."""
        if part is None or not self.tuning.fuse_attn_q8 or Dv % 32 or not self._q8_rows(T, d):
            return 0, 0
        out.q8 = self._q8_scratch(T * d)
        return out.q8[0].ptr, out.q8[1].ptr
