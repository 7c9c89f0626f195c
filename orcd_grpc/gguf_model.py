"""A GGUF file opened for serving: metadata and memory-mapped tensors, read with `gguf`."""
from __future__ import annotations

import os
from collections import Counter

import gguf
import numpy as np

from .errors import InvalidArgument
from .gguf_guard import check_gguf


class GGUFModel:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        check_gguf(self.path)  # bounded structural check first: the reader trusts the header
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # gguf raises ValueError/struct.error/IndexError on bad files
            raise InvalidArgument(f"not a readable GGUF file: {exc}", field="path") from exc
        self.fields = self.reader.fields
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.meta("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise InvalidArgument("general.architecture is missing", field="general.architecture")
        self.arch = arch

    def meta(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:
            raise InvalidArgument(f"cannot decode metadata value: {exc}", field=key) from exc

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
        return int(sum(int(t.n_elements) for t in self.reader.tensors))

    def tensor_types(self) -> dict[str, int]:
        return dict(Counter(t.tensor_type.name for t in self.reader.tensors))

    def tensor_bytes(self) -> int:
        return int(sum(int(t.n_bytes) for t in self.reader.tensors))

    def name(self) -> str:
        return str(self.meta("general.name", "") or "")

    def close(self) -> None:
        mm = getattr(self.reader, "data", None)
        if isinstance(mm, np.memmap) and getattr(mm, "_mmap", None) is not None:
            try:
                mm._mmap.close()
            except (BufferError, ValueError):
                pass  # still referenced by a dequantized view; the GC releases it later
