#!/usr/bin/env python3
"""What a JSON-schema constraint costs in decode speed, engine-level (as bench_engine.py).

For each batch size B: B sequences (128-token random prompts) decode `--gen` tokens each with
temperature sampling (one seed per sequence), once free and once under a JSON schema (one matcher
per sequence, compiled with constraints.compile_json_schema and advanced by Sequence.append, as
the scheduler's requests are). The schema is an array of at least `--gen` objects, so no
constrained sequence can finish before the measurement does. Reports aggregate decode tok/s of
both, their ratio, and the matcher's mask-fill time per row (Constraint.fill_rows, timed where
the runner calls it: beside the forward on the host backend, before the sample kernel on CUDA).
--trace adds where a constrained step's host time goes (StepTimer.chain_us).

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


class StepTimer:
    """Times Constraint.fill_rows (the runner calls it through the class) and counts its rows; with
    the engine's backend, also where each constrained step's host time goes between the moment
    its tokens reach the host (sample_result) and the moment the next step's sampling is queued
    (sample_packed_async): the chain the GPU may wait on, against the step period."""

    def __init__(self, backend=None):
        # the chain exists where sampling is queued on a device (the CUDA backend)
        backend = backend if hasattr(backend, "sample_result") else None
        self.seconds, self.rows, self.backend = 0.0, 0, backend
        self.events: list[tuple[str, float]] = []

    def __enter__(self):
        self._orig = constraints.Constraint.__dict__["fill_rows"]
        orig = self._orig.__func__
        ev = self.events

        def timed(items, bits):
            t = time.perf_counter()
            ev.append(("fill0", t))
            try:
                return orig(items, bits)
            finally:
                t1 = time.perf_counter()
                ev.append(("fill1", t1))
                self.seconds += t1 - t
                self.rows += len(items)

        constraints.Constraint.fill_rows = staticmethod(timed)
        be = self.backend
        if be is not None:
            res, que = be.sample_result, getattr(be, "sample_packed_async", None)

            def result(h):
                out = res(h)
                ev.append(("tokens", time.perf_counter()))
                return out

            be.sample_result = result
            if que is not None:
                def queued(*a, **k):
                    out = que(*a, **k)
                    ev.append(("queued", time.perf_counter()))
                    return out

                be.sample_packed_async = queued
        return self

    def __exit__(self, *exc):
        constraints.Constraint.fill_rows = self._orig
        if self.backend is not None:
            for name in ("sample_result", "sample_packed_async"):
                self.backend.__dict__.pop(name, None)

    def chain_us(self) -> dict:
        """Medians (us) of: tokens on the host -> fill start, the fill, fill end -> sampling queued,
        sampling queued -> the next tokens on the host, and the period between tokens."""
        parts: dict[str, list[float]] = {k: [] for k in ("to_fill", "fill", "to_queue", "gpu_wait", "period")}
        ev = self.events
        last_tok = None
        for i, (name, t) in enumerate(ev):
            if name != "tokens":
                continue
            if last_tok is not None:
                parts["period"].append(t - last_tok)
            last_tok = t
            nxt = {}
            for name2, t2 in ev[i + 1:]:
                if name2 == "tokens":
                    nxt["next"] = t2
                    break
                nxt.setdefault(name2, t2)
            if {"fill0", "fill1", "queued", "next"} <= nxt.keys():
                parts["to_fill"].append(nxt["fill0"] - t)
                parts["fill"].append(nxt["fill1"] - nxt["fill0"])
                parts["to_queue"].append(nxt["queued"] - nxt["fill1"])
                parts["gpu_wait"].append(nxt["next"] - nxt["queued"])
        return {k: round(statistics.median(v) * 1e6, 1) for k, v in parts.items() if v}


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
    ap.add_argument("--trace", action="store_true",
                    help="also time each constrained step's host chain (StepTimer.chain_us; to stderr and the JSON)")
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
        free, cons, fill_us, ended, chains = [], [], [], 0, []
        for r in range(args.reps):
            free.append(decode(eng, b, args.gen + 1, rng, None, 1000 * r)[0])
            with StepTimer(eng.backend if args.trace else None) as ft:
                tps, e = decode(eng, b, args.gen + 1, rng, spec, 1000 * r)
            if args.trace:
                chains.append(ft.chain_us())
            cons.append(tps)
            ended += e
            fill_us.append(ft.seconds / max(ft.rows, 1) * 1e6)
        f, c = statistics.median(free), statistics.median(cons)
        results[f"B{b}"] = {"free_tok_s": f, "constrained_tok_s": c, "ratio": c / f,
                            "fill_us_per_row": statistics.median(fill_us), "matchers_ended_early": ended}
        if chains:
            results[f"B{b}"]["chain_us"] = chains[len(chains) // 2]
            print(f"B={b} constrained step, median us: {chains[len(chains) // 2]}", file=sys.stderr)
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
