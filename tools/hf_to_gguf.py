#!/usr/bin/env python3
"""Convert a local Hugging Face model directory to GGUF with orcd's exporter (gguf_export.py beside it).

usage: hf_to_gguf.py MODEL_DIR OUT.gguf [--qtype F32|F16|Q8_0|Q4_0] [--expert-qtype MXFP4|Q8_0|F32]

Needs torch and transformers (the `reference` extra). Writes a minimal placeholder vocabulary:
meant for math tests and benchmarks, not for serving text.
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gguf_export import export_hf_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--qtype", default="F32")
    ap.add_argument("--expert-qtype", default="MXFP4")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, torch_dtype="float32").eval()
    print("wrote", export_hf_model(model, a.out, qtype=a.qtype, expert_qtype=a.expert_qtype))


if __name__ == "__main__":
    main()
