"""Qwen2 / Qwen2.5: the llama layer with Q/K/V biases and NeoX (rotate-half) rope.

llama.cpp's converter does not permute qwen2's Q/K rows, so rope pairs are (i, i + d/2). The
output projection is `output.weight` when present, else the tied token embedding.
"""
from __future__ import annotations

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    archs = ("qwen2",)
    neox_rope = True

    def required_tensors(self):
        req = super().required_tensors()
        h = self.hp
        for i in range(h.n_layers):
            b = f"blk.{i}."
            req[b + "attn_q.bias"] = (h.n_heads * h.head_dim,)
            req[b + "attn_k.bias"] = (h.n_kv_heads * h.head_dim,)
            req[b + "attn_v.bias"] = (h.n_kv_heads * h.head_dim_v,)
        return req
