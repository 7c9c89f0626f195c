#!/usr/bin/env python3
"""The fused tensor-core GEMM against the cuBLAS path (cuda_blas.py) for the dense matmuls of the
anchor models, per token count: where ORCD_GEMM_BLAS_MIN should sit.

usage: python3 bench/bench_blas.py [--ts 8,16,32,64,128,256] [--only SUBSTR] [--reps 20]

Each (shape, T): CudaBackend.linear on one weight, captured into a CUDA graph with the switch
at 0 (the fused kernels: the GEMV up to 8 tokens, the tensor-core GEMM above) and at 1 (cuBLAS: activation scan and f16 rounding, the weight decoded to f16
panel by panel, cublasGemmEx), median of event-timed replays. The cuBLAS time includes decoding the
weight, as every call pays it. Prints us per call and TFLOP/s of each, and their ratio; then the
cuBLAS path on a weight already held in f16 (ORCD_GEMM_F16_WEIGHTS), and for T = 9..64 the int8
tensor-core GEMM of a decode step (ORCD_GEMM_INT8_MAX; its quantize_x8 launch included, which a
decode step mostly leaves to the norm before it) with the weight bytes it streams per second.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "gpu"))

from bench_kernels import SHAPES, median_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8,16,32,64,128,256")
    ap.add_argument("--only", default="")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    import pycuda.driver as drv

    from orcd_grpc.backends import cuda_quant
    from orcd_grpc.backends.cuda import CudaBackend
    from orcd_grpc.backends.cuda_blas import keep_f16
    from orcd_grpc.tuning import Tuning
    from test_quant_kernels import random_weight

    ts = [int(t) for t in args.ts.split(",") if t]
    be = CudaBackend(workspace_bytes=(max(ts) * 16384 * 4 * 2) + (256 << 20),
                     tuning=dataclasses.replace(Tuning.from_env(), gemm_blas_min=1, gemm_f16_weights=False))
    if be._blas is None:
        sys.exit("no libcublas found: nothing to compare")
    rng = np.random.default_rng(0)
    print(f"device: {be.device.name()}")
    print("model           tensor        type         n x k      T   fused us  cuBLAS us  ratio  TFLOP/s f/c"
          "  resident-f16 us  int8 us  int8 GB/s")
    for model, name, n, k, qt in SHAPES:
        if args.only and args.only not in f"{model}/{name}/{qt.name}":
            continue
        if name.startswith("output") and not args.only:  # the logits matmul of a prefill has one row a sequence
            continue
        raw, _ = random_weight(rng, qt, n, k)
        w = be.load_weight(f"{model}.{name}", raw, qt, (n, k))
        w2 = be.load_weight(f"{model}.{name}.f16", raw, qt, (n, k))
        keep_f16(be, w2)  # ORCD_GEMM_F16_WEIGHTS: decoded once, no decode per call
        for T in ts:
            x = be.from_host(rng.standard_normal((T, k), dtype=np.float32))
            times = []
            int8 = 8 < T <= 64 and qt in cuda_quant.I8_FORMATS
            for blas_min, wt, decode in ((0, w, False), (1, w, False), (1, w2, False), (0, w, True)):
                if decode and not int8:
                    times.append(None)
                    continue
                be.tuning = dataclasses.replace(be.tuning, gemm_blas_min=blas_min, gemm_int8_max=64)
                be._decode_step = decode  # what begin_step sets for a step of one-token rows

                def run():
                    be.ws.reset()
                    be.linear(x, wt)
                    return 1
                run()
                be.synchronize()
                times.append(median_ms(run, args.reps, drv, be.stream))
            be._decode_step = False
            f, c, r, i8 = times
            flop = 2 * T * n * k
            i8s = f"{i8 * 1e3:8.1f} {raw.nbytes / i8 / 1e6:10.0f}" if i8 else f"{'-':>8s} {'-':>10s}"
            print(f"{model:15s} {name:13s} {qt.name:6s} {n:7d}x{k:<5d} {T:5d} {f * 1e3:9.1f} {c * 1e3:10.1f} "
                  f"{f / c:6.2f}x {flop / f / 1e9:6.1f}/{flop / c / 1e9:.1f} {r * 1e3:15.1f} {i8s}", flush=True)
        w.free()
        w2.free()
    be.close()


if __name__ == "__main__":
    main()
