#!/usr/bin/env python3
"""What a JSON-schema constraint costs in decode speed, engine-level (as bench_engine.py).

For each batch size B: B sequences (128-token random prompts) decode `--gen` tokens each with
temperature sampling (one seed per sequence), once free and once under a JSON schema (one matcher
per sequence, compiled with constraints.compile_json_schema and advanced by Sequence.append, as
the scheduler's requests are). The schema is an array of at least `--gen` objects, so no
constrained sequence can finish before the measurement does. Reports aggregate decode tok/s of
both, their ratio, and the matcher's mask-fill time per row (Constraint.fill_rows, timed where
the runner calls it: beside the forward on the host backend, before the sample kernel on CUDA).

    python3 bench/constraint_cost.py MODEL.gguf [--backend cuda] [--batches 1,64] [--gen 128]
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

from orcd_grpc import constraints  # noqa: E402
from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import rand_prompt, run_to_completion  # noqa: E402


def schema(min_items: int) -> dict:
    """Long outputs: records with string and number fields, at least min_items of them."""
    return {"type": "array", "minItems": min_items, "maxItems": max(min_items, 10_000),
            "items": {"type": "object", "additionalProperties": False,
                      "required": ["name", "city", "age", "score"],
                      "properties": {"name": {"type": "string", "maxLength": 24},
                                     "city": {"type": "string", "maxLength": 24},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                     "score": {"type": "number", "minimum": -1000, "maximum": 1000}}}}


class FillTimer:
    """Times Constraint.fill_rows (the runner calls it through the class) and counts its rows."""

    def __init__(self):
        self.seconds, self.rows, self._orig = 0.0, 0, None

    def __enter__(self):
        self._orig = constraints.Constraint.__dict__["fill_rows"]
        orig = self._orig.__func__

        def timed(items, bits):
            t = time.perf_counter()
            try:
                return orig(items, bits)
            finally:
                self.seconds += time.perf_counter() - t
                self.rows += len(items)

        constraints.Constraint.fill_rows = staticmethod(timed)
        return self

    def __exit__(self, *exc):
        constraints.Constraint.fill_rows = self._orig


def decode(eng, b: int, n_new: int, rng, spec: dict | None, seed0: int):
    """(aggregate decode tok/s, matchers that stopped or failed) of b sequences decoding n_new."""
    vocab = eng.info.vocab_size
    seqs, cons = [], []
    for i in range(b):
        c = None
        if spec is not None:
            c = constraints.compile_json_schema(spec, eng.tokenizer, int(vocab))
            cons.append(c)
        sp = SamplingParams(temperature=1.0, top_p=1.0, seed=seed0 + i, constraint=c)
        seqs.append(eng.new_sequence(rand_prompt(rng, 128, vocab), sp))
    try:
        _, t_dec, n = run_to_completion(eng, seqs, n_new, 8192)
    finally:
        for s in seqs:
            eng.release(s)
    ended = sum(1 for c in cons if c.done or c.error is not None)
    for c in cons:
        c.close()
    return n / t_dec, ended


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--context-length", type=int, default=4096)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]

    eng = load_engine(args.model, backend=args.backend, context_length=args.context_length,
                      max_sequences=max(batches + [1]))
    info = eng.info
    rng = np.random.default_rng(0)
    spec = schema(args.gen)  # every record is several tokens: the array cannot close in time
    t = time.perf_counter()
    constraints.compile_json_schema(spec, eng.tokenizer, int(info.vocab_size)).close()
    first_compile_s = time.perf_counter() - t  # includes the vocabulary's LLTokenizer, once per model
    t = time.perf_counter()
    constraints.compile_json_schema(spec, eng.tokenizer, int(info.vocab_size)).close()
    compile_ms = (time.perf_counter() - t) * 1e3

    # warm-up of both paths (module loads, autotuning, graph capture)
    decode(eng, 1, 4, rng, None, 0)
    decode(eng, 1, 4, rng, spec, 0)

    results = {"model": info.model_id, "backend": info.backend, "gen": args.gen,
               "first_compile_s": round(first_compile_s, 3), "compile_ms": round(compile_ms, 2)}
    rows = []
    for b in batches:
        free, cons, fill_us, ended = [], [], [], 0
        for r in range(args.reps):
            free.append(decode(eng, b, args.gen + 1, rng, None, 1000 * r)[0])
            with FillTimer() as ft:
                tps, e = decode(eng, b, args.gen + 1, rng, spec, 1000 * r)
            cons.append(tps)
            ended += e
            fill_us.append(ft.seconds / max(ft.rows, 1) * 1e6)
        f, c = statistics.median(free), statistics.median(cons)
        results[f"B{b}"] = {"free_tok_s": f, "constrained_tok_s": c, "ratio": c / f,
                            "fill_us_per_row": statistics.median(fill_us), "matchers_ended_early": ended}
        rows.append("| " + " | ".join([info.model_id, info.backend, str(b), f"{f:.0f}", f"{c:.0f}", f"{c / f:.3f}",
                                       f"{statistics.median(fill_us):.1f}"]) + " |")

    print(json.dumps(results))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(results) + "\n")
    print("| model | backend | B | free tok/s | json-schema tok/s | ratio | mask fill us/row |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    eng.close()
    return results


if __name__ == "__main__":
    main()
