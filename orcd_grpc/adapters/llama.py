"""The llama family: Llama / SmolLM2 and the variants that differ only in details.

One pre-norm decoder layer, written once; subclasses change the details through the hooks
(`rope_spec`, `attn_extras`, `ffn`, norms around the blocks) rather than re-writing the layer.
"""
from __future__ import annotations

import math

from .. import quants
from ..backends.base import RopeSpec
from ..weight_packing import Pack
from .base import Adapter

_WIDENS = quants.WIDENS_TO_Q8_0


class LlamaAdapter(Adapter):
    archs = ("llama",)
    neox_rope = False  # llama.cpp's converter permutes Q/K rows of llama models for interleaved rope
    ffn_norm = "ffn_norm.weight"  # the norm before the FFN; gpt-oss names it post_attention_norm
    # One matmul launch instead of several per layer. Q4_0/Q5_0/Q8_0 parts may mix (re-encoded as
    # Q8_0 for 3 more bits per weight: qwen2.5's Q4_K_M files store Q/K as Q5_0, V as Q8_0); where
    # Q/K/V cannot pack (V's type differs, widening off), Q and K alone.
    packing = (
        Pack("attn_qkv_fused.weight", ("attn_q.weight", "attn_k.weight", "attn_v.weight"), widen=_WIDENS),
        Pack("attn_qk_fused.weight", ("attn_q.weight", "attn_k.weight"), widen=_WIDENS, switch="qk"),
        Pack("ffn_gate_up_fused.weight", ("ffn_gate.weight", "ffn_up.weight"), widen=_WIDENS),
    )

    # ---- description ---------------------------------------------------------------------
    def output_name(self) -> str:
        return "output.weight" if self.model.has("output.weight") else "token_embd.weight"

    def required_tensors(self):
        h = self.hp
        q, kv_k, kv_v = h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim, h.n_kv_heads * h.head_dim_v
        req = {"token_embd.weight": (h.vocab_size, h.d_model), "output_norm.weight": (h.d_model,)}
        if self.model.has("output.weight"):
            req["output.weight"] = (h.vocab_size, h.d_model)
        if self.model.has("rope_freqs.weight"):  # one divisor per rotated pair
            req["rope_freqs.weight"] = (h.rope_dim // 2,)
        for i in range(h.n_layers):
            b = f"blk.{i}."
            req.update({
                b + "attn_norm.weight": (h.d_model,), b + "ffn_norm.weight": (h.d_model,),
                b + "attn_q.weight": (q, h.d_model), b + "attn_k.weight": (kv_k, h.d_model),
                b + "attn_v.weight": (kv_v, h.d_model), b + "attn_output.weight": (h.d_model, q),
                b + "ffn_gate.weight": (h.d_ff, h.d_model), b + "ffn_up.weight": (h.d_ff, h.d_model),
                b + "ffn_down.weight": (h.d_model, h.d_ff),
            })
        return req

    def optional_tensors(self) -> set[str]:
        """The biases a layer adds when the file has them (bias() reads them with .get), and llama
        3's rope factors (prepare reads them; phi3 inherits that)."""
        return {"rope_freqs.weight"} | {f"blk.{i}.attn_{p}.bias" for i in range(self.hp.n_layers)
                                        for p in ("q", "k", "v", "output", "qkv")}

    # ---- constants -----------------------------------------------------------------------
    def prepare(self):
        freq = None
        if self.model.has("rope_freqs.weight"):  # llama 3.x long-context factors
            freq = self.be.to_host(self.w["rope_freqs.weight"])
        self.rope = RopeSpec(dim=self.hp.rope_dim, base=self.hp.rope_base, neox=self.neox_rope, freq_factors=freq)
        self.attn_scale = 1.0 / math.sqrt(self.hp.head_dim)

    def rope_spec(self, layer: int) -> RopeSpec:
        return self.rope

    def attn_window(self, layer: int) -> int:
        return 0

    def bias(self, name: str):
        return self.w.get(name)

    # ---- the layer -----------------------------------------------------------------------
    qk_normed = False  # per-head norms of q and k between projection and rope (gemma3)

    def qkv_fused(self, i: int, h):
        """The Q/K/V projection as one [T, q + k + v] tensor when the layer has one matrix for it
        (loaded fused, or phi3's own), else None."""
        b, W = f"blk.{i}.", self.w
        fused = W.get(b + "attn_qkv_fused.weight")
        return None if fused is None else self.be.linear(h, fused, W.get(b + "attn_qkv_fused.bias"))

    def qkv(self, i: int, h, fused):
        """q, k, v: split from `fused` (qkv_fused's result), or three projections of h."""
        b, W, be, hp = f"blk.{i}.", self.w, self.be, self.hp
        if fused is not None:
            return be.split(fused, [hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim,
                                    hp.n_kv_heads * hp.head_dim_v])
        qk = W.get(b + "attn_qk_fused.weight")
        if qk is not None:
            q, k = be.split(be.linear(h, qk, W.get(b + "attn_qk_fused.bias")),
                            [hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim])
        else:
            q = be.linear(h, W[b + "attn_q.weight"], self.bias(b + "attn_q.bias"))
            k = be.linear(h, W[b + "attn_k.weight"], self.bias(b + "attn_k.bias"))
        v = be.linear(h, W[b + "attn_v.weight"], self.bias(b + "attn_v.bias"))
        return q, k, v

    def attention(self, i: int, h, ctx, kv):
        be, hp = self.be, self.hp
        T = h.shape[0]
        spec = self.rope_spec(i)
        fused = self.qkv_fused(i, h)
        if fused is not None and not self.qk_normed:  # rope and the cache writes straight from the projection
            q = be.qkv_rope_store(fused, kv, i, ctx, spec, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.head_dim_v)
            k = v = None
        else:
            q, k, v = self.qkv(i, h, fused)
            q = q.reshape(T, hp.n_heads, hp.head_dim)
            k = k.reshape(T, hp.n_kv_heads, hp.head_dim)
            v = v.reshape(T, hp.n_kv_heads, hp.head_dim_v)
            q, k = self.qk_norm(i, q, k)
            q, k = be.rope_pair(q, k, ctx, spec)
        o = be.attention(q, k, v, kv, i, ctx, scale=self.attn_scale, window=self.attn_window(i),
                         **self.attn_extras(i))
        b = f"blk.{i}."
        return be.linear(o, self.w[b + "attn_output.weight"], self.bias(b + "attn_output.bias"))

    def qk_norm(self, i: int, q, k):
        return q, k

    def attn_extras(self, i: int) -> dict:
        return {}

    ffn_act = "silu"

    def ffn(self, i: int, h):
        b, W, be = f"blk.{i}.", self.w, self.be
        fused = W.get(b + "ffn_gate_up_fused.weight")
        if fused is not None:
            return be.linear(be.glu_fused(be.linear(h, fused), self.ffn_act), W[b + "ffn_down.weight"])
        g = be.linear(h, W[b + "ffn_gate.weight"])
        u = be.linear(h, W[b + "ffn_up.weight"])
        mul = be.silu_mul if self.ffn_act == "silu" else be.gelu_mul
        return be.linear(mul(g, u), W[b + "ffn_down.weight"])

    def post_attn(self, i: int, a):
        return a

    def post_ffn(self, i: int, f):
        return f

    def embed(self, ctx):
        return self.be.embed(self.w["token_embd.weight"], ctx)

    def forward(self, ctx, kv):
        be, W, eps = self.be, self.w, self.hp.eps
        # a stage file's input rows are hidden states, stored as its token_embd (no embedding scale)
        x = be.embed(W["token_embd.weight"], ctx) if self.stage.hidden_in else self.embed(ctx)
        res = None
        for i in self.layers():
            b = f"blk.{i}."
            h, res = be.rms_norm(x, W[b + "attn_norm.weight"], eps, res)
            a = self.post_attn(i, self.attention(i, h, ctx, kv))
            h, res = be.rms_norm(a, W[b + self.ffn_norm], eps, res)
            x = self.post_ffn(i, self.ffn(i, h))
        # Only the rows that are sampled need the final norm and the (large) output projection.
        last = be.gather_rows(x if res is None else be.add(x, res), ctx)
        if self.stage.hidden_out:
            return last
        h, _ = be.rms_norm(last, W["output_norm.weight"], eps)
        return be.linear(h, W[self.output_name()])
