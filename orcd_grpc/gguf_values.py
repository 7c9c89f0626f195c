"""GGUF metadata values: their types, decoding them from a header gguf_guard has checked
(`HeaderValues`), and the checks on the values the loader turns into loop counts, divisors and
lookups (`check_semantics`): an architecture's hyperparameters and the tokenizer's vocabulary,
merges and special ids."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidArgument

if TYPE_CHECKING:
    from .gguf_guard import TensorExtent

# GGUF value types: id -> (name, fixed size in bytes or None for string/array)
VALUE_TYPES: dict[int, tuple[str, int | None]] = {
    0: ("UINT8", 1), 1: ("INT8", 1), 2: ("UINT16", 2), 3: ("INT16", 2), 4: ("UINT32", 4),
    5: ("INT32", 4), 6: ("FLOAT32", 4), 7: ("BOOL", 1), 8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", 8), 11: ("INT64", 8), 12: ("FLOAT64", 8),
}
STRING, ARRAY, UINT32 = 8, 9, 4
_BOOL = 7
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
               10: "<Q", 11: "<q", 12: "<d"}


def invalid_model(msg: str) -> InvalidArgument:
    return InvalidArgument(msg, field="model")


def type_name(vtype: int) -> str:
    return VALUE_TYPES[vtype][0] if vtype in VALUE_TYPES else f"#{vtype}"


# ---- metadata values the loader sizes things by ------------------------------------------------

_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
_FLOAT_TYPES = {6, 12}
_NP_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}

# Architecture hyperparameters: key suffix -> (lowest, highest, may be a per-layer array). The
# bounds are far beyond any real model; they exist so that a flipped bit cannot make the loader
# loop over 2^31 layers or size a buffer by 2^40 heads before the shape checks run.
_HPARAMS = {
    "block_count": (1, 1 << 12, False),
    "embedding_length": (1, 1 << 20, False),
    "feed_forward_length": (0, 1 << 22, True),
    "attention.head_count": (1, 1 << 14, True),
    "attention.head_count_kv": (0, 1 << 14, True),
    "attention.key_length": (1, 1 << 16, False),
    "attention.value_length": (1, 1 << 16, False),
    "rope.dimension_count": (0, 1 << 16, False),
    "context_length": (1, 1 << 24, False),
    "vocab_size": (1, 1 << 24, False),
    "expert_count": (0, 1 << 12, False),
    "expert_used_count": (0, 1 << 12, False),
}


class HeaderValues:
    """Decodes values of a structurally checked header on demand (offsets are known to be safe)."""

    def __init__(self, buf, keys: dict[str, tuple[int, int]]):
        self.buf, self.keys = buf, keys

    def type_of(self, key: str) -> tuple[int, int | None] | None:
        """(value type, item type for arrays) of `key`, None when absent."""
        if key not in self.keys:
            return None
        vtype, pos = self.keys[key]
        return vtype, (struct.unpack_from("<I", self.buf, pos)[0] if vtype == ARRAY else None)

    def get(self, key: str):
        vtype, pos = self.keys[key]
        return self._decode(vtype, pos)[0]

    def count(self, key: str) -> int | None:
        """The item count of array `key` (nothing decoded), None when absent or not an array."""
        if key not in self.keys or self.keys[key][0] != ARRAY:
            return None
        return struct.unpack_from("<Q", self.buf, self.keys[key][1] + 4)[0]

    def _decode(self, vtype: int, pos: int):
        buf = self.buf
        if vtype == STRING:
            n = struct.unpack_from("<Q", buf, pos)[0]
            return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n
        if vtype != ARRAY:
            v = struct.unpack_from(_SCALAR_FMT[vtype], buf, pos)[0]
            return (bool(v) if vtype == _BOOL else v), pos + VALUE_TYPES[vtype][1]
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _NP_DTYPES:
            arr = np.frombuffer(buf, dtype=_NP_DTYPES[itype], count=count, offset=pos).copy()
            return arr, pos + count * VALUE_TYPES[itype][1]
        out = []
        for _ in range(count):
            v, pos = self._decode(itype, pos)
            out.append(v)
        return out, pos


def check_semantics(values: HeaderValues, tensors: list[TensorExtent]) -> None:
    """Checks the metadata that the loader turns into loop counts, divisors and lookups: the
    architecture's hyperparameters and the tokenizer's vocabulary, merges and special ids.
    Structural validity is already established; this turns nonsense values into clear refusals
    instead of a ZeroDivisionError, an hour-long loop or an exception deep inside a library."""
    arch_t = values.type_of("general.architecture")
    if arch_t is not None and arch_t[0] != STRING:
        raise invalid_model(f"metadata key general.architecture has type {type_name(arch_t[0])}, must be STRING")
    arch = values.get("general.architecture") if arch_t else None
    if arch:
        for suffix, (lo, hi, per_layer) in _HPARAMS.items():
            key = f"{arch}.{suffix}"
            t = values.type_of(key)
            if t is None:
                continue
            if t[0] in _INT_TYPES:
                nums = [int(values.get(key))]
            elif per_layer and t[0] == ARRAY and t[1] in _INT_TYPES:
                nums = [int(x) for x in values.get(key)]
                if not nums:
                    raise invalid_model(f"metadata key {key}: per-layer array is empty")
            else:
                what = type_name(t[0]) + (f" of {type_name(t[1])}" if t[1] is not None else "")
                raise invalid_model(f"metadata key {key} has type {what}, must be an integer")
            bad = next((n for n in nums if not lo <= n <= hi), None)
            if bad is not None:
                raise invalid_model(f"metadata key {key}: value {bad} is outside [{lo}, {hi}]")
        blocks = f"{arch}.block_count"
        if values.type_of(blocks) is not None and int(values.get(blocks)) > max(1, len(tensors)):
            # every layer has at least one tensor of its own
            raise invalid_model(f"metadata key {blocks}: {int(values.get(blocks))} layers but only {len(tensors)} tensors")
        for key in values.keys:
            if key.startswith(arch + ".") and values.keys[key][0] in _FLOAT_TYPES:
                v = float(values.get(key))
                if v != v or v in (float("inf"), float("-inf")):
                    raise invalid_model(f"metadata key {key}: value {v} is not finite")
    _check_tokenizer(values)


def _check_tokenizer(values: HeaderValues) -> None:
    t = values.type_of("tokenizer.ggml.tokens")
    if t is None:
        return
    if t != (ARRAY, STRING):
        raise invalid_model("metadata key tokenizer.ggml.tokens must be an array of strings")
    tokens = values.get("tokenizer.ggml.tokens")
    n = len(tokens)
    for key, kinds in (("tokenizer.ggml.token_type", _INT_TYPES), ("tokenizer.ggml.scores", _FLOAT_TYPES)):
        kt = values.type_of(key)
        if kt is None:
            continue
        if kt[0] != ARRAY or kt[1] not in kinds:
            raise invalid_model(f"metadata key {key} must be an array of {'integers' if kinds is _INT_TYPES else 'floats'}")
        m = len(values.get(key))
        if m != n:
            raise invalid_model(f"metadata key {key} has {m} entries for {n} tokens")
    for key in values.keys:
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            kt = values.type_of(key)
            if kt[0] not in _INT_TYPES:
                raise invalid_model(f"metadata key {key} has type {type_name(kt[0])}, must be an integer")
            tid = int(values.get(key))
            if not 0 <= tid < n and tid != -1 and tid != 0xFFFFFFFF:  # -1: "none", as llama.cpp writes it
                raise invalid_model(f"metadata key {key}: token id {tid} is outside the vocabulary (size {n})")
    mt = values.type_of("tokenizer.ggml.merges")
    if mt is None:
        return
    if mt != (ARRAY, STRING):
        raise invalid_model("metadata key tokenizer.ggml.merges must be an array of strings")
    model_t = values.type_of("tokenizer.ggml.model")
    if model_t is None or model_t[0] != STRING or values.get("tokenizer.ggml.model") != "gpt2":
        return
    # A BPE merge "a b" needs a, b and ab in the vocabulary; the tokenizers library refuses the
    # whole vocabulary with a generic exception otherwise.
    vocab = set(tokens)
    for i, merge in enumerate(values.get("tokenizer.ggml.merges")):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise invalid_model(f"tokenizer.ggml.merges[{i}] {merge[:40]!r} is not 'left right'")
        for piece in (left, right, left + right):
            if piece not in vocab:
                raise invalid_model(f"tokenizer.ggml.merges[{i}] {merge[:40]!r}: {piece[:40]!r} is not in the vocabulary")
