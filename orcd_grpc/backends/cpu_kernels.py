"""TEMPORARY stand-in for the numba kernel layer (branch h22k): same API, dequantizing NumPy.
Deleted when h22k is merged."""
from __future__ import annotations

import numpy as np

from .. import quants


class QWeight:
    def __init__(self, raw, qtype, shape):
        self.raw, self.qtype, self.shape = raw, quants.T(int(qtype)), tuple(int(s) for s in shape)
        self._f32 = None

    @property
    def nbytes(self):
        return int(self.raw.nbytes)

    def f32(self):
        if self._f32 is None:
            self._f32 = quants.dequantize(self.raw, self.qtype, self.shape)
        return self._f32


def supported(qtype) -> bool:
    return quants.T(int(qtype)) in quants.SUPPORTED and quants.T(int(qtype)) not in (quants.T.F32,)


def matmul(x, w: QWeight):
    return np.ascontiguousarray(x, np.float32) @ w.f32().T


def embed_rows(w: QWeight, ids):
    return w.f32()[np.asarray(ids)]


def dequantize(w: QWeight):
    return w.f32()
