"""Structural validation of an untrusted GGUF file, and the index of its header that GGUFModel
reads metadata through (`GGUFSummary.keys`, `HeaderValues`) instead of `gguf.GGUFReader`.

`gguf.GGUFReader` trusts the header: it sizes reads by the counts and lengths it finds, builds one
NumPy view per metadata item, recurses into nested arrays without a depth limit and computes tensor
sizes with wrapping uint64 arithmetic. A file of a few bytes can therefore make it allocate
gigabytes, recurse until the interpreter dies, or hand out tensor views that silently read past
the end of the data. `check_gguf` walks the same header with bounded reads over an mmap, checks
every count, length and offset against the file's real size and the configured limits, and raises
`InvalidArgument` naming the first thing that is wrong. Only then is the reader allowed in.

The layout followed is GGUF v2/v3 (little-endian): magic, version, tensor count, kv count, the
key/value pairs, the tensor infos, padding to `general.alignment`, then the tensor data.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import InvalidArgument
from .gguf_scan import scan_nonfinite
from .gguf_values import STRING, UINT32, VALUE_TYPES, HeaderValues, check_semantics, invalid_model, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Limits. Real models stay far below them (a 256k-entry vocabulary is the largest array seen in
# practice; chat templates are tens of KiB), while each one caps what a hostile header can make the
# reader allocate (it creates NumPy objects per metadata item, ~700 bytes of RSS each).
DEFAULT_MAX_TENSORS = 1 << 16
DEFAULT_MAX_KV = 1 << 16
DEFAULT_MAX_STRING = 1 << 20          # bytes of one metadata string (keys: MAX_KEY_BYTES)
# GGUFReader builds one NumPy view per array item: a 1 MiB file holding one 1M-item uint8 array
# costs it ~740 MB RSS and ~15 s. Real files: gemma-3's 262k vocabulary (tokens, scores, types)
# is 786k items, llama-3's tokens+merges ~540k. The caps leave room above those and bound what a
# small hostile file can make the reader allocate (~1.5 GB at DEFAULT_MAX_ITEMS).
DEFAULT_MAX_ARRAY = 1 << 20           # items of one metadata array
DEFAULT_MAX_ITEMS = 1 << 21           # metadata items in the whole file (all arrays together)
DEFAULT_MAX_FILE_BYTES = 1 << 40      # 1 TiB
MAX_KEY_BYTES = 65535                 # the GGUF spec's key limit
MAX_TENSOR_NAME_BYTES = 64            # ggml's GGML_MAX_NAME; llama.cpp refuses longer names
MAX_DIMS = 4                          # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4                   # nested arrays; the reader recurses once per level
MAX_ALIGNMENT = 1 << 16
MAX_ELEMENTS = 1 << 62                # below int64 overflow in the reader's np.prod

T = GGMLQuantizationType

@dataclass
class TensorExtent:
    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]       # ggml order (innermost first), as stored
    offset: int                 # absolute file offset of the data
    nbytes: int


@dataclass
class GGUFSummary:
    """What `check_gguf` established; handy for tests and for logging what was accepted."""
    version: int
    size: int
    alignment: int
    data_offset: int
    kv_count: int
    metadata_items: int
    tensors: list[TensorExtent] = field(default_factory=list)
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (value type, offset of the value)


class _Cursor:
    """Bounded little-endian reads over the mapped file; every read checks the remaining size."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise InvalidArgument(f"file is truncated: {what} at offset {self.pos} needs {n} bytes, "
                                  f"only {max(0, self.size - self.pos)} remain (file size {self.size})",
                                  field="model")

    def unpack(self, fmt: str, n: int, what: str):
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(b)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n


def check_gguf(path, *, max_tensors: int = DEFAULT_MAX_TENSORS, max_kv: int = DEFAULT_MAX_KV,
               max_string: int = DEFAULT_MAX_STRING, max_array: int = DEFAULT_MAX_ARRAY,
               max_items: int = DEFAULT_MAX_ITEMS, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
               scan_values: bool | None = None) -> GGUFSummary:
    """Validates the structure of the GGUF file at `path`; raises InvalidArgument if unsafe.

    scan_values: also scan float tensors (F32/F16/BF16 fully, quantized formats' scales) for
    NaN/Inf. None reads the ORCD_GGUF_SCAN environment variable ("0" turns it off; on otherwise),
    so the server's default can be changed without a code edit.
    """
    path = os.fspath(path)
    if scan_values is None:
        scan_values = os.environ.get("ORCD_GGUF_SCAN", "1").strip().lower() not in ("0", "false", "no", "off")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise InvalidArgument(f"cannot open {path}: {exc.strerror or exc}", field="path") from exc
    try:
        st = os.fstat(fd)
        import stat as _stat
        if not _stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{path} is not a regular file", field="path")
        size = st.st_size
        if size > max_file_bytes:
            raise invalid_model(f"file is {size} bytes, more than the limit of {max_file_bytes}")
        if size < 24:
            raise invalid_model(f"file is {size} bytes, too short for a GGUF header (24 bytes)")
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        summary = _check(mm, size, max_tensors=max_tensors, max_kv=max_kv, max_string=max_string,
                         max_array=max_array, max_items=max_items)
        if scan_values:
            scan_nonfinite(mm, summary.tensors)
        return summary
    finally:
        try:
            mm.close()
        except BufferError:
            pass  # a NumPy view is still held by an exception's traceback; the GC unmaps it



def _check(mm, size: int, *, max_tensors, max_kv, max_string, max_array, max_items) -> GGUFSummary:
    c = _Cursor(mm, size)
    magic = c.raw(4, "magic")
    if magic != GGUF_MAGIC:
        raise invalid_model(f"not a GGUF file: magic is {magic!r}, expected b'GGUF'")
    version = c.u32("version")
    if version & 0xFFFF == 0 and version != 0:
        raise invalid_model(f"big-endian GGUF files are not supported (version field 0x{version:08x})")
    if version not in SUPPORTED_VERSIONS:
        raise invalid_model(f"GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("kv count")
    if n_tensors > max_tensors:
        raise invalid_model(f"tensor count {n_tensors} exceeds the limit of {max_tensors}")
    if n_kv > max_kv:
        raise invalid_model(f"metadata kv count {n_kv} exceeds the limit of {max_kv}")
    # Cheapest possible entries: a kv with a 1-char key and a uint8 value is 8+1+4+1 bytes, a tensor
    # info with a 1-char name and one dim 8+1+4+8+4+8. Counts that cannot fit are rejected up front.
    if n_kv * 14 + n_tensors * 33 > size - c.pos:
        raise invalid_model(f"header claims {n_kv} metadata entries and {n_tensors} tensors, which cannot fit "
                   f"in a file of {size} bytes")

    keys: dict[str, tuple[int, int]] = {}  # key -> (value type, offset of the value)
    items = 0
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        start = c.pos
        key = _string(c, MAX_KEY_BYTES if max_string > MAX_KEY_BYTES else max_string, f"metadata key #{i}")
        if not key:
            raise invalid_model(f"metadata key #{i} at offset {start} is empty")
        if key in keys:
            raise invalid_model(f"metadata key {key!r} appears twice (second at offset {start})")
        vtype = c.u32(f"value type of {key}")
        keys[key] = (vtype, c.pos)
        if key == "general.alignment":
            if vtype != UINT32:
                raise invalid_model(f"metadata key general.alignment has type {type_name(vtype)}, must be UINT32")
            alignment = c.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
                raise invalid_model(f"general.alignment {alignment} must be a power of two between 1 and {MAX_ALIGNMENT}")
            items += 1
            continue
        items += _value(c, vtype, key, 0, max_string=max_string, max_array=max_array, max_items=max_items)
        if items > max_items:
            raise invalid_model(f"metadata has more than {max_items} items in total (limit reached at key {key!r})")

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = _string(c, MAX_TENSOR_NAME_BYTES, f"name of tensor #{i}")
        if not name:
            raise invalid_model(f"tensor #{i} has an empty name")
        if name in names:
            raise invalid_model(f"tensor {name} appears twice")
        names.add(name)
        n_dims = c.u32(f"n_dims of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise invalid_model(f"tensor {name}: n_dims is {n_dims}, must be 1..{MAX_DIMS}")
        dims = tuple(c.u64(f"dimension {d} of tensor {name}") for d in range(n_dims))
        n_elem = 1
        for d, ne in enumerate(dims):
            if ne == 0:
                raise invalid_model(f"tensor {name}: dimension {d} is 0")
            n_elem *= ne
            if n_elem > MAX_ELEMENTS:
                raise invalid_model(f"tensor {name}: dimensions {list(dims)} have more than 2^62 elements")
        raw_type = c.u32(f"type of tensor {name}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise invalid_model(f"tensor {name}: unknown GGML type {raw_type}") from None
        if dims[0] % block:
            raise invalid_model(f"tensor {name}: row length {dims[0]} is not a multiple of the {qtype.name} "
                       f"block size {block}")
        rel = c.u64(f"data offset of tensor {name}")
        infos.append((name, qtype, dims, rel, n_elem // block * type_size))

    data_offset = c.pos + (-c.pos % alignment)
    if infos and data_offset > size:
        raise invalid_model(f"tensor data would start at offset {data_offset}, past the end of the file (size {size})")

    tensors = []
    for name, qtype, dims, rel, nbytes in infos:
        if rel % alignment:
            raise invalid_model(f"tensor {name}: data offset {rel} is not a multiple of general.alignment {alignment}")
        start = data_offset + rel
        end = start + nbytes
        if end > size:
            raise invalid_model(f"tensor {name}: data [{start}, {end}) extends past the end of the file (size {size})")
        tensors.append(TensorExtent(name, qtype, dims, start, nbytes))
    ordered = sorted(tensors, key=lambda t: (t.offset, t.nbytes))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise invalid_model(f"tensor {cur.name}: data [{cur.offset}, {cur.offset + cur.nbytes}) overlaps tensor "
                       f"{prev.name} [{prev.offset}, {prev.offset + prev.nbytes})")
    check_semantics(HeaderValues(mm, keys), tensors)
    return GGUFSummary(version=version, size=size, alignment=alignment, data_offset=data_offset,
                       kv_count=n_kv, metadata_items=items, tensors=tensors, keys=keys)


def _string(c: _Cursor, limit: int, what: str) -> str:
    n = c.u64(f"length of {what}")
    if n > limit:
        raise invalid_model(f"{what}: string length {n} exceeds the limit of {limit} bytes")
    data = c.raw(n, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_model(f"{what}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _value(c: _Cursor, vtype: int, key: str, depth: int, *, max_string: int, max_array: int,
           max_items: int = DEFAULT_MAX_ITEMS) -> int:
    """Skips one value of `vtype`, checking it; returns how many metadata items it holds."""
    if vtype not in VALUE_TYPES:
        raise invalid_model(f"metadata key {key!r}: unknown value type {vtype}")
    size = VALUE_TYPES[vtype][1]
    if size is not None:
        c.skip(size, f"value of {key}")
        return 1
    if vtype == STRING:
        _string(c, max_string, f"value of {key}")
        return 1
    # array
    if depth >= MAX_ARRAY_DEPTH:
        raise invalid_model(f"metadata key {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
    itype = c.u32(f"item type of array {key}")
    count = c.u64(f"length of array {key}")
    if itype not in VALUE_TYPES:
        raise invalid_model(f"metadata key {key!r}: array of unknown value type {itype}")
    if count > max_array:
        raise invalid_model(f"metadata key {key!r}: array length {count} exceeds the limit of {max_array}")
    isize = VALUE_TYPES[itype][1]
    if isize is not None:
        c.skip(count * isize, f"{count} {type_name(itype)} items of array {key}")
        return max(1, count)
    # strings are >= 8 bytes and arrays >= 12: reject counts the rest of the file cannot hold
    # before looping over them
    least = 8 if itype == STRING else 12
    if count * least > c.size - c.pos:
        raise invalid_model(f"metadata key {key!r}: array of {count} {type_name(itype)} items cannot fit in the "
                   f"{c.size - c.pos} bytes left in the file")
    if itype == STRING:
        _string_array(c, count, key, max_string)
        return 1 + count
    total = 1
    for j in range(count):
        total += _value(c, itype, f"{key}[{j}]", depth + 1, max_string=max_string, max_array=max_array,
                        max_items=max_items)
        if total > max_items:
            raise invalid_model(f"metadata key {key!r}: nested arrays hold more than {max_items} items")
    return total


def _string_array(c: _Cursor, count: int, key: str, max_string: int) -> None:
    """The hot loop of a vocabulary (hundreds of thousands of strings): lengths are walked with
    local variables only, and UTF-8 is checked once over the joined bytes. That is equivalent to
    checking each string because none may start with a continuation byte (0x80-0xBF): a
    multi-byte sequence then cannot straddle two strings."""
    buf, size, pos = c.buf, c.size, c.pos
    unpack = struct.unpack_from
    spans = []
    for j in range(count):
        if pos + 8 > size:
            c.pos = pos
            c.need(8, f"length of item {j} of array {key}")
        n = unpack("<Q", buf, pos)[0]
        pos += 8
        if n > max_string:
            raise invalid_model(f"item {j} of array {key}: string length {n} exceeds the limit of {max_string} bytes")
        if pos + n > size:
            c.pos = pos
            c.need(n, f"item {j} of array {key}")
        if n and 0x80 <= buf[pos] <= 0xBF:
            raise invalid_model(f"item {j} of array {key}: not valid UTF-8 (starts with a continuation byte)")
        spans.append((pos, pos + n))
        pos += n
    if spans:
        joined = b"".join(buf[a:b] for a, b in spans)
        try:
            joined.decode("utf-8")
        except UnicodeDecodeError as exc:
            at, j = exc.start, 0
            for j, (a, b) in enumerate(spans):  # map the byte position back to the item
                if at < b - a:
                    break
                at -= b - a
            raise invalid_model(f"item {j} of array {key}: not valid UTF-8 ({exc.reason})") from None
    c.pos = pos
