"""Phi-3 / Phi-3.5: fused QKV and fused gate/up projections, NeoX rope over the first
rope.dimension_count features, optional LongRoPE factors.

- attn_qkv.weight rows are [q (H*D); k (Hkv*D); v (Hkv*D)].
- ffn_up.weight rows are [gate (F); up (F)]: silu(first half) * second half.
- LongRoPE: the file carries rope_factors_long/short.weight (one divisor per rotated pair). As in
  llama.cpp (llama_model::get_rope_factors: n_ctx_per_seq > n_ctx_orig_yarn), the long factors
  apply when the context a sequence is served at (`n_ctx`: the engine's context length, set
  before bind or through set_context_length; unset: the trained context) exceeds
  rope.scaling.original_context_length, the short ones otherwise, for every position. cos/sin
  are multiplied by rope.scaling.attn_factor (a constant of the file, whichever factors apply).
"""
from __future__ import annotations

import math

from ..backends.base import RopeSpec
from .llama import LlamaAdapter


class Phi3Adapter(LlamaAdapter):
    archs = ("phi3",)
    neox_rope = True

    def required_tensors(self):
        h = self.hp
        q, kv = h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim
        req = {"token_embd.weight": (h.vocab_size, h.d_model), "output_norm.weight": (h.d_model,)}
        if self.model.has("output.weight"):
            req["output.weight"] = (h.vocab_size, h.d_model)
        for kind in ("long", "short"):
            if self.model.has(f"rope_factors_{kind}.weight"):
                req[f"rope_factors_{kind}.weight"] = (h.rope_dim // 2,)
        for i in range(h.n_layers):
            b = f"blk.{i}."
            req.update({
                b + "attn_norm.weight": (h.d_model,), b + "ffn_norm.weight": (h.d_model,),
                b + "attn_qkv.weight": (q + 2 * kv, h.d_model), b + "attn_output.weight": (h.d_model, q),
                b + "ffn_up.weight": (2 * h.d_ff, h.d_model), b + "ffn_down.weight": (h.d_model, h.d_ff),
            })
        return req


    def rope_factors_kind(self, n_ctx: int | None = None) -> str:
        """'long' or 'short': llama.cpp's choice for a sequence context of n_ctx tokens."""
        hp = self.hp
        orig = int(self.model.hp("rope.scaling.original_context_length", hp.context_length) or hp.context_length)
        n_ctx = int(n_ctx or self.n_ctx or hp.context_length)
        return "long" if n_ctx > orig else "short"

    def set_context_length(self, n_ctx: int) -> None:
        """Serve at n_ctx tokens per sequence: re-picks the LongRoPE factors (before any KV exists)."""
        self.n_ctx = int(n_ctx)
        if self.be is not None:
            self.prepare()

    def prepare(self):
        super().prepare()
        m, hp = self.model, self.hp
        orig = int(m.hp("rope.scaling.original_context_length", hp.context_length) or hp.context_length)
        kind = self.rope_factors_kind()
        freq = None
        if m.has(f"rope_factors_{kind}.weight"):
            freq = self.be.to_host(self.w[f"rope_factors_{kind}.weight"])
        attn_factor = m.hp("rope.scaling.attn_factor")
        if attn_factor is None and freq is not None:
            scale = hp.context_length / orig
            attn_factor = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
        self.rope = RopeSpec(dim=hp.rope_dim, base=hp.rope_base, neox=True, freq_factors=freq,
                             attn_factor=float(attn_factor or 1.0))
        self.window = int(m.hp("attention.sliding_window", 0) or 0)

    def attn_window(self, layer):
        return self.window

    def qkv_fused(self, i, h):
        return self.be.linear(h, self.w[f"blk.{i}.attn_qkv.weight"], self.bias(f"blk.{i}.attn_qkv.bias"))

    def ffn(self, i, h):
        be, W = self.be, self.w
        return be.linear(be.glu_fused(be.linear(h, W[f"blk.{i}.ffn_up.weight"])), W[f"blk.{i}.ffn_down.weight"])
