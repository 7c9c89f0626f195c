"""Writes an in-memory Hugging Face `transformers` causal LM as a GGUF file, laid out the way
llama.cpp's convert_hf_to_gguf.py lays out that architecture.

It exists so that tests can build a tiny random model, run it in transformers (the reference) and
in orcd (from the GGUF file) on the very same weights; tests, benchmarks and tools/hf_to_gguf.py
import it from here, so the served package does not ship it. Conventions reproduced per
architecture:

- llama:   Q/K rows permuted from HF's rotate-half order to interleaved pairs (llama.cpp runs
           llama with "normal" rope); qwen2/phi3/gemma3/gpt-oss are not permuted (NeoX rope).
- qwen2:   Q/K/V biases.
- phi3:    fused attn_qkv and fused ffn_up = [gate; up] (as HF stores them); partial rotary
           dimension count; LongRoPE factors as rope_factors_long/short.weight and the attention
           factor sqrt(1 + ln(s)/ln(orig_ctx)), s = max_pos / orig_ctx.
- gemma3:  every *norm.weight stored with +1 applied (HF computes x * (1 + w)); sliding window;
           global rope base in rope.freq_base, local base in rope.freq_base_swa.
- gpt-oss: experts split from HF's interleaved gate_up_proj into ffn_gate_exps / ffn_up_exps
           ([E, I, H]) and ffn_down_exps ([E, H, I]) with biases; sinks; YaRN rope metadata;
           experts quantized to MXFP4 by default.

Only metadata the engine needs plus a minimal valid vocabulary are written (no chat template).
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from orcd_grpc import quants

ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "phi3": gguf.MODEL_ARCH.PHI3,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "gpt_oss": gguf.MODEL_ARCH.GPT_OSS,
}

QTYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q4_1": T.Q4_1,
          "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "MXFP4": T.MXFP4}


def _qt(q) -> T:
    return QTYPES[q.upper()] if isinstance(q, str) else T(int(q))


def _rope_params(cfg) -> dict:
    """transformers >= 5 keeps rope settings in `rope_parameters`; older ones in rope_theta /
    rope_scaling. Returns one flat dict (for gemma3 the full-attention entry)."""
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        if "full_attention" in rp:
            return dict(rp["full_attention"])
        return dict(rp)
    out = {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    out.update(getattr(cfg, "rope_scaling", None) or {})
    return out


def _local_rope_base(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "sliding_attention" in rp:
        return float(rp["sliding_attention"]["rope_theta"])
    return float(getattr(cfg, "rope_local_base_freq", 10000.0))


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF llama Q/K rows are per head [first half | second half] (rotate-half rope); GGUF llama
    wants per head interleaved pairs (x0, x_{d/2}), (x1, x_{d/2+1}), ... so that llama.cpp's
    adjacent-pair rope computes the same rotation."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _bytes_to_unicode() -> list[str]:
    # GPT-2's printable stand-ins for the 256 byte values (byte-level BPE vocabularies use them)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_dummy_vocab(w: gguf.GGUFWriter, n_vocab: int, special: tuple[str, ...] = (), eos: str | None = None) -> None:
    """A valid byte-level BPE vocabulary of exactly n_vocab tokens: the 256 byte tokens, one merge,
    `special` control tokens (a chat format's markup, e.g. harmony's <|channel|>), then reserved
    ones. Enough for the file to load; the math tests feed token ids directly. eos: the
    end-of-sequence token's text (one of `special`), else a reserved token."""
    toks = _bytes_to_unicode()[: n_vocab]
    types = [1] * len(toks)
    merges = []
    if n_vocab > 257:
        toks.append("ab")
        types.append(1)
        merges.append("a b")
    for t in special:
        toks.append(t)
        types.append(3)
    if len(toks) > n_vocab - 2:
        raise ValueError(f"{len(special)} special tokens do not fit a vocabulary of {n_vocab}")
    while len(toks) < n_vocab:
        toks.append(f"<|reserved_{len(toks)}|>")
        types.append(3)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges or ["a b"])
    w.add_bos_token_id(n_vocab - 1)
    w.add_eos_token_id(toks.index(eos) if eos else n_vocab - 2)


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().astype(np.float32)


def _choose_type(name: str, arr: np.ndarray, qtype: T, expert_qtype: T) -> T:
    """llama.cpp's policy, simplified: 1-D tensors (norms, biases, sinks) and small routing /
    rope-factor tensors stay F32; expert stacks take expert_qtype; other matrices take qtype
    when their rows split into whole blocks, else F32 (F16 formats have no block constraint)."""
    if arr.ndim < 2 or name.endswith(".bias") or "ffn_gate_inp" in name or "rope_factors" in name:
        return T.F32
    q = expert_qtype if "_exps." in name else qtype
    bs, _ = quants.block_size(q)
    return q if arr.shape[-1] % bs == 0 else T.F32


def export_hf_model(model, path: str | os.PathLike, *, qtype="F32", expert_qtype="MXFP4",
                    type_overrides: dict[str, str] | None = None, special_tokens: tuple[str, ...] = (),
                    eos_token: str | None = None, chat_template: str | None = None) -> str:
    """Writes `model` (a transformers *ForCausalLM) to `path` as GGUF. qtype: storage of the
    2-D weights (F32, F16, BF16, Q8_0, Q4_0, ...); expert_qtype: of the gpt-oss expert stacks.
    type_overrides: GGUF tensor name -> type name, for tests that need a particular layout.
    special_tokens / eos_token / chat_template: a chat format's control tokens in the vocabulary
    (write_dummy_vocab), its end-of-sequence token and its template, for tests that serve chats."""
    cfg = model.config
    mt = cfg.model_type
    if mt not in ARCH:
        raise ValueError(f"no exporter for model_type {mt!r} (supported: {', '.join(sorted(ARCH))})")
    arch = ARCH[mt]
    qtype, expert_qtype = _qt(qtype), _qt(expert_qtype)
    n_layers = cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    w = gguf.GGUFWriter(os.fspath(path), gguf.MODEL_ARCH_NAMES[arch])

    d = cfg.hidden_size
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or d // n_head
    rp = _rope_params(cfg)

    # ---- metadata ---------------------------------------------------------------------------
    w.add_name(f"tiny-{mt}")
    w.add_block_count(n_layers)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(d)
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == T.F32 else gguf.LlamaFileType.GUESSED)
    rope_dim = int(head_dim * float(rp.get("partial_rotary_factor", 1.0) or 1.0))
    if arch != gguf.MODEL_ARCH.GEMMA3:
        w.add_rope_dimension_count(rope_dim)

    extra: list[tuple[str, np.ndarray]] = []  # (gguf name, array) not derived from HF params
    if arch == gguf.MODEL_ARCH.PHI3:
        orig = int(getattr(cfg, "original_max_position_embeddings", None) or rp.get("original_max_position_embeddings")
                   or cfg.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(orig)
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(int(cfg.sliding_window))
        if rp.get("rope_type") in ("longrope", "su") or "long_factor" in rp:
            scale = cfg.max_position_embeddings / orig
            attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
            w.add_rope_scaling_attn_factors(attn)
            for kind in ("long", "short"):
                f = np.asarray(rp[f"{kind}_factor"], np.float32)
                if f.shape != (rope_dim // 2,):
                    raise ValueError(f"{kind}_factor has {f.size} entries, rope needs {rope_dim // 2}")
                extra.append((gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, f"ROPE_FACTORS_{kind.upper()}")]
                              + ".weight", f))
    if arch == gguf.MODEL_ARCH.GEMMA3:
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_rope_freq_base_swa(_local_rope_base(cfg))
        layer_types = getattr(cfg, "layer_types", None)
        default = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
        if layer_types and list(layer_types) != default:
            # llama.cpp assumes Gemma 3's 5-local : 1-global pattern; write it only when it differs
            w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        qpas = float(getattr(cfg, "query_pre_attn_scalar", head_dim))
        if qpas != head_dim:
            # llama.cpp derives the query scale from head_dim; record any other choice explicitly
            w.add_attention_scale(qpas ** -0.5)
        if rp.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rp["factor"]))
    if arch == gguf.MODEL_ARCH.GPT_OSS:
        w.add_expert_count(int(cfg.num_local_experts))
        w.add_expert_used_count(int(cfg.num_experts_per_tok))
        w.add_expert_feed_forward_length(int(cfg.intermediate_size))
        w.add_sliding_window(int(cfg.sliding_window))
        if rp.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rp["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    write_dummy_vocab(w, int(cfg.vocab_size), tuple(special_tokens), eos_token)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    # ---- tensors ----------------------------------------------------------------------------
    sd = {k: v for k, v in model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out: list[tuple[str, np.ndarray]] = []

    def name_of(hf: str) -> str:
        new = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"cannot map tensor {hf!r} for {mt}")
        return new

    for hf, t in sd.items():
        if hf == "lm_head.weight" and tied:
            continue  # tied output: llama.cpp reads token_embd.weight
        if "rotary_emb" in hf or hf.endswith("embed_scale"):
            continue
        arr = _np(t)
        if arch == gguf.MODEL_ARCH.GPT_OSS and ".mlp.experts." in hf:
            out.extend(_gpt_oss_experts(hf, arr, name_of))
            continue
        name = name_of(hf)
        if arch == gguf.MODEL_ARCH.GPT_OSS and hf.endswith("self_attn.sinks"):
            name += ".weight"
        if arch == gguf.MODEL_ARCH.LLAMA and hf.endswith(("q_proj.weight", "k_proj.weight")):
            arr = llama_permute(arr, n_head if "q_proj" in hf else n_kv)
        if arch == gguf.MODEL_ARCH.GEMMA3 and hf.endswith("norm.weight"):
            arr = arr + np.float32(1.0)  # HF Gemma RMSNorm multiplies by (1 + w)
        out.append((name, arr))
    out.extend(extra)

    overrides = {k: _qt(v) for k, v in (type_overrides or {}).items()}
    for name, arr in out:
        q = overrides.get(name) or _choose_type(name, arr, qtype, expert_qtype)
        if q == T.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
        elif q == T.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(arr, q), raw_dtype=q)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return os.fspath(path)


def _gpt_oss_experts(hf: str, arr: np.ndarray, name_of) -> Iterable[tuple[str, np.ndarray]]:
    """HF keeps gate and up interleaved along the last axis of gate_up_proj [E, H, 2I] (gate at
    even, up at odd columns) and multiplies x @ W; GGUF wants [E, I, H] stacks (x @ W^T)."""
    prefix = hf.rsplit(".experts.", 1)[0] + ".experts."
    leaf = hf.rsplit(".", 1)[1]
    if leaf == "gate_up_proj":
        yield name_of(prefix + "gate_proj") + ".weight", np.ascontiguousarray(arr[:, :, 0::2].transpose(0, 2, 1))
        yield name_of(prefix + "up_proj") + ".weight", np.ascontiguousarray(arr[:, :, 1::2].transpose(0, 2, 1))
    elif leaf == "gate_up_proj_bias":
        yield name_of(prefix + "gate_proj") + ".bias", np.ascontiguousarray(arr[:, 0::2])
        yield name_of(prefix + "up_proj") + ".bias", np.ascontiguousarray(arr[:, 1::2])
    elif leaf == "down_proj":
        yield name_of(prefix + "down_proj") + ".weight", np.ascontiguousarray(arr.transpose(0, 2, 1))
    elif leaf == "down_proj_bias":
        yield name_of(prefix + "down_proj") + ".bias", arr
    else:
        raise ValueError(f"unexpected gpt-oss expert tensor {hf!r}")


def _llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_into_hf(model, path: str | os.PathLike) -> None:
    """The inverse of `export_hf_model`: overwrites `model`'s parameters with the file's tensors,
    dequantized (gguf's decoder) and transformed back to HF layout. Used to build a reference
    model that carries exactly the quantization error of a quantized file."""
    import torch

    cfg = model.config
    arch = ARCH[cfg.model_type]
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    reader = gguf.GGUFReader(os.fspath(path))
    tensors = {t.name: quants.dequantize_reader_tensor(t) for t in reader.tensors}
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    sd = model.state_dict()
    new = {}
    for hf, t in sd.items():
        if "rotary_emb" in hf or hf.endswith("embed_scale"):
            continue
        if hf == "lm_head.weight" and "output.weight" not in tensors:
            arr = tensors["token_embd.weight"]
        elif arch == gguf.MODEL_ARCH.GPT_OSS and ".mlp.experts." in hf:
            prefix = hf.rsplit(".experts.", 1)[0] + ".experts."
            leaf = hf.rsplit(".", 1)[1]
            gname = lambda p, s: tmap.get_name(prefix + p) + s  # noqa: E731
            if leaf == "gate_up_proj":
                g, u = tensors[gname("gate_proj", ".weight")], tensors[gname("up_proj", ".weight")]
                arr = np.empty((g.shape[0], g.shape[2], 2 * g.shape[1]), np.float32)
                arr[:, :, 0::2], arr[:, :, 1::2] = g.transpose(0, 2, 1), u.transpose(0, 2, 1)
            elif leaf == "gate_up_proj_bias":
                g, u = tensors[gname("gate_proj", ".bias")], tensors[gname("up_proj", ".bias")]
                arr = np.empty((g.shape[0], 2 * g.shape[1]), np.float32)
                arr[:, 0::2], arr[:, 1::2] = g, u
            elif leaf == "down_proj":
                arr = tensors[gname("down_proj", ".weight")].transpose(0, 2, 1)
            else:
                arr = tensors[gname("down_proj", ".bias")]
        else:
            name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if hf.endswith("self_attn.sinks"):
                name += ".weight"
            arr = tensors[name]
            if arch == gguf.MODEL_ARCH.LLAMA and hf.endswith(("q_proj.weight", "k_proj.weight")):
                arr = _llama_unpermute(arr, n_head if "q_proj" in hf else n_kv)
            if arch == gguf.MODEL_ARCH.GEMMA3 and hf.endswith("norm.weight"):
                arr = arr - np.float32(1.0)
        if tuple(arr.shape) != tuple(t.shape):
            raise ValueError(f"{hf}: file gives {arr.shape}, model has {tuple(t.shape)}")
        new[hf] = torch.from_numpy(np.array(arr, dtype=np.float32)).to(t.dtype)  # own, writable copy
    missing = set(sd) - set(new) - {k for k in sd if "rotary_emb" in k or k.endswith("embed_scale")}
    if missing:
        raise ValueError(f"not restored: {sorted(missing)}")
    with torch.no_grad():
        for k, v in new.items():
            sd[k].copy_(v)
