#!/usr/bin/env python3
"""Host time the engine spends per decode step before any kernel runs: planning the batch and
building its (bucket-padded) metadata, and packing its sampling rows, at 1, 16, 64 and 256
sequences. CPU only: a tiny random llama on the NumPy backend, whose own compute is not timed.
Prints one JSON object of µs per step.

    python3 bench/host_overhead.py [--reps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [root, os.path.join(root, "tests")]

from gpu.test_cuda_models import write_tiny_llama  # noqa: E402
from orcd_grpc.backends.cuda_runner import CudaRunner  # noqa: E402
from orcd_grpc.backends.cuda_padding import decode_meta  # noqa: E402
from orcd_grpc.backends.runner import StepPlan  # noqa: E402
from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402
from orcd_grpc.tuning import Tuning  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--context", type=int, default=200, help="prompt tokens per sequence")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_llama(os.path.join(tmp, "tiny.gguf"), "Q8_0", n_layers=1)
        eng = load_engine(path, backend="cpu", max_sequences=256, max_context=512)
        rng = np.random.default_rng(0)
        seqs = [eng.new_sequence([1] + rng.integers(3, 300, args.context).tolist(), SamplingParams(temperature=0))
                for _ in range(256)]
        while any(s.prefill_remaining for s in seqs):
            eng.step(seqs, 8192)
        # plan as on the GPU: the CUDA runner's padded metadata (its buckets), over this engine's model
        # (the CPU backend keeps no Tuning of its own: the runner's graph and lookahead switches
        # are the defaults a CudaBackend would hand it)
        eng.backend.tuning = Tuning()
        cuda = CudaRunner(eng.backend, eng.runner.model)
        out = {}
        for b in (1, 16, 64, 256):
            sub = seqs[:b]
            t = time.perf_counter()
            for _ in range(args.reps):
                plan = StepPlan(eng._schedule(sub, 8192)[1], eng.allocator.block_size)
                decode_meta(plan, cuda._bucket(plan), cuda.model)
            out[f"plan_meta_us_B{b}"] = round((time.perf_counter() - t) / args.reps * 1e6, 1)
            t = time.perf_counter()
            for _ in range(args.reps):
                cuda._packed_rows(plan.rows)
            out[f"packed_rows_us_B{b}"] = round((time.perf_counter() - t) / args.reps * 1e6, 1)
        eng.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
