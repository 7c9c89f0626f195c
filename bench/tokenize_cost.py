#!/usr/bin/env python3
"""What tokenizing a large prompt costs, the figures behind the prompt size limits
(docs/reliability.md, "Hostile prompts"): seconds and peak heap per input byte, how long the GIL
stays held by `tokenizers`' `encode` against `encode_batch`, and the resident memory left after
the call with and without `malloc_trim`. Each measurement runs in a fresh process, so that one's
heap does not hide the next one's.

    python3 bench/tokenize_cost.py [--model smollm2-135m-instruct] [--mb 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, random, resource, sys, threading, time
sys.path.insert(0, sys.argv[1])
from orcd_grpc import model_store
from orcd_grpc.prompt_guard import release_heap
from orcd_grpc.tokenizer import Tokenizer

mode, n_bytes = sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_gguf_file(model_store.ensure_model(sys.argv[4]))
rng = random.Random(0)
words = ["the", "capital", "of", "France", "is", "Paris", "tokens", "worker", "1234", "naïve", "—", "GPU"]
text = " ".join(rng.choice(words) for _ in range(n_bytes // 4))[:n_bytes]


def rss_mib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


ticks, stop = [], threading.Event()


def ticker():  # how often another Python thread gets to run while the text is tokenized
    while not stop.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)


before, peak0 = rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
th = threading.Thread(target=ticker, daemon=True)
th.start()
t0 = time.perf_counter()
hf = tok._hf
if mode == "encode":
    ids = hf.encode(text, add_special_tokens=False).ids
else:
    ids = hf.encode_batch([text], add_special_tokens=False)[0].ids
seconds = time.perf_counter() - t0
stop.set()
th.join()
gaps = [b - a for a, b in zip(ticks, ticks[1:])] or [seconds]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
del ids
after = rss_mib()
release_heap(10 ** 9)  # trim regardless of size
trimmed = rss_mib()
print(json.dumps({"mode": mode, "bytes": len(text.encode()), "seconds": round(seconds, 3),
                  "us_per_byte": round(1e6 * seconds / len(text.encode()), 3),
                  "heap_bytes_per_byte": round((peak - max(peak0, before)) * 2**20 / len(text.encode()), 1),
                  "longest_other_thread_wait_s": round(max(gaps), 3),
                  "rss_before_mib": round(before, 1), "rss_after_mib": round(after, 1),
                  "rss_after_trim_mib": round(trimmed, 1)}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--mb", type=float, default=4.0, help="megabytes of text (10^6 bytes)")
    args = ap.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for mode in ("encode", "encode_batch"):
        out = subprocess.run([sys.executable, "-c", _CHILD, repo, mode, str(int(args.mb * 1e6)), args.model],
                             capture_output=True, text=True, check=True)
        print(json.dumps(json.loads(out.stdout.strip().splitlines()[-1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
