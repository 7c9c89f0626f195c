"""The Q8_0 KV cache's format computed independently of the backends (NumPy and gguf only), for the
CPU and CUDA backends' tests: each 32 values turned by the orthonormal Walsh-Hadamard transform,
then GGML's Q8_0 as gguf's quantize writes it."""
from __future__ import annotations

import numpy as np


def wht32(x: np.ndarray) -> np.ndarray:
    """H x / sqrt(32) over the last axis' blocks of 32 in float32, butterflies of stride 1, 2, 4,
    8, 16 (the order cpu_ops.wht32 and the CUDA kernels use, so the same bits)."""
    y = x.reshape(x.shape[:-1] + (-1, 32)).astype(np.float32).copy()
    h = 1
    while h < 32:
        y = y.reshape(y.shape[:-1] + (32 // (2 * h), 2, h))
        u, v = y[..., 0, :].copy(), y[..., 1, :].copy()
        y[..., 0, :], y[..., 1, :] = u + v, u - v
        y = y.reshape(y.shape[:-3] + (32,))
        h *= 2
    return (y * np.float32(0.17677669529663687)).reshape(x.shape)


def hadamard64() -> np.ndarray:
    """The same transform as a float64 matrix (orthonormal, symmetric: its own inverse)."""
    h = np.ones((1, 1))
    while h.shape[0] < 32:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(32)


def ggml_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(levels int8 [..., d], scale bits uint16 [..., d / 32]) of gguf's Q8_0 of wht32(x)."""
    import gguf

    raw = np.frombuffer(gguf.quants.quantize(wht32(x).reshape(-1, 32), gguf.GGMLQuantizationType.Q8_0),
                        np.uint8).reshape(-1, 34)
    return (raw[:, 2:].copy().view(np.int8).reshape(x.shape),
            raw[:, :2].copy().view(np.uint16).reshape(x.shape[:-1] + (-1,)))


def dequant(levels: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 [..., d]: gguf's dequantization of the blocks, turned back by hadamard64()."""
    import gguf

    blocks = np.concatenate([scales.reshape(-1, 1).view(np.uint8), levels.reshape(-1, 32).view(np.uint8)], 1)
    turned = gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType.Q8_0).astype(np.float64)
    return (turned.reshape(-1, 32) @ hadamard64()).reshape(levels.shape)


def q_dp4a(q: np.ndarray, scale: float, kernels) -> np.ndarray:
    """The queries attn_dec holds under ORCD_ATTN_Q8_DP4A, turned back (float64): q * scale turned by
    H in float32 (the kernel's bits), rounded to int8 a 32-block as the cache's store rounds (scale
    amax / 127, kept in float32, halves away from zero), turned back, over scale. Where none of
    `kernels` (the names that ran) is an attn_dec over Q8_0, the queries as given."""
    if not any(n.startswith("attn_dec_g") and n.endswith("_q8") for n in kernels):
        return q
    y = wht32(q * np.float32(scale)).reshape(-1, 32)
    d = np.abs(y).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    yi = (y * inv).astype(np.float32)
    levels = np.where(yi >= 0, 1, -1) * np.floor(np.abs(yi) + np.float32(0.5))
    return ((d.astype(np.float64) * levels) @ hadamard64()).reshape(q.shape) / scale
