"""Tiny random Hugging Face models, one per supported architecture, for reference comparisons.

Every model is float32, eval mode and seeded; hidden sizes are multiples of 32 so every matrix
splits into whole Q4_0 / Q8_0 / MXFP4 blocks. Weights are re-drawn at a scale where every part of
the network matters (transformers' default init makes some paths negligible): norms far from 1,
biases nonzero, sinks and router logits of order 1.
"""
from __future__ import annotations

VOCAB = 512
ARCHS = ("llama", "qwen2", "phi3", "phi3_longrope", "gemma3", "gpt_oss")
N_PROMPT, N_DECODE = 32, 16


def engine_logits(path, ids, backend: str = "numpy", kv_cache_type: str = ""):
    """orcd's logits [N_PROMPT + N_DECODE, vocab] (float64): a N_PROMPT-token prefill, then
    N_DECODE single-token cached steps fed the rest of `ids`."""
    import numpy as np

    from orcd_grpc.loader import load_engine
    from orcd_grpc.sampling import SamplingParams

    eng = load_engine(path, backend=backend, max_sequences=1, max_context=256, kv_cache_type=kv_cache_type)
    try:
        s = eng.new_sequence(ids[:N_PROMPT].tolist(), SamplingParams(temperature=0.0))
        rows = [eng.score(s)] + [eng.score(s, [int(t)]) for t in ids[N_PROMPT:N_PROMPT + N_DECODE]]
        return np.concatenate(rows).astype(np.float64)
    finally:
        eng.close()


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "qwen2":
        return tf.Qwen2Config(**{**common, "tie_word_embeddings": True},
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if arch == "phi3":
        # partial rotary (3/4 of each 32-wide head) exercises rope.dimension_count < head_dim
        return tf.Phi3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.75},
                             original_max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "phi3_longrope":
        import numpy as np

        rng = np.random.default_rng(5)
        half = 32 // 2
        # orig ctx 16 < our 48-token sequences: HF switches to the long factors, and llama.cpp
        # (context 256 > 16) uses them from the start, so both use long_factor throughout.
        return tf.Phi3Config(**common, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "long_factor": (1.0 + rng.uniform(0, 3, half)).tolist(),
            "short_factor": (1.0 + rng.uniform(0, 0.5, half)).tolist(),
            "original_max_position_embeddings": 16}, original_max_position_embeddings=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
    if arch == "gemma3":
        # 6 layers: layers 0-4 local (sliding window 8, rope base 10000), layer 5 global.
        # head_dim 64 != hidden/heads (32): catches a scale taken from the wrong one.
        return tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 6, "tie_word_embeddings": True},
                                   head_dim=64, query_pre_attn_scalar=64, sliding_window=8,
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                                   hidden_activation="gelu_pytorch_tanh", pad_token_id=0)
    if arch == "gpt_oss":
        return tf.GptOssConfig(**{**common, "intermediate_size": 128, "max_position_embeddings": 131072},
                               head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                "beta_fast": 32.0, "beta_slow": 1.0,
                                                "original_max_position_embeddings": 4096, "truncate": False},
                               attention_bias=True, pad_token_id=0)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    """A tiny random *ForCausalLM for `arch`, float32, eval mode, eager attention."""
    import torch
    import transformers as tf

    cfg = _config(arch)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "phi3": tf.Phi3ForCausalLM,
           "phi3_longrope": tf.Phi3ForCausalLM, "gemma3": tf.Gemma3ForCausalLM,
           "gpt_oss": tf.GptOssForCausalLM}[arch]
    cfg._attn_implementation = "eager"
    if arch == "gpt_oss":
        # the plain per-expert loop: the grouped-GEMM path has no float64 kernel
        cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # gemma stores w with the +1 applied at use; others use w directly
                base = 0.0 if arch == "gemma3" else 1.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1 or name.endswith("_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if arch == "gemma3" else 1.0))
            else:
                fan_in = p.shape[-2] if (arch == "gpt_oss" and ".experts." in name) else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model
