#!/usr/bin/env python3
"""How far int8 rounding of the MoE experts' inputs moves a model's logits, on the CPU: the NumPy
engine as it is, against the same engine with each expert input (x, and the activation before the
down projection) rounded as quantize_x8 rounds it (a scale max|v| / 127 a 32-block), in prompt steps
only (ORCD_MOE_INT8_PROMPT) or in every step. The measure is the GPU tests': max |diff| / max |ref|
over the logits of a 32-token prefill and 16 decode steps; also how many tokens went to other
experts (a router near-tie that the rounding upstream flipped).

    python3 bench/moe_int8_drift.py MODEL.gguf [--draws 16] [--all-steps]
(MODEL: an MoE file such as tests/gpu/test_cuda_architectures.py's tiny gpt_oss-Q8_0.gguf)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")]

from orcd_grpc.backends import numpy_backend as nb  # noqa: E402
from tiny_models import N_DECODE, N_PROMPT, engine_logits  # noqa: E402


def q8(x: np.ndarray) -> np.ndarray:
    """x rounded as quantize_x8 rounds it, back in float32."""
    b = np.asarray(x, np.float64).reshape(-1, 32)
    m = np.abs(b).max(axis=1, keepdims=True)
    d = np.where(m > 0, m / 127, 1.0)
    return (np.rint(b / d) * np.where(m > 0, d, 0.0)).reshape(np.shape(x)).astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--all-steps", action="store_true", help="decode steps too (ORCD_MOE_INT8's side)")
    args = ap.parse_args(argv)
    plain = nb.NumpyBackend.moe
    experts: list = []

    def moe(self, x, router_logits, k, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, *,
            act="silu", alpha=1.702, limit=7.0, rounded=False):
        experts.append(np.sort(np.argsort(-router_logits, axis=-1, kind="stable")[:, :k], axis=1))
        if not rounded or (x.shape[0] == 1 and not args.all_steps):
            return plain(self, x, router_logits, k, w_gate, w_up, w_down, b_gate, b_up, b_down, act=act,
                         alpha=alpha, limit=limit)
        # the float engine's own steps with the two expert inputs rounded (plain(...) on rounded x
        # would not reach the activation)
        ids = np.argsort(-router_logits, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(router_logits, ids, axis=-1)
        p = np.exp(top - top.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out = np.zeros((x.shape[0], w_down.shape[1]), np.float32)
        xq = q8(x)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            g = xq[rows] @ w_gate[e].T + (b_gate[e] if b_gate is not None else 0)
            u = xq[rows] @ w_up[e].T + (b_up[e] if b_up is not None else 0)
            if act == "swiglu_oai":
                g, u = np.minimum(g, np.float32(limit)), np.clip(u, -np.float32(limit), np.float32(limit))
                a = g / (1.0 + np.exp(-np.float32(alpha) * g)) * (u + 1.0)
            else:
                a = g / (1.0 + np.exp(-g)) * u
            y = q8(a) @ w_down[e].T + (b_down[e] if b_down is not None else 0)
            np.add.at(out, rows, y * p[rows, slot][:, None])
        return out

    vocab = None
    rows = []
    for draw in range(args.draws):
        runs = []
        for rounded in (False, True):
            experts.clear()
            nb.NumpyBackend.moe = lambda self, *a, _r=rounded, **kw: moe(self, *a, rounded=_r, **kw)
            if vocab is None:
                vocab = engine_logits(args.model, np.zeros(N_PROMPT + N_DECODE, np.int64), "numpy").shape[1]
            ids = np.random.default_rng(draw).integers(0, vocab, N_PROMPT + N_DECODE)
            experts.clear()
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
