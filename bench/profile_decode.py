#!/usr/bin/env python3
"""Where a decode step's time goes, on the CUDA engine: host work (plan, metadata), the graph
replay on the GPU, sampling. Prints one JSON object of microseconds per step.

    python3 bench/profile_decode.py MODEL.gguf [--batch 1] [--steps 100] [--ctx 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orcd_grpc.backends.cuda_padding import decode_meta  # noqa: E402
from orcd_grpc.backends.runner import StepPlan  # noqa: E402
from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402


def kernel_times(eng, meta, reps: int = 5) -> dict:
    """GPU microseconds per step of each kernel (by name), from CUDA events around every launch
    of an eager forward (Python launches slower than the GPU runs, so each pair times its kernel
    alone); with launch counts."""
    import pycuda.driver as drv

    be = eng.backend
    events = []
    orig_launch, orig_quant = be._launch, be._quant_call

    def timed(name, fn):
        a, b = drv.Event(), drv.Event()
        a.record(be.stream)
        r = fn()
        b.record(be.stream)
        events.append((name, a, b))
        return r

    be._launch = lambda k, grid, block, *args, shared=0: timed(k.name, lambda: orig_launch(k, grid, block, *args,
                                                                                          shared=shared))
    be._quant_call = lambda what, fn, *args, **kw: timed(f"{what}:{getattr(args[1], 'qtype', '?')!s}".replace(
        "GGMLQuantizationType.", ""), lambda: orig_quant(what, fn, *args, **kw))
    try:
        for _ in range(reps):
            ctx = be.begin_step(meta)
            eng.adapter.forward(ctx, eng.kv)
        be.synchronize()
    finally:
        be._launch, be._quant_call = orig_launch, orig_quant
    agg: dict = {}
    for name, a, b in events:
        us, n = agg.get(name, (0.0, 0))
        agg[name] = (us + b.time_since(a) * 1e3 / reps, n + 1)
    total = sum(us for us, _ in agg.values())
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])
    return {"total": round(total, 1), **{k: [round(us, 1), n // reps] for k, (us, n) in rows}}


def decode_setup(model: str, batch: int, ctx: int, spare: int = 0, kv_cache_type: str = ""):
    """A CUDA engine with `batch` sequences of `ctx` random prompt tokens, prefilled, and three decode
    steps taken (the first runs eagerly, the second captures the bucket's graph): (engine,
    sequences, that graph). spare: room for that many more sequences."""
    eng = load_engine(model, backend="cuda", context_length=max(4096, ctx + 256),
                      max_sequences=max(8, batch + spare), kv_cache_type=kv_cache_type)
    rng = np.random.default_rng(0)
    seqs = [eng.new_sequence(rng.integers(100, 30000, ctx).tolist(), SamplingParams(temperature=0.0))
            for _ in range(batch)]
    while any(s.prefill_remaining for s in seqs):
        eng.step(seqs, 8192)
    for _ in range(3):
        eng.step(seqs, 8192)  # waited for: nothing stays in flight, so the sequences can be planned by hand
    _, plan = decode_plan(eng, seqs)
    return eng, seqs, eng.backend._graphs[("decode", eng.runner._bucket(plan))][0]


def decode_plan(eng, seqs):
    """The next decode step of seqs as the engine plans it: ((sequence, tokens) pairs, plan)."""
    chosen, rows = eng._schedule(seqs, 8192)
    return chosen, StepPlan(rows, eng.allocator.block_size)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--kv-cache-type", default="", help="f16 or q8_0 (default: the backend's)")
    args = ap.parse_args(argv)
    eng, seqs, graph = decode_setup(args.model, args.batch, args.ctx, kv_cache_type=args.kv_cache_type)
    be = eng.backend
    t = {"plan_meta": 0.0, "begin_step": 0.0, "graph_launch": 0.0, "gpu_wait": 0.0, "sample": 0.0, "step": 0.0}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        chosen, plan = decode_plan(eng, seqs)
        bucket = eng.runner._bucket(plan)
        meta = decode_meta(plan, bucket, eng.runner.model)
        t1 = time.perf_counter()
        ctx = be.begin_step(meta)
        t2 = time.perf_counter()
        graph, out, top = be._graphs[("decode", bucket)]
        graph.launch()
        be.ws.top = max(be.ws.top, top)
        t3 = time.perf_counter()
        be.synchronize()
        t4 = time.perf_counter()
        eng._advance(chosen)
        res = eng.runner._sample(plan, out)
        for s in seqs:
            s.output_ids.append(res.samples[s.seq_id].token_id)
        t5 = time.perf_counter()
        for k, a, b in (("plan_meta", t0, t1), ("begin_step", t1, t2), ("graph_launch", t2, t3),
                        ("gpu_wait", t3, t4), ("sample", t4, t5), ("step", t0, t5)):
            t[k] += (b - a) * 1e6 / args.steps
    # The graph alone, back to back (GPU time per replay).
    be.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        graph.launch()
    be.synchronize()
    t["graph_replay_gpu"] = (time.perf_counter() - t0) * 1e6 / args.steps
    # The same forward launched eagerly from Python.
    _, plan = decode_plan(eng, seqs)
    meta = decode_meta(plan, eng.runner._bucket(plan), eng.runner.model)
    be.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        ctx = be.begin_step(meta)
        eng.adapter.forward(ctx, eng.kv)
    be.synchronize()
    t["eager_forward"] = (time.perf_counter() - t0) * 1e6 / 10
    kernels = kernel_times(eng, meta)
    out = {"model": os.path.basename(args.model), "batch": args.batch, "ctx": args.ctx,
           "kv_cache_type": args.kv_cache_type or "default", **{k: round(v, 1) for k, v in t.items()}, "kernels_us": kernels}
    print(json.dumps(out), flush=True)
    eng.close()


if __name__ == "__main__":
    main()
