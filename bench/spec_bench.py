#!/usr/bin/env python3
"""Speculative decoding benchmark: greedy decode tok/s with and without prompt-lookup (n-gram)
speculation, on tasks whose output repeats their input (edit a given code block, summarise a
given text), and the acceptance rate. One sequence, the engine driven directly (no gRPC).

    python3 bench/spec_bench.py MODEL.gguf [MODEL2.gguf ...] [--tokens 64] [--k 5] [--backend cpu]

Prints one JSON object per (model, task, mode) and a table; `--json FILE` collects them. The
greedy outputs of the two modes are compared token for token (`same` in the table).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orcd_grpc import request_validation as rv, speculation  # noqa: E402
from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.proto import pb  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402

CODE = '''def moving_average(values, n):
    """Averages of each n consecutive values."""
    if n <= 0:
        raise ValueError("n must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        if i >= n - 1:
            out.append(total / n)
    return out


def running_max(values):
    best = None
    out = []
    for v in values:
        best = v if best is None or v > best else best
        out.append(best)
    return out
'''

TEXT = ("The harbour town of Velmora was built on three terraces cut into the cliff. The lowest terrace "
        "held the fish market and the boat sheds, the middle one the houses of the net makers, and the "
        "highest the lighthouse and the old customs hall. In the winter of 1871 a storm destroyed the "
        "boat sheds and half of the market, and the town council decided to rebuild them further from "
        "the water. The new market opened in 1874 with a stone roof and twelve stalls. The customs hall "
        "became a school in 1890, and the lighthouse was electrified in 1923. Today the net makers' "
        "terrace is a museum, and the market still opens every morning except Sunday.")

TASKS = {
    "edit": "Rewrite this Python code, renaming the parameter `values` to `xs` everywhere and changing "
            "nothing else. Reply with the full code only.\n\n```python\n" + CODE + "```",
    "summarise": "Summarise the following text in a few sentences, reusing its own wording.\n\n" + TEXT,
}


def prompt_ids(engine, text: str) -> list[int]:
    req = pb.ExecuteRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)])) \
        if engine.info.has_chat_template else pb.ExecuteRequest(text=text)
    return rv.prompt_ids(req, engine.tokenizer, engine.info.has_chat_template)


def decode(engine, ids, spec, n_new):
    """(output ids, decode seconds after the first token, steps, drafts proposed, kept)."""
    s = engine.new_sequence(ids, SamplingParams(temperature=0.0, speculation=spec))
    s.max_output = n_new
    engine.step([s])  # the prefill and the first token
    t0, steps = time.perf_counter(), 0
    while len(s.output_ids) < n_new:
        engine.step([s])
        steps += 1
    dt = time.perf_counter() - t0
    engine.release(s)
    return s.output_ids[:n_new], dt, steps, s.draft_tokens, s.accepted_drafts


def step_cost(engine, ids, k: int, reps: int) -> dict:
    """Median seconds of a plain decode step (1 token, sampled) and of a verify step (1 + k
    tokens, k + 1 logits rows to the host) at the same position of one sequence, alternated; the
    plans are run directly on the runner, so the sequence's state does not move."""
    from orcd_grpc.backends.runner import PlanRow, StepPlan

    s = engine.new_sequence(ids, SamplingParams(temperature=0.0))
    engine.step([s])  # prefill: the KV of the prompt, and a first token
    bs, start = engine.allocator.block_size, s.num_cached
    engine.allocator.ensure(s.block_table, start + 1 + k)
    drafts = ids[1:1 + k]
    plain = lambda: PlanRow(s.seq_id, [s.output_ids[-1]], start, 1, s.block_table, s.prompt_ids,  # noqa: E731
                            s.output_ids, s.row, True, len(s.output_ids))
    verify = lambda: PlanRow(s.seq_id, [s.output_ids[-1], *drafts], start, 1 + k, s.block_table,  # noqa: E731
                             s.prompt_ids, s.output_ids, s.row, False, len(s.output_ids), 1 + k, drafts=drafts)
    times = {"plain": [], "verify": []}
    for _ in range(reps):
        for name, row in (("plain", plain), ("verify", verify)):
            t0 = time.perf_counter()
            engine.runner.run(StepPlan([row()], bs))
            times[name].append(time.perf_counter() - t0)
    engine.release(s)
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    return {"plain_step_s": med["plain"], "verify_step_s": med["verify"], "ratio": med["verify"] / med["plain"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=speculation.DEFAULT_DRAFT_TOKENS)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--step-reps", type=int, default=0,
                    help="also time a plain against a verify step of 1 + k tokens, this many times each")
    args = ap.parse_args()
    rows = []
    for path in args.models:
        engine = load_engine(path, backend=args.backend, max_sequences=1, max_context=2048)
        try:
            if args.step_reps:
                cost = {"model": os.path.basename(path), "k": args.k,
                        **step_cost(engine, prompt_ids(engine, TASKS["edit"]), args.k, args.step_reps)}
                rows.append(cost)
                print(json.dumps(cost), flush=True)
            for task in ([] if args.tasks == "" else args.tasks.split(",")):
                ids = prompt_ids(engine, TASKS[task])
                decode(engine, ids, speculation.OFF, 4)  # warm-up
                base = decode(engine, ids, speculation.OFF, args.tokens)
                spec = decode(engine, ids, speculation.Speculation(num_draft_tokens=args.k), args.tokens)
                for mode, (out, dt, steps, prop, kept) in (("off", base), ("ngram", spec)):
                    row = {"model": os.path.basename(path), "task": task, "mode": mode, "k": args.k,
                           "prompt_tokens": len(ids), "tokens": len(out), "decode_tok_s": (len(out) - 1) / dt,
                           "steps": steps, "draft_tokens": prop, "accepted": kept,
                           "acceptance": kept / prop if prop else 0.0, "same_as_off": out == base[0]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            engine.close()
    print("\n| model | task | mode | decode tok/s | steps | drafts | kept | acceptance | same |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ratio" in r:
            continue
        print(f"| {r['model']} | {r['task']} | {r['mode']} | {r['decode_tok_s']:.2f} | {r['steps']} | "
              f"{r['draft_tokens']} | {r['accepted']} | {r['acceptance']:.2f} | {r['same_as_off']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
