"""A GGUF file opened for serving: metadata and memory-mapped tensors.

The header is read once, by gguf_guard's bounded parser, which also records where each metadata
value lies; values are decoded from the map when asked for. gguf's GGUFReader is not used here:
it builds a NumPy view per array item, about 160 MiB of Python objects for SmolLM2's 49k-token
vocabulary and 680 MiB for Gemma 3's 262k, held as long as the model is served. Tensors are
gguf's own `ReaderTensor`s (same data views, shapes and types), so the rest of the loader and
gguf's `dequantize` see what GGUFReader would give.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping

import numpy as np
from gguf import GGMLQuantizationType, ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

from .errors import InvalidArgument
from .gguf_guard import TensorExtent, check_gguf
from .gguf_values import HeaderValues

_T = GGMLQuantizationType
# element types GGUFReader gives a tensor's data; every other type is its bytes, one row of blocks each
_ELEMENT = {_T.F32: np.float32, _T.F16: np.float16, _T.F64: np.float64, _T.I8: np.int8, _T.I16: np.int16,
            _T.I32: np.int32, _T.I64: np.int64}


class Metadata(Mapping):
    """key -> value, decoded from the map on each lookup (nothing large stays decoded): strings as
    str, numbers as int/float/bool, arrays of strings as lists, numeric arrays as NumPy arrays."""

    def __init__(self, values: HeaderValues):
        self._values = values

    def __getitem__(self, key: str):
        if key not in self._values.keys:
            raise KeyError(key)
        return self._values.get(key)

    def __contains__(self, key) -> bool:
        return key in self._values.keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._values.keys)

    def __len__(self) -> int:
        return len(self._values.keys)

    def count(self, key: str) -> int | None:
        """Items of array `key` without decoding them; None when absent or not an array."""
        return self._values.count(key)


def _tensor(data: np.memmap, t: TensorExtent) -> ReaderTensor:
    np_dims = tuple(int(d) for d in reversed(t.dims))
    dtype = _ELEMENT.get(t.qtype)
    if dtype is None:
        dtype, np_dims = np.uint8, quant_shape_to_byte_shape(np_dims, t.qtype)
    view = data[t.offset:t.offset + t.nbytes].view(dtype).reshape(np_dims)
    return ReaderTensor(name=t.name, tensor_type=t.qtype, shape=np.array(t.dims, dtype=np.uint64),
                        n_elements=math.prod(int(d) for d in t.dims), n_bytes=t.nbytes, data_offset=t.offset,
                        data=view, field=None)


class GGUFModel:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        summary = check_gguf(self.path)  # bounded structural check first; it also indexes the header
        try:
            self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot map the file: {exc}", field="path") from exc
        self.fields = Metadata(HeaderValues(self.data, summary.keys))
        self.tensors = {t.name: _tensor(self.data, t) for t in summary.tensors}  # in the file's order
        arch = self.meta("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise InvalidArgument("general.architecture is missing", field="general.architecture")
        self.arch = arch

    def meta(self, key: str, default=None):
        """A metadata value as GGUFReader's contents() gives it (arrays as lists), or default."""
        if key not in self.fields:
            return default
        try:
            value = self.fields[key]
        except Exception as exc:
            raise InvalidArgument(f"cannot decode metadata value: {exc}", field=key) from exc
        return value.tolist() if isinstance(value, np.ndarray) else value

    def hp(self, name: str, default=None):
        """An architecture hyperparameter, e.g. hp("block_count") reads "<arch>.block_count"."""
        return self.meta(f"{self.arch}.{name}", default)

    def require(self, name: str):
        value = self.hp(name)
        if value is None:
            raise InvalidArgument("required metadata key is missing", field=f"{self.arch}.{name}")
        return value

    def tensor(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise InvalidArgument("required tensor is missing", field=name) from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    @staticmethod
    def logical_shape(t) -> tuple[int, ...]:
        """Outermost dimension first (GGUF stores ne innermost first)."""
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    def parameters(self) -> int:
        return int(sum(int(t.n_elements) for t in self.tensors.values()))

    def tensor_types(self) -> dict[str, int]:
        return dict(Counter(t.tensor_type.name for t in self.tensors.values()))

    def tensor_bytes(self) -> int:
        return int(sum(int(t.n_bytes) for t in self.tensors.values()))

    def name(self) -> str:
        return str(self.meta("general.name", "") or "")

    def close(self) -> None:
        mm = getattr(self.data, "_mmap", None)
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):
                pass  # still referenced by a dequantized view; the GC releases it later
