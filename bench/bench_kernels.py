#!/usr/bin/env python3
"""Times the quantized matrix kernels (cuda/quant_matmul.cu) at real model shapes.

usage: [ORCD_GEMV_KSPLIT=0|1 ...] python3 bench/bench_kernels.py [--quick] [--only SUBSTR] [--ts 1,8]

The launch-time switches of orcd_grpc/tuning.py (ORCD_GEMV_KSPLIT, ORCD_GEMM_MIN_KSTEPS, ...) are read
from the environment once, as the backend does, and split-K is sized for this device's SMs.

For each weight shape and T in (1, 8, 64, 512) (--ts): median of many CUDA-event-timed launches. MoE: both the
per-slot GEMV and the grouped GEMM path at every T ("*" marks the one moe_matmul picks by default). Weights
are random blocks with sane scales; small matrices are replicated over enough copies (rotated every
launch) that the working set exceeds L2, so the numbers are DRAM numbers, not cache numbers.
Prints achieved GB/s (weight bytes / time; x and y bytes are small and not counted) and TFLOP/s
(2*T*n*k / time), plus the device-to-device copy bandwidth measured first as the ceiling.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "gpu"))

from gguf import GGMLQuantizationType as Q  # noqa: E402

# (model, tensor, n, k, type) — shapes/types as bench/synth_gguf.py lays the models out
SHAPES = [
    ("qwen2.5-0.5b", "attn_q/o", 896, 896, Q.Q5_0),
    ("qwen2.5-0.5b", "attn_v", 128, 896, Q.Q8_0),
    ("qwen2.5-0.5b", "ffn_gate/up", 4864, 896, Q.Q5_0),
    ("qwen2.5-0.5b", "ffn_down", 896, 4864, Q.Q4_K),
    ("qwen2.5-0.5b", "output(tied)", 151936, 896, Q.Q8_0),
    ("phi3-mini", "attn_qkv", 9216, 3072, Q.Q4_K),
    ("phi3-mini", "attn_output", 3072, 3072, Q.Q4_K),
    ("phi3-mini", "ffn_up", 16384, 3072, Q.Q4_K),
    ("phi3-mini", "ffn_down", 3072, 8192, Q.Q6_K),
    ("phi3-mini", "output", 32064, 3072, Q.Q6_K),
    ("phi3-mini-q4_0", "ffn_up", 16384, 3072, Q.Q4_0),
    ("phi3-mini-q4_0", "ffn_down", 3072, 8192, Q.Q4_0),
    ("gpt-oss-20b", "attn_q", 4096, 2880, Q.Q8_0),
    ("gpt-oss-20b", "attn_output", 2880, 4096, Q.Q8_0),
    ("gpt-oss-20b", "output", 201088, 2880, Q.Q8_0),
]
MOE = [("gpt-oss-20b", "ffn_up_exps", 32, 4, 2880, 2880, Q.MXFP4)]
TS = (1, 8, 64, 512)


class Graph:
    """One pass of launches captured into a CUDA graph (driver API through ctypes: this PyCUDA has no
    graph binding). Replaying it keeps the GPU busy back to back, as the worker's decode graph will,
    instead of timing Python's launch rate. Also proves the launches are capturable."""

    def __init__(self, stream, launch):
        import ctypes

        self.ct, self.cu = ctypes, ctypes.CDLL("libcuda.so.1")
        self.h = ctypes.c_void_p(stream.handle)
        self._ck(self.cu.cuStreamBeginCapture_v2(self.h, ctypes.c_int(0)), "begin capture")
        self.n = launch()
        g = ctypes.c_void_p()
        self._ck(self.cu.cuStreamEndCapture(self.h, ctypes.byref(g)), "end capture")
        self.ge = ctypes.c_void_p()
        self._ck(self.cu.cuGraphInstantiateWithFlags(ctypes.byref(self.ge), g, ctypes.c_ulonglong(0)), "instantiate")
        self.g = g

    @staticmethod
    def _ck(r, what):
        if r != 0:
            raise RuntimeError(f"{what} failed: CUresult {r}")

    def launch(self):
        self._ck(self.cu.cuGraphLaunch(self.ge, self.h), "graph launch")
        return self.n

    def free(self):
        self.cu.cuGraphExecDestroy(self.ge)
        self.cu.cuGraphDestroy(self.g)


def median_ms(launch, reps, drv, stream):
    """median over `reps` event-timed replays (each replay = one pass over the weight copies), per launch"""
    g = Graph(stream, launch)
    g.launch()
    stream.synchronize()
    times = []
    for _ in range(reps):
        a, b = drv.Event(), drv.Event()
        a.record(stream)
        n = g.launch()
        b.record(stream)
        b.synchronize()
        times.append(b.time_since(a) / n)
    g.free()
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--ts", default=",".join(map(str, TS)), help="token counts, comma-separated")
    args = ap.parse_args()
    ts = [int(t) for t in args.ts.split(",")]

    import pycuda.autoprimaryctx  # noqa: F401
    import pycuda.driver as drv
    import pycuda.gpuarray as ga

    from orcd_grpc.backends import cuda_quant as cq
    from orcd_grpc.tuning import Tuning
    from test_quant_kernels import random_weight

    stream = drv.Stream()
    rng = np.random.default_rng(0)
    dev = drv.Context.get_device()
    sms = dev.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
    l2_bytes = dev.get_attribute(drv.device_attribute.L2_CACHE_SIZE)
    tuning = Tuning.from_env()
    print(f"device: {dev.name()}  SMs: {sms}  L2: {l2_bytes >> 20} MiB")

    # ceiling: device-to-device copy, bytes read + written
    nb = 1 << 30
    src, dst = drv.mem_alloc(nb), drv.mem_alloc(nb)
    drv.memset_d8(src, 1, nb)

    def cp():
        drv.memcpy_dtod_async(dst, src, nb, stream)
        return 1
    ms = median_ms(cp, 10, drv, stream)
    copy_gbs = 2 * nb / ms / 1e6
    print(f"ceiling: dtod copy {copy_gbs:.0f} GB/s (read+write)")
    src.free(); dst.free()

    held = []  # the int8 scratch buffers, alive until the end

    def x8_scratch(n):
        """quantize_x8's output for n inputs: n int8 values and n / 32 scales (the matmul's x8)."""
        held.extend((ga.empty(n, np.int8), ga.empty(n // 32, np.float32)))
        return held[-2].gpudata, held[-1].gpudata

    rows = []
    reps = 5 if args.quick else 20
    for model, name, n, k, qt in SHAPES:
        if args.only and args.only not in f"{model}/{name}/{qt.name}":
            continue
        raw, _ = random_weight(rng, qt, n, k)
        w0 = cq.QuantWeight(raw, qt, n, k)
        copies = [w0] + [cq.QuantWeight(raw, qt, n, k) for _ in range(min(63, (2 * l2_bytes) // w0.nbytes))]
        for T in ts:
            x = ga.to_gpu(rng.standard_normal((T, k), dtype=np.float32))
            y = ga.empty((T, n), np.float32)
            # as the model runs it: the int8-input GEMV where it is the default (its quantize_x8 launch
            # counted in each matmul; the model shares one among the matmuls of one input)
            x8 = x8_scratch(T * k) if cq.i8_eligible(w0, T, tuning) else None

            def run():
                for w in copies:
                    cq.matmul(x.gpudata, w, y.gpudata, T, stream, x8=x8, tuning=tuning, sms=sms)
                return len(copies)
            run(); stream.synchronize()
            ms = median_ms(run, reps, drv, stream)
            gbs = w0.nbytes / ms / 1e6
            tf = 2 * T * n * k / ms / 1e9
            rows.append((model, name, qt.name, n, k, T, ms * 1e3, gbs, tf))
            print(f"{model:15s} {name:13s} {qt.name:6s} {n:7d}x{k:<5d} T={T:<4d} {ms*1e3:9.1f} us {gbs:7.0f} GB/s {tf:7.2f} TFLOP/s"
                  f"{' int8 x' if x8 else ''}", flush=True)
        for w in copies:
            w.free()

    for model, name, E, top_k, n, k, qt in MOE:
        if args.only and args.only not in f"{model}/{name}/{qt.name}":
            continue
        raw, _ = random_weight(rng, qt, n, k, lead=(E,))
        w = cq.QuantWeight(raw, qt, n, k, n_experts=E)
        for T in ts:
            ids = ga.to_gpu(np.stack([rng.choice(E, top_k, replace=False) for _ in range(T)]).astype(np.int32))
            x = ga.to_gpu(rng.standard_normal((T, k), dtype=np.float32))
            y = ga.empty((T, top_k, n), np.float32)
            ws = ga.empty(cq.moe_workspace_ints(T, top_k, E), np.int32)
            auto = "grouped" if cq.moe_use_grouped(T, top_k, E) else "gemv"
            # both paths at every T (the grouped time includes its moe_group launch; in the model one
            # moe_group serves the gate, up and down projections); "*" marks the default choice
            for path in ("gemv", "grouped"):
                if path == "grouped" and not cq.moe_grouped_possible(T, top_k, E):
                    continue

                # the per-slot GEMV on the int8 input, as the model runs it
                x8 = x8_scratch(T * k) if cq.moe_i8_eligible(w, path == "grouped", tuning) else None

                def run():
                    cq.moe_matmul(x.gpudata, w, ids.gpudata, y.gpudata, T, top_k, stream,
                                  workspace_ptr=ws.gpudata, grouped=path == "grouped", x8=x8, tuning=tuning, sms=sms)
                    return 1
                run(); stream.synchronize()
                ms = median_ms(run, reps, drv, stream)
                touched = len(np.unique(ids.get())) * w.expert_bytes  # fewest bytes: each used expert once
                gbs = touched / ms / 1e6
                tf = 2 * T * top_k * n * k / ms / 1e9
                tag = f"{path}{'*' if path == auto else ''}{'-i8' if x8 else ''}"
                rows.append((model, f"{name}(E{E},top{top_k}) {tag}", qt.name, n, k, T, ms * 1e3, gbs, tf))
                print(f"{model:15s} {name:13s} {tag:9s} {qt.name:6s} {n:7d}x{k:<5d} T={T:<4d} {ms*1e3:9.1f} us "
                      f"{gbs:7.0f} GB/s(used experts) {tf:7.2f} TFLOP/s", flush=True)
        w.free()

    print(f"\nsummary (copy ceiling {copy_gbs:.0f} GB/s):")
    print("model           tensor                            type      n x k        T     us      GB/s  %copy  TFLOP/s")
    for model, name, qt, n, k, T, us, gbs, tf in rows:
        print(f"{model:15s} {name:33s} {qt:6s} {n:7d}x{k:<5d} {T:4d} {us:8.1f} {gbs:7.0f} {100*gbs/copy_gbs:5.0f}% {tf:7.2f}")


if __name__ == "__main__":
    main()
