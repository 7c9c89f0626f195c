"""gpt-oss: attention with per-head sinks and biases, alternating sliding-window (even layers) /
full (odd layers) attention, YaRN rope, and a mixture-of-experts FFN.

- The pre-FFN norm is `post_attention_norm.weight` (llama.cpp's name for HF's
  post_attention_layernorm); there is no ffn_norm.
- Router: logits = ffn_gate_inp(x) + bias; top-k experts, weights = softmax over the k picked
  logits; experts use the clamped SwiGLU (alpha 1.702, limit 7, (up + 1) factor) with biases.
- YaRN: factor / original context from metadata, beta_fast 32, beta_slow 1, cos/sin scaled by
  1 + 0.1 ln(factor). The ramp ends are NOT rounded (gpt-oss's reference, and HF's
  `truncate: false`); llama.cpp rounds them, which shifts a few rotation frequencies slightly.
"""
from __future__ import annotations

import math

from ..backends.base import RopeSpec, YarnSpec
from .llama import LlamaAdapter

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


class GptOssAdapter(LlamaAdapter):
    ffn_norm = "post_attention_norm.weight"
    archs = ("gpt-oss",)
    neox_rope = True

    def required_tensors(self):
        h, m = self.hp, self.model
        E = int(m.require("expert_count"))
        F = int(m.hp("expert_feed_forward_length", h.d_ff))
        q, kv = h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim
        req = {"token_embd.weight": (h.vocab_size, h.d_model), "output_norm.weight": (h.d_model,)}
        if m.has("output.weight"):
            req["output.weight"] = (h.vocab_size, h.d_model)
        for i in range(h.n_layers):
            b = f"blk.{i}."
            req.update({
                b + "attn_norm.weight": (h.d_model,), b + "post_attention_norm.weight": (h.d_model,),
                b + "attn_q.weight": (q, h.d_model), b + "attn_q.bias": (q,),
                b + "attn_k.weight": (kv, h.d_model), b + "attn_k.bias": (kv,),
                b + "attn_v.weight": (h.n_kv_heads * h.head_dim_v, h.d_model),
                b + "attn_v.bias": (h.n_kv_heads * h.head_dim_v,),
                b + "attn_output.weight": (h.d_model, h.n_heads * h.head_dim_v), b + "attn_output.bias": (h.d_model,),
                b + "attn_sinks.weight": (h.n_heads,),
                b + "ffn_gate_inp.weight": (E, h.d_model), b + "ffn_gate_inp.bias": (E,),
                b + "ffn_gate_exps.weight": (E, F, h.d_model), b + "ffn_gate_exps.bias": (E, F),
                b + "ffn_up_exps.weight": (E, F, h.d_model), b + "ffn_up_exps.bias": (E, F),
                b + "ffn_down_exps.weight": (E, h.d_model, F), b + "ffn_down_exps.bias": (E, h.d_model),
            })
        return req

    def prepare(self):
        m, hp = self.model, self.hp
        yarn = None
        if m.hp("rope.scaling.type") == "yarn":
            factor = float(m.hp("rope.scaling.factor", 1.0))
            yarn = YarnSpec(factor=factor, orig_ctx=int(m.hp("rope.scaling.original_context_length", 4096)),
                            beta_fast=float(m.hp("rope.scaling.yarn_beta_fast", 32.0)),
                            beta_slow=float(m.hp("rope.scaling.yarn_beta_slow", 1.0)),
                            attn_factor=1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0,
                            truncate=False)
        self.rope = RopeSpec(dim=hp.rope_dim, base=hp.rope_base, neox=True, yarn=yarn)
        self.attn_scale = 1.0 / math.sqrt(hp.head_dim)
        self.window = int(m.hp("attention.sliding_window", 128) or 0)
        self.n_used = int(m.require("expert_used_count"))

    def attn_window(self, layer):
        return self.window if layer % 2 == 0 else 0

    def attn_extras(self, i):
        return {"sinks": self.w[f"blk.{i}.attn_sinks.weight"]}

    def ffn(self, i, h):
        b, W, be = f"blk.{i}.", self.w, self.be
        logits = be.linear(h, W[b + "ffn_gate_inp.weight"], W[b + "ffn_gate_inp.bias"])
        return be.moe(h, logits, self.n_used, W[b + "ffn_gate_exps.weight"], W[b + "ffn_up_exps.weight"],
                      W[b + "ffn_down_exps.weight"], W[b + "ffn_gate_exps.bias"], W[b + "ffn_up_exps.bias"],
                      W[b + "ffn_down_exps.bias"], act="swiglu_oai", alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT)
