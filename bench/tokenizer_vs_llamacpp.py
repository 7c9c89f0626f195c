#!/usr/bin/env python3
"""orcd's tokenizer against llama.cpp's (llama-cpp-python, vocab_only) on random texts: pieces of
the vocabulary, control-token text, ASCII, multi-byte and out-of-vocabulary characters, with
special-text parsing off (encode) and on (encode_special). Prints the differing texts (the first
few) and a count per file and mode.

    PYTHONPATH=<llama-cpp-python> LLAMA_CPP_LIB_PATH=<its lib> python3 bench/tokenizer_vs_llamacpp.py \
        [--files <a.gguf>,...] [--texts 1500] [--seed 0]

Default files: shared/vocab's conformance vocabularies and the real Gemma 3 file where present.
"""
from __future__ import annotations

import argparse
import pathlib
import random
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orcd_grpc import model_store  # noqa: E402
from orcd_grpc.tokenizer import Tokenizer, read_gguf_metadata  # noqa: E402

ALPHABET = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 \n\t.,;:!?'\"-()[]{}<>/\\|@#$%^&*_=+~`")
            + list("éüßñçøåæœ中文日本語한국어Ελληνικάкириллица") + ["🙂", "🦩", "𐍈", "  ", "\r\n", "> </"])


def _default_files() -> list[pathlib.Path]:
    shared = next((p for p in (ROOT / "shared", ROOT.parent / "shared") if (p / "vocab").is_dir()), None)
    files = sorted((shared / "vocab").glob("ggml-vocab-*.gguf")) if shared else []
    gemma = model_store.model_dir() / "gemma-3-270m.gguf"
    return files + ([gemma] if gemma.exists() else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", default="")
    ap.add_argument("--texts", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import llama_cpp

    files = [pathlib.Path(f) for f in a.files.split(",") if f] or _default_files()
    for path in files:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        tok = Tokenizer.from_gguf_file(path)
        tokens = [t for t in read_gguf_metadata(path)["tokenizer.ggml.tokens"] if t]
        special = [t for i, t in enumerate(tokens) if tok.is_special(i)][:200]
        rng = random.Random(a.seed)
        for mode in ("encode", "encode_special"):
            bad = 0
            for _ in range(a.texts):
                parts = []
                for _ in range(rng.randint(1, 12)):
                    r = rng.random()
                    if r < 0.1 and special:
                        parts.append(rng.choice(special))
                    elif r < 0.55:
                        parts.append(rng.choice(tokens).replace("\u2581", " "))
                    else:
                        parts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 8))))
                text = "".join(parts)
                want = llm.tokenize(text.encode(), add_bos=False, special=mode == "encode_special")
                got = getattr(tok, mode)(text, add_bos=False)
                if got != want:
                    bad += 1
                    if bad <= 3:
                        print(f"  {path.name} {mode}: {text!r}\n    orcd {got}\n    llama.cpp {want}")
            print(f"{path.name}: {mode}: {bad} of {a.texts} texts differ", flush=True)
        llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
