#!/usr/bin/env python3
"""How fast llguidance fills constraint masks on this host's CPU, without a model or a GPU.

B matchers of constraint_cost.py's JSON schema walk the grammar together: each step fills every
row's bitmask (llguidance's parallel fill on an executor of T threads, as
constraints.Constraint.fill_rows does with the default executor), then each matcher takes a token
drawn uniformly from its allowed ones (what a model with random weights does, the synthetic
files' case). Reports the fill's wall time per step and per row, for each B and T: the host work a
constrained decode step must hide behind the GPU's forward.

    python3 bench/mask_fill.py VOCAB.gguf [--batches 1,64] [--threads 1,4,8,12] [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from constraint_cost import schema  # noqa: E402
from orcd_grpc import constraints  # noqa: E402
from orcd_grpc.backends.runner import bitmask_words  # noqa: E402
from orcd_grpc.tokenizer import Tokenizer, read_gguf_metadata  # noqa: E402


def walk(tok, vocab: int, b: int, threads: int, steps: int, seed: int) -> list[float]:
    """Seconds of each step's fill of b rows on an executor of `threads`."""
    import llguidance as llg
    from llguidance.numpy import fill_next_token_bitmask_par

    ex = llg.LLExecutor(threads)
    cons = [constraints.compile_json_schema(schema(1000), tok, vocab) for _ in range(b)]
    rng = np.random.default_rng(seed)
    bits = np.full((b, bitmask_words(vocab)), -1, np.int32)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fill_next_token_bitmask_par(ex, [(c._m, i) for i, c in enumerate(cons)], bits)
        out.append(time.perf_counter() - t)
        for i, c in enumerate(cons):
            allowed = np.flatnonzero(np.unpackbits(bits[i].view(np.uint8), bitorder="little")[:vocab])
            c.accept(int(rng.choice(allowed)))
    for c in cons:
        c.close()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("vocab", help="a GGUF file with a tokenizer (a model, or ../shared/vocab/ggml-vocab-*.gguf)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", default="1,4,8,12")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--vocab-size", type=int, default=0, help="the logits' width (default: the tokenizer's)")
    args = ap.parse_args(argv)
    tok = Tokenizer.from_gguf_file(args.vocab)
    vocab = args.vocab_size or tok.vocab_size
    name = read_gguf_metadata(args.vocab).get("general.name", os.path.basename(args.vocab))
    # at B=1 a step is one row: its p99 and max are the slowest masks' cost
    print("| vocab | cores | B | threads | fill ms/step (median) | us/row | p99 / max ms/step | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for b in (int(x) for x in args.batches.split(",") if x):
        base = None  # the first thread count's median: what the speed-up is against
        for t in (int(x) for x in args.threads.split(",") if x):
            if b == 1 and t > 1:
                continue
            times = walk(tok, vocab, b, t, args.steps, seed=b)
            med, p99, top = statistics.median(times), float(np.percentile(times, 99)), max(times)
            base = base or med
            rows.append({"vocab": name, "B": b, "threads": t, "fill_ms": round(med * 1e3, 3),
                         "us_per_row": round(med / b * 1e6, 1), "p99_ms": round(p99 * 1e3, 3),
                         "max_ms": round(top * 1e3, 3)})
            print(f"| {name} | {os.cpu_count()} | {b} | {t} | {med * 1e3:.2f} | {med / b * 1e6:.0f} | "
                  f"{p99 * 1e3:.2f} / {top * 1e3:.2f} | {base / med:.1f}x |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
