#!/usr/bin/env python3
"""The CPU backend's speed with each KV cache type at depth: a `--depth`-token prompt in one step,
then 128 greedy decode steps (attention over the whole cache each step), F16 and Q8_0 alternating,
`--rounds` rounds on the same file.

    python3 bench/kv_speed.py [--model smollm2-135m-instruct] [--depth 1536] [--rounds 2]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import run_to_completion  # noqa: E402

from orcd_grpc import model_store  # noqa: E402
from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--depth", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    path = model_store.ensure_model(a.model)
    ids = np.random.default_rng(0).integers(100, 30000, a.depth).tolist()
    for _ in range(a.rounds):
        for kv in ("f16", "q8_0"):
            eng = load_engine(path, backend="cpu", max_sequences=1, context_length=a.depth + 256,
                              kv_cache_type=kv)
            s = eng.new_sequence(ids, SamplingParams(temperature=0.0))
            t_first, t_dec, n = run_to_completion(eng, [s], 129, 1 << 16)
            eng.release(s)
            eng.close()
            print(f"{kv}: prefill {a.depth}: {a.depth / t_first:.0f} tok/s, decode at depth {a.depth}-"
                  f"{a.depth + n}: {n / t_dec:.1f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
