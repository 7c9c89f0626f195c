#!/usr/bin/env python3
"""orcd's CPU backend against llama.cpp (llama-cpp-python) on the same GGUF files, in one run.

For each file, each side runs in its own child process (so its peak RSS is its own), sides
alternating: prefill tok/s of a `--prompt`-token prompt (pp), single-sequence decode tok/s over
`--gen` tokens (tg, greedy, each step's logits computed), and resident memory: the child's peak
RSS, its RSS before the model was opened (interpreter and libraries; numba's compiled kernels load
at first use, after it) and the difference, set against the file's size plus the KV cache the side
allocated; and the weights' resident bytes (the file's mapped pages, plus on orcd's side the
packed matrices' copies). Same prompt ids,
same context (`--ctx`), same thread count (`--threads`: llama.cpp's n_threads, numba's
NUMBA_NUM_THREADS). Medians of `--reps` repetitions after one warm-up.

    python3 bench/cpu_bench.py [--models smollm2-135m-instruct,gemma-3-270m] [--prompt 128] [--gen 128]

llama-cpp-python is not a dependency of orcd (`pip install llama-cpp-python` builds llama.cpp);
without it only orcd's side runs.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = pathlib.Path(os.environ.get("ORCD_MODEL_DIR", pathlib.Path.home() / ".cache" / "orcd" / "models"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mapped_rss(path: str) -> int:
    """Resident bytes of the process's mappings of `path` (the model file's pages in memory)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def _prompt(n: int, vocab: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(100, min(vocab, 30000), size=n).tolist()


def child_orcd(path: str, a) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    from bench_engine import run_to_completion

    from orcd_grpc.backends import cpu_kernels, cpu_ops  # noqa: F401  (libraries in the baseline)
    from orcd_grpc.loader import load_engine
    from orcd_grpc.sampling import SamplingParams

    base = _rss()
    t = time.perf_counter()
    eng = load_engine(path, backend="cpu", max_sequences=1, context_length=a.ctx, block_size=16)
    load_s = time.perf_counter() - t
    greedy = SamplingParams(temperature=0.0)
    ids = _prompt(a.prompt, eng.info.vocab_size)

    def one():
        # the scheduler's own loop: the prompt in one step (logits of its last row only, as
        # llama.cpp's), then one greedy token per step
        s = eng.new_sequence(ids, greedy)
        t_first, t_dec, n = run_to_completion(eng, [s], a.gen + 1, 8192)
        eng.release(s)
        return a.prompt / t_first, n / t_dec

    one()  # warm-up: numba's cached kernels, the pages of the map
    runs = [one() for _ in range(a.reps)]
    # the weights' resident bytes: the file's mapped pages plus the packed copies (anonymous)
    mapped = eng.model.data
    copies = sum(p.nbytes for w in eng.adapter.w.values() for p in (w if isinstance(w, list) else [w])
                 if isinstance(p, cpu_kernels.QWeight) and not np.may_share_memory(p.raw, mapped))
    out = dict(load_s=load_s, kv_bytes=int(eng.info.kv_cache_bytes), weights_bytes=int(eng.info.weights_bytes),
               pp=statistics.median(r[0] for r in runs), tg=statistics.median(r[1] for r in runs),
               base_rss=base, rss=_rss(), peak_rss=_peak(), weights_resident=_mapped_rss(path) + copies)
    eng.close()
    return out


def child_llama(path: str, a) -> dict:
    import numpy as np
    from llama_cpp import Llama

    base = _rss()
    t = time.perf_counter()
    # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores and writes each step's at its
    # position; n_ubatch = the prompt: the prompt is one ggml graph, as orcd's prefill is one step
    llm = Llama(model_path=path, n_ctx=a.ctx, n_threads=a.threads, n_threads_batch=a.threads, n_batch=a.ctx,
                n_ubatch=a.prompt, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t
    ids = _prompt(a.prompt, llm.n_vocab())

    def one():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(a.gen):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        return a.prompt / (t1 - t0), a.gen / (t2 - t1)

    one()
    runs = [one() for _ in range(a.reps)]
    # llama.cpp's KV cache: n_ctx x layers x kv heads x (k + v dims), F16
    meta = llm.metadata
    arch = meta.get("general.architecture", "")
    n_layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 0))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    d = int(meta.get(f"{arch}.embedding_length", 0))
    dk = int(meta.get(f"{arch}.attention.key_length", d // max(1, heads)))
    dv = int(meta.get(f"{arch}.attention.value_length", dk))
    kv = a.ctx * n_layers * kv_heads * (dk + dv) * 2
    return dict(load_s=load_s, kv_bytes=kv, pp=statistics.median(r[0] for r in runs),
                tg=statistics.median(r[1] for r in runs), base_rss=base, rss=_rss(), peak_rss=_peak(),
                weights_resident=_mapped_rss(path))


def run_child(side: str, path: pathlib.Path, a) -> dict | None:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               OPENBLAS_NUM_THREADS=str(a.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, __file__, "--child", side, "--path", str(path), "--prompt", str(a.prompt),
           "--gen", str(a.gen), "--ctx", str(a.ctx), "--reps", str(a.reps), "--threads", str(a.threads)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        print(f"{side} on {path.name} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma-3-270m")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="append the results, one JSON object per line")
    ap.add_argument("--child", choices=("orcd", "llama"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps((child_orcd if a.child == "orcd" else child_llama)(a.path, a)))
        return
    try:
        import llama_cpp  # noqa: F401
        sides = ("orcd", "llama")
    except ImportError:
        print("llama-cpp-python not installed: orcd only", file=sys.stderr)
        sides = ("orcd",)
    MiB = 1 << 20
    print(f"| file | side | pp{a.prompt} tok/s | tg{a.gen} tok/s | peak RSS MiB | RSS before load MiB | "
          f"difference MiB | file + KV MiB | difference / (file + KV) | weights resident MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for name in a.models.split(","):
        path = MODELS / f"{name}.gguf"
        if not path.exists():
            print(f"{path} missing (orcd models pull {name})", file=sys.stderr)
            continue
        size = path.stat().st_size
        for side in sides:
            r = run_child(side, path, a)
            if r is None:
                continue
            grown = r["peak_rss"] - r["base_rss"]
            budget = size + r["kv_bytes"]
            r.update(file=name, side=side, file_bytes=size, threads=a.threads, prompt=a.prompt, gen=a.gen,
                     ctx=a.ctx, grown=grown, grown_ratio=grown / budget)
            results.append(r)
            print(f"| {name} | {'orcd cpu' if side == 'orcd' else 'llama-cpp-python'} | {r['pp']:.1f} | "
                  f"{r['tg']:.1f} | {r['peak_rss'] / MiB:.0f} | {r['base_rss'] / MiB:.0f} | {grown / MiB:.0f} | "
                  f"{budget / MiB:.0f} | {grown / budget:.2f} | {r['weights_resident'] / MiB:.0f} |", flush=True)
    for name in a.models.split(","):
        o = [r for r in results if r["file"] == name and r["side"] == "orcd"]
        l_ = [r for r in results if r["file"] == name and r["side"] == "llama"]
        if o and l_:
            print(f"{name}: orcd/llama.cpp decode {o[0]['tg'] / l_[0]['tg']:.2f}, prefill {o[0]['pp'] / l_[0]['pp']:.2f}")
    if a.json:
        with open(a.json, "a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
