"""A device tensor: a pointer into VRAM with a shape and a dtype, nothing more.

Kernels receive raw pointers, so the type only has to carry what the host needs to launch them
(pointer, element count, shape) and to keep the memory alive: `owner` is the allocation (a
workspace block or a persistent buffer) that every view of it shares; the memory goes back when
the last view is dropped.
"""
from __future__ import annotations

import math

import numpy as np


class CudaTensor:
    __slots__ = ("ptr", "shape", "dtype", "owner", "q8")

    def __init__(self, ptr: int, shape, dtype=np.float32, owner=None, q8=None):
        self.ptr = int(ptr)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.owner = owner
        # (int8 copy, its scales per 32 elements) when the producing kernel also wrote the int8
        # rounding the int8 GEMVs take (ORCD_FUSE_Q8); both tensors, so their memory lives as long
        self.q8 = q8

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __int__(self) -> int:
        return self.ptr

    def reshape(self, *shape) -> "CudaTensor":
        """A view with another shape (row-major, contiguous: no copy). One -1 is inferred."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if shape.count(-1) > 1:
            raise ValueError("only one dimension may be -1")
        if -1 in shape:
            rest = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = self.size // rest if rest else 0
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {tuple(shape)}")
        return CudaTensor(self.ptr, shape, self.dtype, self.owner, self.q8)

    def row_slice(self, start: int, stop: int) -> "CudaTensor":
        """Rows [start, stop) of the outermost dimension: still contiguous, so still a view."""
        inner = math.prod(self.shape[1:])
        return CudaTensor(self.ptr + start * inner * self.dtype.itemsize,
                          (stop - start, *self.shape[1:]), self.dtype, self.owner)

    def __repr__(self) -> str:
        return f"CudaTensor(0x{self.ptr:x}, shape={self.shape}, dtype={self.dtype.name})"
