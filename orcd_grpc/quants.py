"""Tensor storage formats orcd accepts, and their decoding to float32.

Decoding delegates to ``gguf.quants.dequantize`` (the package that ships with llama.cpp's
converter). It is vectorized NumPy over whole tensors, it is maintained next to the block layouts
in ggml-common.h, and tests/test_quants.py checks it bit-exactly against an independent float64
decoder written from those layouts. Re-implementing twelve block formats here would only add a
second place for layout bugs; the CUDA backend has its own kernels and is checked against this.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _gq

from .errors import InvalidArgument

T = GGMLQuantizationType

#: Every storage type a model file may use. Anything else (IQ*, Q2_K, Q3_K, TQ*, ...) is refused at
#: validation time, before any memory is committed, because the CUDA backend has no kernel for it.
SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(
    {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4}
)


def qtype_name(qtype) -> str:
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type#{int(qtype)}"


def check_supported(qtype, tensor_name: str) -> GGMLQuantizationType:
    """Return ``qtype`` as an enum, or raise InvalidArgument naming the tensor and the type."""
    try:
        t = GGMLQuantizationType(int(qtype))
    except ValueError:
        t = None
    if t is None or t not in SUPPORTED:
        supported = ", ".join(sorted(x.name for x in SUPPORTED))
        raise InvalidArgument(
            f"tensor {tensor_name!r} is stored as {qtype_name(qtype)}, which orcd does not support "
            f"(supported: {supported})",
            field="model",
        )
    return t


def block_size(qtype) -> tuple[int, int]:
    """(values per block, bytes per block) for ``qtype``."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]


def nbytes(qtype, shape: Sequence[int]) -> int:
    """Bytes a tensor of logical (NumPy-order) ``shape`` occupies when stored as ``qtype``."""
    bs, ts = block_size(qtype)
    n = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % bs:
        raise InvalidArgument(f"row length {shape[-1]} is not a multiple of the {qtype_name(qtype)} block {bs}")
    return n // bs * ts


def dequantize(raw: np.ndarray, qtype, shape: Sequence[int]) -> np.ndarray:
    """Decode ``raw`` (the tensor's bytes, any dtype/shape viewing them) to float32 of ``shape``.

    ``shape`` is the logical NumPy-order shape (rows..., ncols), i.e. ggml's ne reversed (what
    ``gguf.GGUFReader`` reports, reversed, in ``ReaderTensor.shape``).
    """
    t = check_supported(qtype, "<tensor>")
    shape = tuple(int(s) for s in shape)
    arr = np.ascontiguousarray(raw)
    if t == T.F32:
        out = arr.view(np.float32)
    elif t == T.F16:
        out = arr.view(np.float16).astype(np.float32)
    else:
        _, ts = block_size(t)
        # Blocks are stored back to back, so the byte stream may be cut into any whole number of
        # blocks per "row". gguf decodes 16 rows per NumPy call; 1024 blocks per row keeps those
        # calls large (several times faster than the tensor's own short rows).
        b = arr.view(np.uint8).reshape(-1)
        row_blocks = math.gcd(b.size // ts, 1024) or 1
        out = _gq.dequantize(b.reshape(-1, row_blocks * ts), t)
    out = np.asarray(out, dtype=np.float32)
    expect = int(np.prod(shape, dtype=np.int64))
    if out.size != expect:
        raise InvalidArgument(
            f"{qtype_name(t)} data decodes to {out.size} values, but shape {shape} needs {expect}"
        )
    return out.reshape(shape)


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """Encode float ``x`` (rows..., ncols) as ``qtype``; returns raw bytes shaped (rows..., nbytes).

    F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/MXFP4 go through gguf's reference quantizers (the same
    rounding llama.cpp's converter uses). K-quants cannot be encoded here (gguf has no encoder).
    """
    t = GGMLQuantizationType(int(qtype))
    x = np.asarray(x, dtype=np.float32)
    if t == T.F32:
        return np.ascontiguousarray(x)
    if t == T.F16:
        return x.astype(np.float16)
    return _gq.quantize(x, t)


def ggml_shape(reader_tensor) -> tuple[int, ...]:
    """Logical NumPy-order shape of a ``gguf.ReaderTensor`` (its ``shape`` is ggml's ne order)."""
    return tuple(int(s) for s in reversed(list(reader_tensor.shape)))


def dequantize_reader_tensor(reader_tensor) -> np.ndarray:
    """Decode a ``gguf.ReaderTensor`` to float32 in logical shape, naming it in any error."""
    check_supported(reader_tensor.tensor_type, reader_tensor.name)
    return dequantize(reader_tensor.data, reader_tensor.tensor_type, ggml_shape(reader_tensor))


#: Formats whose every block is exactly a Q8_0 block (the same 32 weights, the same f16 scale d,
#: integer levels within int8): (q - 8) * d for Q4_0, (q - 16) * d for Q5_0.
WIDENS_TO_Q8_0: frozenset[GGMLQuantizationType] = frozenset({T.Q4_0, T.Q5_0, T.Q8_0})


def widen_to_q8_0(raw: np.ndarray, qtype) -> np.ndarray:
    """The same weights re-encoded as Q8_0 blocks, bit-exactly (same scale, same levels). Lets
    tensors of different types in WIDENS_TO_Q8_0 load as one fused matrix (qwen2.5's Q4_K_M files
    store Q and K as Q5_0 and V as Q8_0): one GEMV launch instead of two per layer, for 3 more bits
    per Q/K weight."""
    qtype = GGMLQuantizationType(int(qtype))
    b = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if qtype == T.Q8_0:
        return b
    per = GGML_QUANT_SIZES[qtype][1]
    if qtype not in WIDENS_TO_Q8_0 or b.size % per:
        raise ValueError(f"cannot widen {qtype_name(qtype)} ({b.size} bytes) to Q8_0")
    blocks = b.reshape(-1, per)
    nib = blocks[:, -16:]  # weight j in the low nibble of byte j, weight j + 16 in the high one
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.int16)
    if qtype == T.Q5_0:  # bit j of the little-endian qh word is weight j's fifth bit
        qh = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")
        q = q | (qh.astype(np.int16) << 4)
        q -= 16
    else:
        q -= 8
    out = np.empty((blocks.shape[0], 34), np.uint8)
    out[:, :2] = blocks[:, :2]  # the f16 scale
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out.reshape(-1)
