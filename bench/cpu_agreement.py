#!/usr/bin/env python3
"""Teacher-forced top-1 agreement with the float32 reference (the numpy backend), for orcd's CPU
backend and, when llama-cpp-python is importable, for llama.cpp on the same file and positions:
tests/test_cpu_backend.py's text and positions (a prefill with logits at every position, then
cached single-token steps).

    python3 bench/cpu_agreement.py [--models smollm2-135m-instruct,gemma-3-270m] [--threads 2]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import test_cpu_backend as T  # noqa: E402  (the text, positions and teacher-forced run the test uses)

from orcd_grpc.loader import load_engine  # noqa: E402


def llama_logits(path: str, ids: list[int], threads: int) -> np.ndarray | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_batch=512, n_ubatch=512, logits_all=True,
                verbose=False)
    llm.eval(ids[:T.N_PREFILL])
    for t in ids[T.N_PREFILL:]:
        llm.eval([t])
    return np.array(llm.scores[:len(ids)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(T.REAL))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print("| file | side | top-1 | decode steps top-1 | max abs diff / max abs logit |")
    print("|---|---|---:|---:|---:|")
    for name in a.models.split(","):
        path = str(T.MODELS / f"{name}.gguf")
        eng = load_engine(path, backend="cpu", max_sequences=1, max_context=512)
        ids = eng.tokenizer.encode(T.TEXT)[:T.N_PREFILL + T.N_DECODE]
        eng.close()
        ref = T._teacher_forced(path, "numpy", ids)
        sides = {"orcd cpu": T._teacher_forced(path, "cpu", ids), "llama.cpp": llama_logits(path, ids, a.threads)}
        for side, got in sides.items():
            if got is None:
                continue
            top = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
            dec = float(np.mean(got[T.N_PREFILL:].argmax(-1) == ref[T.N_PREFILL:].argmax(-1)))
            rel = float(np.abs(got - ref).max() / np.abs(ref).max())
            print(f"| {name} | {side} | {top:.4f} | {dec:.4f} | {rel:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
