"""Values from a GGUF file's metadata without GGUFReader.contents(), which on a 262k-token
vocabulary takes tens of seconds: from a reader's parts directly (`field_value`), or parsed from the
file header for a set of key prefixes (`read_gguf_metadata`). The tokenizer reads its vocabulary
through these.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np

from .errors import InvalidArgument


def field_value(field) -> Any:
    """A gguf ReaderField's value as plain Python / NumPy, without per-element contents()."""
    from gguf import GGUFValueType as T

    types = field.types
    if not types:
        return None
    if types[0] == T.ARRAY:
        if len(types) < 2:
            return []
        if types[1] == T.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return np.zeros(0)
        return np.concatenate([np.asarray(field.parts[i]).reshape(-1) for i in field.data])
    part = field.parts[field.data[0]]
    if types[0] == T.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    if types[0] == T.BOOL:
        return bool(part[0])
    value = part[0]
    return float(value) if types[0] in (T.FLOAT32, T.FLOAT64) else int(value)


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
       11: "<i8", 12: "<f8"}


def read_gguf_metadata(path: str | os.PathLike,
                       prefix: str | tuple[str, ...] = ("tokenizer.", "general.name")) -> dict[str, Any]:
    """Metadata values whose key starts with `prefix` (or one of them), read from a GGUF header
    (little endian). general.name: llama.cpp keys some vocabulary rules on the model's name."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise InvalidArgument("not a GGUF file (bad magic)", field="path")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version < 2:
            raise InvalidArgument(f"GGUF version {version} is not supported", field="path")
        _n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24

        def read_str(o: int) -> tuple[bytes, int]:
            (n,) = struct.unpack_from("<Q", buf, o)
            return buf[o + 8:o + 8 + n], o + 8 + n

        def skip_or_read(vtype: int, o: int, want: bool):
            if vtype == 8:
                s, o = read_str(o)
                return (s.decode("utf-8", errors="replace") if want else None), o
            if vtype in _SCALAR:
                size = struct.calcsize(_SCALAR[vtype])
                return (struct.unpack_from(_SCALAR[vtype], buf, o)[0] if want else None), o + size
            if vtype == 9:
                itype, n = struct.unpack_from("<IQ", buf, o)
                o += 12
                if itype in _NP:
                    dt = np.dtype(_NP[itype])
                    arr = np.frombuffer(buf, dtype=dt, count=n, offset=o).copy() if want else None
                    return arr, o + n * dt.itemsize
                items = []
                for _ in range(n):
                    item, o = skip_or_read(itype, o, want)
                    items.append(item)
                return (items if want else None), o
            raise InvalidArgument(f"unknown GGUF value type {vtype}", field="path")

        out = {}
        for _ in range(n_kv):
            key_b, off = read_str(off)
            key = key_b.decode("utf-8", errors="replace")
            (vtype,) = struct.unpack_from("<I", buf, off)
            want = key.startswith(prefix)
            value, off = skip_or_read(vtype, off + 4, want)
            if want:
                out[key] = value
        return out
