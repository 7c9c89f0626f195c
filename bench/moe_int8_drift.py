#!/usr/bin/env python3
"""How far int8 rounding of the MoE experts' inputs moves a model's logits, on the CPU: the NumPy
engine as it is, against the same engine with each expert input (x, and the activation before the
down projection) rounded as quantize_x8 rounds it (a scale max|v| / 127 a 32-block), in prompt steps
only (ORCD_MOE_INT8_PROMPT) or in every step. The measure is the GPU tests': max |diff| / max |ref|
over the logits of a 32-token prefill and 16 decode steps; also how many tokens went to other
experts (a router near-tie that the rounding upstream flipped).

    python3 bench/moe_int8_drift.py MODEL.gguf [--draws 16] [--all-steps]
(MODEL: an MoE file such as the tiny gpt_oss-Q8_0.gguf that `python3 tests/gpu/test_cuda_architectures.py
.dev/tiny` writes, with transformers installed)
"""
from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import numpy as np

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")]

from orcd_grpc.backends import numpy_backend as nb  # noqa: E402
from orcd_grpc.gguf_model import GGUFModel  # noqa: E402
from tiny_models import N_DECODE, N_PROMPT, engine_logits  # noqa: E402


def q8(x: np.ndarray) -> np.ndarray:
    """x rounded as quantize_x8 rounds it, back in float32."""
    b = np.asarray(x, np.float64).reshape(-1, 32)
    m = np.abs(b).max(axis=1, keepdims=True)
    d = np.where(m > 0, m / 127, 1.0)
    return (np.rint(b / d) * np.where(m > 0, d, 0.0)).reshape(np.shape(x)).astype(np.float32)


class _RoundedDown:
    """Expert down weights [E, d, F] whose products take the activation's rounding: NumpyBackend.moe's
    `a @ w_down[e].T` becomes q8(a) @ w_down[e].T."""

    __array_ufunc__ = None  # a @ this: numpy defers to __rmatmul__

    def __init__(self, w):
        self.w, self.shape = w, w.shape

    def __getitem__(self, e):
        return SimpleNamespace(T=_RoundedProduct(self.w[e].T))


class _RoundedProduct:
    __array_ufunc__ = None

    def __init__(self, wt):
        self.wt = wt

    def __rmatmul__(self, a):
        return q8(a) @ self.wt


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--all-steps", action="store_true", help="decode steps too (ORCD_MOE_INT8's side)")
    args = ap.parse_args(argv)
    plain = nb.NumpyBackend.moe
    experts: list = []

    def moe(self, x, router_logits, k, w_gate, w_up, w_down, *biases, rounded=False, **kw):
        """NumpyBackend.moe itself, noting each token's experts; rounded: on x's rounding, and its down
        projection on the activation's (_RoundedDown)."""
        experts.append(np.sort(np.argsort(-router_logits, axis=-1, kind="stable")[:, :k], axis=1))
        if rounded and (x.shape[0] > 1 or args.all_steps):
            x, w_down = q8(x), _RoundedDown(w_down)
        return plain(self, x, router_logits, k, w_gate, w_up, w_down, *biases, **kw)

    vocab = GGUFModel.logical_shape(GGUFModel(args.model).tensor("token_embd.weight"))[0]
    rows = []
    for draw in range(args.draws):
        ids = np.random.default_rng(draw).integers(0, vocab, N_PROMPT + N_DECODE)
        runs = []
        for rounded in (False, True):
            experts.clear()
            nb.NumpyBackend.moe = lambda self, *a, _r=rounded, **kw: moe(self, *a, rounded=_r, **kw)
            runs.append((engine_logits(args.model, ids, "numpy"), list(experts)))
        nb.NumpyBackend.moe = plain
        (ref, e0), (got, e1) = runs
        moved = sum(int((a != b).any(axis=1).sum()) for a, b in zip(e0, e1))
        rows.append((float((np.abs(got - ref) / np.abs(ref).max()).max()), moved))
        print(f"draw {draw}: rel {rows[-1][0]:.4f}, tokens on other experts {moved}", flush=True)
    rel = np.array([r for r, _ in rows])
    print(f"{os.path.basename(args.model)} {'every step' if args.all_steps else 'prompt steps'}: median rel "
          f"{np.median(rel):.4f}, max {rel.max():.4f}; draws with a token on other experts "
          f"{sum(m > 0 for _, m in rows)} of {len(rows)}, their rel {[round(r, 4) for r, m in rows if m]}")


if __name__ == "__main__":
    main()
