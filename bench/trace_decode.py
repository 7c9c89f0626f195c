#!/usr/bin/env python3
"""Each kernel's GPU time inside a replayed decode graph, from a CUPTI trace (through PyTorch's
profiler, which records every kernel of the process, PyCUDA's included). Event pairs around eager
launches cannot tell a 3 µs kernel from its launch; this can, and it shows the idle gaps between
kernels too.

    python3 bench/trace_decode.py MODEL.gguf [--batch 1] [--steps 20] [--ctx 256]
    python3 bench/trace_decode.py MODEL.gguf --prefill 512     (one 512-token prompt's prefill instead)
    python3 bench/trace_decode.py MODEL.gguf --batch 64 --mixed 512
        (a serving step: the 64 sequences' decode tokens and a new 512-token prompt in one step, which
        runs eagerly; with the wall time of such a step and of the same batch's plain decode step)

Prints one JSON object: per step (or per prefill), the span (first kernel start to last kernel end), the busy
time (sum of kernel durations), the kernel count, and per kernel name [µs per step, launches per
step, mean µs], largest first ("top"). Under programmatic dependent launch a kernel starts while the
one before it runs and waits inside, so its duration counts that wait too, and busy exceeds span;
"own" charges each kernel only from the moment every kernel before it had ended (own_times), per
name [µs per step, mean µs], largest first: these add up to the span less "idle_us", the time no
kernel ran.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402
from profile_decode import decode_setup  # noqa: E402


def own_times(events) -> tuple[list[float], float]:
    """Each kernel's time from the later of its start and the end of every kernel before it (events
    sorted by start; "ts" and "dur" in µs) to its end, and the idle time between kernels."""
    own, idle, end = [], 0.0, None
    for e in events:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if end is not None and start > end:
            idle += start - end
        begin = start if end is None else max(start, end)
        own.append(max(0.0, stop - begin))
        end = stop if end is None else max(end, stop)
    return own, idle


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--kv-cache-type", default="", help="f16 or q8_0 (default: the backend's)")
    ap.add_argument("--prefill", type=int, default=0, help="trace the prefill of a prompt this long instead")
    ap.add_argument("--mixed", type=int, default=0,
                    help="trace steps of --batch decoding sequences plus a new prompt this long instead")
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    extra = {}
    if args.mixed:
        # room for as many sequences again, as a serving worker has (max_sequences well above the
        # running batch): a mixed step's rows plus its padding row need a graph bucket above the
        # batch, and buckets stop at max_sequences (spare=1 left ORCD_MIXED_GRAPHS no bucket at all)
        eng, seqs, _ = decode_setup(args.model, args.batch, args.ctx, spare=max(2, args.batch),
                                 kv_cache_type=args.kv_cache_type)
        be = eng.backend
        rng = np.random.default_rng(1)
        greedy = SamplingParams(temperature=0.0)

        def mixed():
            p = eng.new_sequence(rng.integers(100, 30000, args.mixed).tolist(), greedy)
            eng.step(seqs + [p], 8192)  # every decode row and the whole prompt (up to the budget)
            eng.release(p)

        def walls(step, n=args.steps):
            out = []
            for _ in range(n):
                be.synchronize()
                t0 = time.perf_counter()
                step()
                be.synchronize()
                out.append((time.perf_counter() - t0) * 1e6)
            return round(float(np.median(out)), 1)

        mixed()  # warm-up
        extra = {"mixed_step_wall_us": walls(mixed), "decode_step_wall_us": walls(lambda: eng.step(seqs, 8192))}
        be.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                mixed()
            be.synchronize()
    elif args.prefill:
        eng = load_engine(args.model, backend="cuda", context_length=4096, max_sequences=8)
        be = eng.backend
        rng = np.random.default_rng(0)
        greedy = SamplingParams(temperature=0.0)

        def prefill():
            s = eng.new_sequence(rng.integers(100, 30000, args.prefill).tolist(), greedy)
            while s.prefill_remaining:
                eng.step([s], 8192)
            eng.release(s)

        prefill()  # warm-up: module loads, first-use allocations
        be.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                prefill()
            be.synchronize()
    else:
        eng, _, graph = decode_setup(args.model, args.batch, args.ctx, kv_cache_type=args.kv_cache_type)
        be = eng.backend
        be.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                graph.launch()
            be.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = [e for e in json.load(fh)["traceEvents"] if e.get("cat") == "kernel"]
    events.sort(key=lambda e: e["ts"])
    per = collections.defaultdict(lambda: [0.0, 0, 0.0])
    own, idle = own_times(events)
    for e, o in zip(events, own):
        per[e["name"]][0] += e["dur"]
        per[e["name"]][1] += 1
        per[e["name"]][2] += o
    n = args.steps
    span = (events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]) / n if events else 0.0
    busy = sum(e["dur"] for e in events) / n
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[: args.top]
    mine = sorted(per.items(), key=lambda kv: -kv[1][2])[: args.top]
    print(json.dumps({"model": os.path.basename(args.model), "batch": args.batch, "ctx": args.ctx,
                      "kv_cache_type": args.kv_cache_type or "default", "prefill": args.prefill,
                      "mixed": args.mixed, **extra, "span_us": round(span, 1), "busy_us": round(busy, 1),
                      "idle_us": round(idle / n, 1), "kernels": len(events) / n,
                      "own": {k[:40]: [round(v[2] / n, 1), round(v[2] / v[1], 2)] for k, v in mine},
                      "top": {k[:40]: [round(v[0] / n, 1), v[1] / n, round(v[0] / v[1], 2)] for k, v in top}}),
          flush=True)
    eng.close()


if __name__ == "__main__":
    main()
