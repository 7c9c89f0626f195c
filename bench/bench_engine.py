#!/usr/bin/env python3
"""Engine benchmark in the shape of shared/bench/ANCHORS.md.

For one GGUF file: prefill tokens/s of a 512-token prompt, single-stream decode tokens/s over 128
tokens, aggregate decode tokens/s with 1/8/32/64 concurrent sequences (128-token prompts, 128
generated tokens each, as llama-batched-bench), time to first token, and KV memory per sequence.
Prints one JSON object per measurement and a table row; `--json FILE` collects them.

    python3 bench/bench_engine.py MODEL.gguf [--backend cuda] [--batches 1,8,32,64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))

from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.overlap import Overlap  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402


def rand_prompt(rng, n, vocab):
    return rng.integers(100, min(vocab, 30000), size=n).tolist()


def run_to_completion(engine, seqs, n_new, budget):
    """Prefills `seqs` and decodes until each has n_new tokens, through the overlap loop the
    scheduler runs (no step launched past n_new, as a request's max_tokens bounds it); returns
    (t_first_token, t_decode, decode_tokens)."""
    loop = Overlap(engine)
    follow = lambda s: len(s.output_ids) + 2 <= n_new  # noqa: E731
    t0 = time.perf_counter()
    while any(s.prefill_remaining for s in seqs):
        loop.step(seqs, budget, follow)
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    steps = 0
    while min(len(s.output_ids) for s in seqs) < n_new:
        loop.step(seqs, budget, follow)
        steps += 1
    t_dec = time.perf_counter() - t1
    loop.drain()
    return t_first, t_dec, steps * len(seqs)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--kv-cache-type", default="", help="f16, q8_0 or f32 where the backend stores it "
                    "(default: the backend's)")
    ap.add_argument("--batch-prompt", type=int, default=128,
                    help="prompt tokens of each sequence in the aggregate runs (default 128, as llama-batched-bench -npp)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]

    t = time.perf_counter()
    eng = load_engine(args.model, backend=args.backend, context_length=args.context_length,
                      max_sequences=max(batches + [1]), kv_cache_type=args.kv_cache_type)
    load_s = time.perf_counter() - t
    info = eng.info
    vocab = info.vocab_size
    rng = np.random.default_rng(0)
    greedy = SamplingParams(temperature=0.0)
    results = {"model": info.model_id, "backend": info.backend, "kv_cache_type": info.kv_cache_type,
               "batch_prompt": args.batch_prompt, "load_s": round(load_s, 2),
               "weights_bytes": info.weights_bytes, "kv_cache_bytes": info.kv_cache_bytes}
    per_token_kv = info.kv_cache_bytes / (eng.total_blocks() * eng.allocator.block_size)
    results["kv_bytes_per_token"] = per_token_kv
    results["kv_bytes_per_seq_4096"] = per_token_kv * 4096

    # Warm-up at the measured shapes (module loads, first-use library setup, graph capture): a
    # prompt of --prompt tokens, so the timed prefills meet no kernel or cuBLAS shape for the
    # first time (a 64-token warm-up left that in the first rep, which a median of two includes)
    s = eng.new_sequence(rand_prompt(rng, args.prompt, vocab), greedy)
    run_to_completion(eng, [s], 4, 4096)
    eng.release(s)

    # prefill pp512 + single-stream decode tg128 (as llama-bench: separate measurements)
    pp, tg, ttft = [], [], []
    for _ in range(args.reps):
        s = eng.new_sequence(rand_prompt(rng, args.prompt, vocab), greedy)
        t_first, t_dec, n = run_to_completion(eng, [s], args.gen + 1, 4096)
        eng.release(s)
        pp.append(args.prompt / t_first)
        ttft.append(t_first * 1e3)
        tg.append(n / t_dec)
    results["prefill_tok_s"] = statistics.median(pp)
    results["prefill_tok_s_reps"] = [round(v) for v in pp]
    results["ttft_ms_512"] = statistics.median(ttft)
    results["decode_tok_s"] = statistics.median(tg)

    # aggregate decode at B concurrent sequences (--batch-prompt prompt + --gen generated each)
    for b in batches:
        for n_new in (3, args.gen + 1):  # a short warm-up first: this batch size's graph captures
            seqs = [eng.new_sequence(rand_prompt(rng, args.batch_prompt, vocab), greedy) for _ in range(b)]
            _, t_dec, n = run_to_completion(eng, seqs, n_new, 8192)
            for s in seqs:
                eng.release(s)
        results[f"aggregate_decode_tok_s_B{b}"] = n / t_dec

    print(json.dumps(results))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(results) + "\n")
    row = " | ".join([info.model_id, f"{results['prefill_tok_s']:.0f}", f"{results['decode_tok_s']:.0f}"]
                     + [f"{results[f'aggregate_decode_tok_s_B{b}']:.0f}" for b in batches]
                     + [f"{results['ttft_ms_512']:.1f}", f"{per_token_kv * 4096 / 2**20:.1f}"])
    print("| " + row + " |")
    eng.close()


if __name__ == "__main__":
    main()
