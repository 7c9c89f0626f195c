#!/usr/bin/env python3
"""Teacher-forced top-1 agreement of a Q8_0 (and F32) KV cache with the F16 one, on the CPU
backend and the real files, with llama.cpp's own Q8_0-against-F16 figure on the same file and
positions when llama-cpp-python is importable.

The text is tests/test_cpu_backend.py's paragraph followed by CPython's own documentation
topics (pydoc_data: long, varied English prose that ships with every interpreter), cut to
`--tokens`. The prompt is fed in `--chunk`-token steps with logits at every position (prompt
attention reading the earlier chunks back from the cache), then `--decode` single-token steps
(the decode kernel). Also prints each cache's bytes.

    python3 bench/kv_agreement.py [--models smollm2-135m-instruct,gemma-3-270m] [--tokens 1024]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import test_cpu_backend as T  # noqa: E402

from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402

TOPICS = ("assignment", "if", "while", "for", "try", "with", "function", "class", "import", "exprlists")


def text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join([T.TEXT] + [topics[k] for k in TOPICS if k in topics])


def orcd_logits(path: str, ids: list[int], kv: str, chunk: int, decode: int):
    eng = load_engine(path, backend="cpu", max_sequences=1, context_length=len(ids) + 64, kv_cache_type=kv)
    try:
        n_prompt = len(ids) - decode
        s = eng.new_sequence(ids[:chunk], SamplingParams(temperature=0.0))
        rows = [eng.score(s)]
        for i in range(chunk, n_prompt, chunk):
            rows.append(eng.score(s, ids[i:min(i + chunk, n_prompt)]))
        rows += [eng.score(s, [t]) for t in ids[n_prompt:]]
        return np.concatenate(rows), int(eng.info.kv_cache_bytes)
    finally:
        eng.close()


def llama_logits(path: str, ids: list[int], kv: str, chunk: int, decode: int, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    ggml_type = {"f16": 1, "q8_0": 8}[kv]
    # a quantized V cache needs llama.cpp's flash attention; both sides use it
    llm = Llama(model_path=path, n_ctx=len(ids) + 64, n_threads=threads, n_batch=chunk, n_ubatch=chunk,
                logits_all=True, flash_attn=True, type_k=ggml_type, type_v=ggml_type, verbose=False)
    n_prompt = len(ids) - decode
    for i in range(0, n_prompt, chunk):
        llm.eval(ids[i:min(i + chunk, n_prompt)])
    for t in ids[n_prompt:]:
        llm.eval([t])
    out = np.array(llm.scores[:len(ids)])
    llm.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(T.REAL))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print(f"| file | side | KV cache | bytes | top-1 vs F16 ({a.tokens} positions) | decode steps | "
          "max abs diff / max abs logit |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in a.models.split(","):
        path = str(T.MODELS / f"{name}.gguf")
        eng = load_engine(path, backend="cpu", max_sequences=1, max_context=512)
        ids = eng.tokenizer.encode(text())[:a.tokens]
        eng.close()
        assert len(ids) == a.tokens, (name, len(ids))
        runs = {("orcd cpu", kv): orcd_logits(path, ids, kv, a.chunk, a.decode) for kv in ("f16", "q8_0", "f32")}
        for kv in ("f16", "q8_0"):
            got = llama_logits(path, ids, kv, a.chunk, a.decode, a.threads)
            if got is not None:
                runs[("llama.cpp", kv)] = got, 0
        for (side, kv), (got, nbytes) in runs.items():
            if kv == "f16":
                continue
            ref = runs[(side, "f16")][0]
            top = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
            dec = float(np.mean(got[-a.decode:].argmax(-1) == ref[-a.decode:].argmax(-1)))
            rel = float(np.abs(got - ref).max() / np.abs(ref).max())
            f16_bytes = runs[(side, "f16")][1]
            size = f"{nbytes / 2**20:.1f} MiB ({nbytes / f16_bytes:.3f} of F16)" if nbytes else ""
            print(f"| {name} | {side} | {kv} | {size} | {top:.4f} | {dec:.4f} | {rel:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
