"""Tiny GGUF files whose metadata or weights are wrong in one chosen way (issue #15: models that
load but cannot serve). `write_model` writes a complete, servable 1-2 layer model; its keyword
arguments override one metadata key or weight at a time."""
from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

D, HEADS, KV_HEADS, FF, VOCAB, CTX = 32, 2, 1, 64, 40, 64
_ABSENT = object()


def write_model(path, *, arch="llama", n_layers=1, layer_tensors=None, meta=None, fill=None, d=D, ff=FF,
                vocab=VOCAB, junk_elements=0, seed=0, qtype="F32"):
    """A llama-shaped model (any arch name, for metadata checks that run before the tensors are
    matched). meta: key suffix -> value (int: INT32, float: FLOAT32, list: INT32 array, _ABSENT:
    left out), overriding the defaults; layer_tensors: layers with tensors (default n_layers);
    fill: tensor name -> value written into every element; junk_elements: an extra Q8_0 tensor
    no forward pass reads; qtype: the matrices' storage type (F32 or Q8_0)."""
    hd = d // HEADS
    keys = {"block_count": n_layers, "context_length": CTX, "embedding_length": d,
            "feed_forward_length": ff, "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
            "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0, "rope.dimension_count": hd}
    keys.update(meta or {})
    w = gguf.GGUFWriter(str(path), arch)
    for suffix, value in keys.items():
        key = f"{arch}.{suffix}"
        if value is _ABSENT:
            continue
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_int32(key, int(value))
    toks = [chr(ord("a") + i) for i in range(26)] + ["ab", "cd", "ef", "Ġ", "Ġa", "<s>", "</s>"]
    toks += [f"x{i}" for i in range(vocab - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(["a b", "c d", "e f", "Ġ a"])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    for i in range(n_layers if layer_tensors is None else layer_tensors):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,),
                       b + "attn_q.weight": (HEADS * hd, d), b + "attn_k.weight": (KV_HEADS * hd, d),
                       b + "attn_v.weight": (KV_HEADS * hd, d), b + "attn_output.weight": (d, HEADS * hd),
                       b + "ffn_gate.weight": (ff, d), b + "ffn_up.weight": (ff, d), b + "ffn_down.weight": (d, ff)})
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if name.endswith("norm.weight"):
            x += 1.0
        if fill and name in fill:
            x[...] = fill[name]
        if qtype != "F32" and x.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(x, QT[qtype]), raw_dtype=QT[qtype])
        else:
            w.add_tensor(name, x)
    if junk_elements:
        junk = rng.standard_normal((junk_elements // 256, 256)).astype(np.float32)
        w.add_tensor("junk.weight", gguf.quants.quantize(junk, QT.Q8_0), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path


ABSENT = _ABSENT
