"""NaN/Inf scans of a GGUF file's tensor data, and giving a file map's pages back.

`check_gguf` runs `scan_nonfinite` over a mapped file once its header has passed the structural
checks (gguf_guard.py); the CPU backend uses `drop_pages` as it copies weights out of the map.
"""
from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import InvalidArgument

if TYPE_CHECKING:
    from .gguf_guard import TensorExtent

T = GGMLQuantizationType


def _bad_tensor(msg: str) -> InvalidArgument:
    return InvalidArgument(msg, field="model")  # as gguf_guard's own refusals

# Byte offsets of the f16 scale fields inside one block of each quantized format (ggml-common.h).
# A NaN/Inf scale poisons every value of its block, so scanning only these is enough to find a
# broken quantized tensor without decoding it. Formats without an f16 scale (IQ1_M packs it into
# its scales, Q8_1's layout differs between ggml versions) are not scanned.
_F16_SCALE_OFFSETS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.TQ1_0: (52,), T.TQ2_0: (64,),
}
_SCAN_CHUNK = 1 << 24  # bytes per NumPy pass, so scanning a large tensor needs no large buffer


def scan_nonfinite(buf, tensors: list[TensorExtent]) -> None:
    """Raises InvalidArgument naming the first float tensor holding a NaN or Inf.

    Works on the raw bits (exponent all ones) rather than converting to float: no FP warnings, no
    float copies, and BF16 needs no conversion at all.
    """
    for t in tensors:
        if t.qtype == T.F32:
            _scan_words(buf, t, np.uint32, 0x7F800000, "value")
        elif t.qtype == T.F16:
            _scan_words(buf, t, np.uint16, 0x7C00, "value")
        elif t.qtype == T.BF16:
            _scan_words(buf, t, np.uint16, 0x7F80, "value")
        elif t.qtype == T.F64:
            _scan_words(buf, t, np.uint64, 0x7FF0000000000000, "value")
        elif t.qtype == T.Q8_K:
            _scan_blocks(buf, t, 0, np.uint32, 0x7F800000)
        elif t.qtype in _F16_SCALE_OFFSETS:
            for off in _F16_SCALE_OFFSETS[t.qtype]:
                _scan_blocks(buf, t, off, np.uint16, 0x7C00)


def drop_pages(buf, offset: int, length: int) -> bool:
    """Gives back a file map's pages of [offset, offset + length) (a read-only map: they fault in
    again if read). The scan and the CPU backend's weight copies read whole files through maps;
    kept, those pages would add the file's size to resident memory until the map is closed.
    False where buf is no mmap or the kernel refuses."""
    if not isinstance(buf, mmap.mmap) or length <= 0:
        return False
    start = offset - offset % mmap.PAGESIZE
    try:
        buf.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def _scan_words(buf, t: TensorExtent, dtype, exp_mask: int, what: str) -> None:
    item = np.dtype(dtype).itemsize
    count = t.nbytes // item
    step = _SCAN_CHUNK // item
    mask = dtype(exp_mask)
    for first in range(0, count, step):
        n = min(step, count - first)
        w = np.frombuffer(buf, dtype=f"<u{item}", count=n, offset=t.offset + first * item)
        bad = np.flatnonzero((w & mask) == mask)
        del w
        drop_pages(buf, t.offset + first * item, n * item)
        if bad.size:
            raise _bad_tensor(f"tensor {t.name}: {what} {first + int(bad[0])} is NaN or Inf")


def _scan_blocks(buf, t: TensorExtent, field_off: int, dtype, exp_mask: int) -> None:
    _, block_bytes = GGML_QUANT_SIZES[t.qtype]
    n_blocks = t.nbytes // block_bytes
    step = max(1, _SCAN_CHUNK // block_bytes)
    item = np.dtype(dtype).itemsize
    mask = dtype(exp_mask)
    for first in range(0, n_blocks, step):
        n = min(step, n_blocks - first)
        raw = np.frombuffer(buf, dtype=np.uint8, count=n * block_bytes, offset=t.offset + first * block_bytes)
        words = raw.reshape(n, block_bytes)[:, field_off:field_off + item].copy().view(f"<u{item}").ravel()
        del raw
        drop_pages(buf, t.offset + first * block_bytes, n * block_bytes)
        bad = np.flatnonzero((words & mask) == mask)
        if bad.size:
            raise _bad_tensor(f"tensor {t.name}: the scale of block {first + int(bad[0])} is NaN or Inf "
                       f"({t.qtype.name} scale at byte {field_off} of the block)")
