#!/usr/bin/env python3
"""Times the CPU kernels (orcd_grpc/backends/cpu_kernels.py) at SmolLM2-135M's shapes.

usage: python3 bench/cpu_kernels.py [--types Q4_1,Q8_0,...] [--m 1,64] [--threads 1,2] [--reps N]
       python3 bench/cpu_kernels.py --model FILE.gguf [--threads 1,2]

For each type, shape, m and thread count: the best and the median of N timed calls of
cpu_kernels.matmul (best: the machine is shared, and the best call is the one least disturbed),
and the process CPU time per call (all threads; with one thread, the time the call would take on
an idle core). Block formats round x to 16 bits first (the "x" column: x16), F16/BF16 take float x
("f32").
--model: every 2-D weight of a GGUF file once with m = 1, as one decode step's products
(embedding table included when it doubles as the output matrix), in milliseconds per token.
Weights are random blocks with sane scales; a small matrix is replicated over enough copies
(a different one each call) that the working set exceeds the last-level cache, so the figures are
DRAM figures, as in a decode step, where the whole model streams through once per token.
Prints GB/s (weight bytes / time) and GFLOP/s (2*m*n*k / time); `--ref` adds NumPy float32
(OpenBLAS) on the dequantized matrix for comparison.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numba  # noqa: E402
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from orcd_grpc.backends import cpu_kernels as ck  # noqa: E402

# (tensor, n, k) of SmolLM2-135M: hidden 576, ffn 1536, vocab 49152 (the tied output matrix); 576 is
# not a multiple of a K-quant's 256 values, so those run Gemma-3-270M's attn_output and ffn_down
SHAPES = [("attn_q/o", 576, 576), ("ffn_gate/up", 1536, 576), ("ffn_down", 576, 1536), ("output", 49152, 576),
          ("g3.attn_out", 640, 1024), ("g3.ffn_down", 640, 2048)]
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4", "F16", "BF16", "F32"]
WORKING_SET = 64 << 20  # bytes of weights cycled through: well above an 8 MiB L3


def random_raw(qt: T, n: int, k: int, rng) -> np.ndarray:
    bs, ts = GGML_QUANT_SIZES[qt]
    if qt == T.F32:
        return rng.standard_normal((n, k), dtype=np.float32).view(np.uint8)
    if qt in (T.F16, T.BF16):
        return (rng.standard_normal((n, k)).astype(np.float16) if qt == T.F16
                else (rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)).view(np.uint8)
    raw = rng.integers(0, 256, size=(n * k // bs, ts), dtype=np.uint8)
    # every f16 field a small finite scale (a random bit pattern may be inf or nan)
    offs = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q2_K: (80, 82),
            T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}.get(qt, ())
    for o in offs:
        raw[:, o:o + 2] = rng.uniform(1e-3, 1e-2, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qt == T.MXFP4:
        raw[:, 0] = rng.integers(110, 130, raw.shape[0])
    return raw.reshape(n, -1)


def timed(fn, reps: int) -> tuple[float, float, float]:
    """(best, median) wall seconds and CPU seconds per call."""
    fn()
    ts = []
    c0 = time.process_time()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts)), (time.process_time() - c0) / reps


def model_step(path: str, threads, reps: int) -> None:
    import gguf

    from orcd_grpc import quants

    r = gguf.GGUFReader(path)
    names = {t.name for t in r.tensors}
    ws = [ck.QWeight(t.data, t.tensor_type, quants.ggml_shape(t)) for t in r.tensors
          if len(t.shape) == 2 and (t.name != "token_embd.weight" or "output.weight" not in names)]
    total = sum(w.nbytes for w in ws)
    xs = {w.shape[1]: np.random.default_rng(0).standard_normal((1, w.shape[1]), dtype=np.float32) for w in ws}
    print(f"{path}: {len(ws)} matrices, {total / 1e6:.1f} MB")
    for th in threads:
        numba.set_num_threads(th)
        best, med, cpu = timed(lambda: [ck.matmul(xs[w.shape[1]], w) for w in ws], reps)
        print(f"  threads {th}: best {best * 1e3:.1f} ms ({1 / best:.1f} tok/s, "
              f"{total / best / 1e9:.2f} GB/s), median {med * 1e3:.1f} ms, CPU {cpu * 1e3:.1f} ms per step",
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--m", default="1,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="", help="substring filter on tensor names")
    ap.add_argument("--ref", action="store_true", help="also time NumPy float32 x @ W.T")
    ap.add_argument("--model", help="time one decode step's products of this GGUF file instead")
    a = ap.parse_args(argv)
    if a.model:
        model_step(a.model, [int(v) for v in a.threads.split(",")], a.reps)
        return 0
    rng = np.random.default_rng(0)
    print(f"numba {numba.__version__}, threading layer {numba.config.THREADING_LAYER}, "
          f"{numba.config.NUMBA_NUM_THREADS} threads available")
    big = rng.standard_normal(WORKING_SET // 4, dtype=np.float32)
    best, _, _ = timed(big.sum, 5)
    print(f"memory read ceiling, one thread (NumPy sum of {WORKING_SET >> 20} MiB): {big.nbytes / best / 1e9:.2f} GB/s")
    print(f"{'type':6} {'tensor':12} {'n x k':>11} {'m':>3} {'x':>3} {'thr':>3} {'best us':>9} {'med us':>9} "
          f"{'CPU us':>9} {'GB/s':>6} {'GFLOP/s':>7}")
    for name in a.types.split(","):
        qt = T[name]
        for tensor, n, k in SHAPES:
            if a.shapes not in tensor or tensor.startswith("g3.") != (GGML_QUANT_SIZES[qt][0] == 256):
                continue
            one = ck.QWeight(random_raw(qt, n, k, rng), qt, (n, k))
            copies = [one] + [ck.QWeight(random_raw(qt, n, k, rng), qt, (n, k))
                              for _ in range(max(0, -(-WORKING_SET // one.nbytes) - 1))]
            for m in (int(v) for v in a.m.split(",")):
                x = rng.standard_normal((m, k), dtype=np.float32)
                xk = "f32" if qt in (T.F32, T.F16, T.BF16) else "x16"
                for th in (int(v) for v in a.threads.split(",")):
                    numba.set_num_threads(th)
                    it = iter(range(10**9))
                    best, med, cpu = timed(lambda: ck.matmul(x, copies[next(it) % len(copies)]), a.reps)
                    print(f"{name:6} {tensor:12} {n:>5}x{k:<5} {m:>3} {xk:>3} {th:>3} "
                          f"{best * 1e6:9.1f} {med * 1e6:9.1f} {cpu * 1e6:9.1f} "
                          f"{one.nbytes / best / 1e9:6.2f} {2 * m * n * k / best / 1e9:7.2f}", flush=True)
                if a.ref:
                    wf = [ck.dequantize(c) for c in copies[:4]]
                    it = iter(range(10**9))
                    best, med, cpu = timed(lambda: x @ wf[next(it) % len(wf)].T, a.reps)
                    print(f"{'numpy':6} {tensor:12} {n:>5}x{k:<5} {m:>3} {'f32':>3} {'-':>3} {best * 1e6:9.1f} "
                          f"{med * 1e6:9.1f} {cpu * 1e6:9.1f} {n * k * 4 / best / 1e9:6.2f} "
                          f"{2 * m * n * k / best / 1e9:7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
