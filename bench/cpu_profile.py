#!/usr/bin/env python3
"""Where a CPU-backend decode step's time goes: cProfile over `--steps` greedy decode steps of one
sequence after a `--prompt`-token prefill, printed as the functions with the most own time, each
as milliseconds per step and its share of the profiled time. The numba kernels are single entries
(their time is their own), so the table reads as kernels against Python; the prefill is inside
the profile too, as its own entries (gemm8, the BLAS attention).

    python3 bench/cpu_profile.py [MODEL.gguf] [--prompt 128] [--steps 64] [--top 15]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pathlib
import pstats
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import run_to_completion  # noqa: E402

from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402

DEFAULT = pathlib.Path(os.environ.get("ORCD_MODEL_DIR", pathlib.Path.home() / ".cache" / "orcd" / "models")) \
    / "smollm2-135m-instruct.gguf"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args(argv)
    eng = load_engine(a.model, backend="cpu", max_sequences=1, context_length=max(1024, a.prompt + a.steps + 8))
    ids = np.random.default_rng(0).integers(100, min(eng.info.vocab_size, 30000), size=a.prompt).tolist()

    def one(steps: int):
        s = eng.new_sequence(ids, SamplingParams(temperature=0.0))
        t_first, t_dec, n = run_to_completion(eng, [s], steps + 1, 8192)
        eng.release(s)
        return n / t_dec

    one(4)  # warm-up: compiled kernels loaded, pages touched
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    tps = one(a.steps)
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())
    rows = sorted(((v[2], v[0], f"{pathlib.Path(k[0]).name}:{k[1]}({k[2]})") for k, v in st.stats.items()),
                  reverse=True)[:a.top]
    print(f"{pathlib.Path(a.model).name}: {a.steps} decode steps after a {a.prompt}-token prefill, "
          f"{tps:.1f} tok/s under the profiler ({wall:.2f} s profiled)")
    print("| function | calls per step | ms per step | share |")
    print("|---|---:|---:|---:|")
    for own, calls, name in rows:
        print(f"| `{name}` | {calls / a.steps:.1f} | {1e3 * own / a.steps:.2f} | {100 * own / total:.1f} % |")
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
