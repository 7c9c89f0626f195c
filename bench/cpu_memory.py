#!/usr/bin/env python3
"""Where the CPU backend's resident memory goes, one part at a time, in a fresh child process per
file: the growth of anonymous and file-backed RSS (/proc/self/status RssAnon, RssFile) over

1. numba's first kernel call (its typing and lowering modules, and LLVM, which links the cached
   kernels: the file-backed part is libllvmlite.so's own pages),
2. the tokenizer built from the file's vocabulary (a fresh header read; glibc's arenas trimmed
   before each reading, so freed construction memory does not count),
3. the engine's load (weights copied out of the map, the KV cache allocated but untouched; the
   CPU backend pages LLVM's code back out before the weights load, which is why file-backed
   RSS falls there), and
4. one 128-token prompt and 32 decode steps (the KV cache's pages touched, step buffers).

    python3 bench/cpu_memory.py [--models smollm2-135m-instruct,gemma-3-270m] [--ctx 1024]

bench/cpu_bench.py gives the peak against llama.cpp's; this says what the peak is made of.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = pathlib.Path(os.environ.get("ORCD_MODEL_DIR", pathlib.Path.home() / ".cache" / "orcd" / "models"))
MiB = 1 << 20


def _rss() -> tuple[int, int]:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        s = f.read()
    return tuple(int(re.search(k + r":\s+(\d+) kB", s).group(1)) * 1024 for k in ("RssAnon", "RssFile"))


def child(path: str, ctx: int) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    from bench_engine import run_to_completion
    from gguf import GGMLQuantizationType as T

    from orcd_grpc.backends import cpu_kernels as K
    from orcd_grpc.backends import cpu_ops  # noqa: F401
    from orcd_grpc.gguf_model import GGUFModel
    from orcd_grpc.loader import load_engine
    from orcd_grpc.sampling import SamplingParams
    from orcd_grpc.tokenizer import Tokenizer

    marks = [("imports", _rss())]
    K.matmul(np.ones((1, 32), np.float32), K.QWeight(np.zeros(20 * 4, np.uint8), T.Q4_1, (4, 32)))
    marks.append(("numba's first kernel call", _rss()))
    tok = Tokenizer.from_gguf(GGUFModel(path).fields)
    marks.append(("a tokenizer", _rss()))
    del tok
    marks.append(("(tokenizer dropped)", _rss()))
    eng = load_engine(path, backend="cpu", max_sequences=1, context_length=ctx, block_size=16)
    marks.append(("load (weights, untouched KV, tokenizer)", _rss()))
    s = eng.new_sequence(list(range(100, 228)), SamplingParams(temperature=0.0))
    run_to_completion(eng, [s], 33, 8192)
    eng.release(s)
    marks.append(("128-token prompt + 32 steps", _rss()))
    return dict(marks=marks, weights=int(eng.info.weights_bytes), kv=int(eng.info.kv_cache_bytes),
                file=os.path.getsize(path))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.ctx)))
        return
    for name in a.models.split(","):
        path = MODELS / f"{name}.gguf"
        p = subprocess.run([sys.executable, __file__, "--child", str(path), "--ctx", str(a.ctx)],
                           capture_output=True, text=True)
        if p.returncode:
            print(f"{name} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"\n{name}: file {r['file'] / MiB:.0f} MiB, weights held {r['weights'] / MiB:.0f} MiB, "
              f"KV cache {r['kv'] / MiB:.0f} MiB (ctx {a.ctx})")
        print("| after | anon MiB | file MiB | anon + | file + |\n|---|---:|---:|---:|---:|")
        prev = None
        for label, (anon, file_) in r["marks"]:
            d = "" if prev is None else f"{(anon - prev[0]) / MiB:+.0f} | {(file_ - prev[1]) / MiB:+.0f}"
            print(f"| {label} | {anon / MiB:.0f} | {file_ / MiB:.0f} | {d or '|'} |")
            prev = (anon, file_)


if __name__ == "__main__":
    main()
