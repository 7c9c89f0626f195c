#!/usr/bin/env python3
"""How a serving load's steps would meet the CUDA runner's mixed-step graphs (ORCD_MIXED_GRAPHS): from
the step logs of `bench/host_ceiling.py --serve --log-steps FILE` (one line a step: rows, tokens, rows
with prompt tokens), the share of steps that carry prompt tokens, their token counts, how many fit
each ORCD_MIXED_MAX_TOKENS cap and how many distinct (rows, tokens) graph buckets they fall into (each
bucket's first step captures its graph). The bucket of a step is cuda_padding.mixed_bucket's answer, the
one CudaRunner._mixed_key gives (an unbounded step workspace and block table).

    python3 bench/step_shapes.py LOG [LOG ...] [--max-sequences 256]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orcd_grpc.backends.cuda_padding import GRAPH_BUCKETS, mixed_bucket, mixed_token_buckets  # noqa: E402
from orcd_grpc.tuning import Tuning  # noqa: E402

CAPS = (512, 768, 1024, 1536, 2048)


def bucket_keys(shapes, cap: int, max_sequences: int) -> list:
    """The graph bucket of each (rows, tokens) step under ORCD_MIXED_MAX_TOKENS=cap (None: it runs eagerly)."""
    rows_b = [b for b in GRAPH_BUCKETS if b <= max_sequences]
    tokens_b = mixed_token_buckets(Tuning(mixed_max_tokens=cap))
    return [mixed_bucket(tokens, rows, rows_b, tokens_b, 1 << 30, 1 << 30) for rows, tokens in shapes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--max-sequences", type=int, default=256, help="the worker's (host_ceiling's: 256)")
    a = ap.parse_args()
    print("| log | steps | with prompt tokens | their tokens p50 / p90 / p99 | "
          + " | ".join(f"at most {c}" for c in CAPS) + " | buckets at " + " / ".join(map(str, CAPS)) + " |")
    for path in a.logs:
        steps = np.loadtxt(path, dtype=np.int64, ndmin=2)
        pre = steps[steps[:, 2] > 0]
        tokens = pre[:, 1]
        shapes = list(zip(pre[:, 0].tolist(), tokens.tolist()))
        fits, distinct = [], []
        for cap in CAPS:
            keys = bucket_keys(shapes, cap, a.max_sequences)
            fits.append(f"{np.mean([k is not None for k in keys]):.0%}")
            distinct.append(str(len({k for k in keys if k is not None})))
        p = np.percentile(tokens, [50, 90, 99]).astype(int)
        print(f"| {os.path.basename(path)} | {len(steps)} | {len(pre) / len(steps):.0%} | {p[0]} / {p[1]} / {p[2]} | "
              + " | ".join(fits) + " | " + " / ".join(distinct) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
