"""Gemma 3 (text): the llama layer with Gemma's changes.

- Embeddings are multiplied by sqrt(d_model).
- RMSNorm weights in the file already include Gemma's +1 (the converter adds it), so the plain
  rms_norm op applies; extra norms: per-head Q/K norms (before rope), post-attention and post-FFN
  norms (applied to the block output before the residual add; ffn_norm is the pre-FFN norm).
- FFN: gelu_tanh(gate) * up.
- Layers interleave local (sliding window) and global attention: 5 local then 1 global
  (llama.cpp's Gemma 3 pattern) unless attention.sliding_window_pattern lists it per layer.
  Local layers use rope base rope.freq_base_swa (10000 when absent), global layers rope.freq_base
  (with linear rope scaling when the file says so).
- Query scale: attention.scale when present, else 1/sqrt(key_length) (query_pre_attn_scalar =
  head_dim, as llama.cpp assumes for every Gemma 3 but the 27B, which uses d_model / n_heads).
"""
from __future__ import annotations

import math

import numpy as np

from ..backends.base import RopeSpec
from .llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    archs = ("gemma3",)
    neox_rope = True
    swa_period = 6

    def required_tensors(self):
        req = super().required_tensors()
        h = self.hp
        for i in range(h.n_layers):
            b = f"blk.{i}."
            req.update({b + "attn_q_norm.weight": (h.head_dim,), b + "attn_k_norm.weight": (h.head_dim,),
                        b + "post_attention_norm.weight": (h.d_model,), b + "post_ffw_norm.weight": (h.d_model,)})
        return req

    def is_local(self, i: int) -> bool:
        return bool(self.local[i])

    def prepare(self):
        m, hp = self.model, self.hp
        pattern = m.hp("attention.sliding_window_pattern")
        if isinstance(pattern, (list, tuple)):
            self.local = [bool(p) for p in pattern]
        else:
            period = int(pattern) if pattern else self.swa_period
            self.local = [(i + 1) % period != 0 for i in range(hp.n_layers)]
        self.window = int(m.hp("attention.sliding_window", 0) or 0)
        freq = None
        if m.hp("rope.scaling.type") == "linear" and m.hp("rope.scaling.factor"):
            freq = np.full(hp.rope_dim // 2, float(m.hp("rope.scaling.factor")), np.float32)
        self.rope_global = RopeSpec(dim=hp.rope_dim, base=hp.rope_base, neox=True, freq_factors=freq)
        self.rope_local = RopeSpec(dim=hp.rope_dim, base=float(m.hp("rope.freq_base_swa", 10000.0)), neox=True)
        scale = m.hp("attention.scale")
        self.attn_scale = float(scale) if scale else 1.0 / math.sqrt(hp.head_dim)
        self.embed_scale = math.sqrt(hp.d_model)

    def rope_spec(self, layer):
        return self.rope_local if self.is_local(layer) else self.rope_global

    def attn_window(self, layer):
        return self.window if self.is_local(layer) else 0

    def embed(self, ctx):
        return self.be.scale(self.be.embed(self.w["token_embd.weight"], ctx), self.embed_scale)

    qk_normed = True

    def qk_norm(self, i, q, k):
        be, W, eps = self.be, self.w, self.hp.eps
        q, _ = be.rms_norm(q, W[f"blk.{i}.attn_q_norm.weight"], eps)
        k, _ = be.rms_norm(k, W[f"blk.{i}.attn_k_norm.weight"], eps)
        return q, k

    def post_attn(self, i, a):
        return self.be.rms_norm(a, self.w[f"blk.{i}.post_attention_norm.weight"], self.hp.eps)[0]

    def post_ffn(self, i, f):
        return self.be.rms_norm(f, self.w[f"blk.{i}.post_ffw_norm.weight"], self.hp.eps)[0]

    ffn_act = "gelu"

