#!/usr/bin/env python3
"""Whole-model agreement of a backend with the NumPy reference, for models too large to send to
the GPU machine in one call (its transfers are capped at 64 MiB, and each call gets a fresh
machine): the model runs as a chain of stage files, each small enough for one call.

A stage file holds layers [a, b) of the model with its metadata and tokenizer; the first stage has
the embedding rows of the tokens used (quantized rows copied as they are), later stages read the
previous stage's output hidden states as a float32 table in place of token_embd (looked up by
row), and head stages hold the final norm and a slice of the output matrix's rows. Each stage runs
the same schedule as the reference, on the engine: a prefill of the prompt, then single-token
cached steps teacher-forced with the reference's greedy tokens (so the GEMM and GEMV paths and both
attention paths run on real weights). The arg-max of the logits at every position is compared
with the reference's: the top-1 agreement, and whether the 32 greedy tokens would come out the
same (if each position's arg-max matches, a greedy run reproduces the reference token by token).

Steps (MODEL is the original GGUF file, DIR a work folder):
    stage_check.py prepare MODEL DIR --split 0:15,15:30 --head-rows 65536   (here, CPU reference)
    stage_check.py build DIR K [PREV.npz ...]       writes DIR/stage-K.gguf (K = 0 needs no PREV)
    stage_check.py run DIR/stage-K.gguf DIR/plan.json OUT.npz [--backend cuda]   (on the GPU)
    stage_check.py verify DIR HEAD0.npz HEAD1.npz ...                             (here)
    stage_check.py selftest MODEL DIR --split ... --head-rows N   (all of it on the NumPy backend:
                                                                   must agree exactly)
A head stage's PREV is the last layer stage's output; each head stage K gets the same PREV.
On the GPU machine, `scripts/stage_gpu.sh PLAN.json STAGE-K.gguf` does the `run` of one call.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Water boils at a temperature of",
    "The three primary colours are red,",
    "Translate to German: Good morning, how are you?\n",
]
GEN = 32


def _engine(path, backend):
    from orcd_grpc.loader import load_engine

    return load_engine(path, backend=backend, max_sequences=1, max_context=512)


def _schedule(eng, ids: list[int], n_prompt: int) -> np.ndarray:
    """Rows of every position of `ids`: a prefill of ids[:n_prompt], then one cached step per
    remaining id (teacher forcing)."""
    from orcd_grpc.sampling import SamplingParams

    s = eng.new_sequence(list(ids[:n_prompt]), SamplingParams(temperature=0.0))
    rows = [eng.score(s)] + [eng.score(s, [int(t)]) for t in ids[n_prompt:]]
    return np.concatenate(rows).astype(np.float32)


def _top2(rows: np.ndarray):
    i = np.argsort(-rows, axis=1, kind="stable")[:, :2]
    return i.astype(np.int64), np.take_along_axis(rows, i, 1).astype(np.float32)


# ---- prepare: the CPU reference and the plan ---------------------------------------------------
def prepare(model: str, out: str, split: str, head_rows: int, n_prompts: int) -> dict:
    from orcd_grpc.gguf_model import GGUFModel
    from orcd_grpc.sampling import SamplingParams

    outd = pathlib.Path(out)
    outd.mkdir(parents=True, exist_ok=True)
    eng = _engine(model, "numpy")
    try:
        seqs, ref_i, ref_v = [], [], []
        for text in PROMPTS[:n_prompts]:
            prompt = eng.tokenizer.encode(text)
            # greedy decode by teacher forcing with its own tokens: logits of every position
            s = eng.new_sequence(prompt, SamplingParams(temperature=0.0))
            rows = [eng.score(s)]
            gen = []
            for _ in range(GEN):
                gen.append(int(np.argmax(rows[-1][-1])))
                if len(gen) == GEN:
                    break
                rows.append(eng.score(s, [gen[-1]]))
            logits = np.concatenate(rows)
            i, v = _top2(logits)
            seqs.append({"prompt": prompt, "gen": gen})
            ref_i.append(i)
            ref_v.append(v)
    finally:
        eng.close()
    m = GGUFModel(model)
    n_layers = int(m.require("block_count"))
    ranges = [tuple(int(x) for x in r.split(":")) for r in split.split(",")]
    if ranges[0][0] != 0 or ranges[-1][1] != n_layers or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise SystemExit(f"--split must cover layers 0..{n_layers} in order, got {split}")
    out_name = "output.weight" if m.has("output.weight") else "token_embd.weight"
    vocab = GGUFModel.logical_shape(m.tensor(out_name))[0]
    heads = [(v0, min(vocab, v0 + head_rows)) for v0 in range(0, vocab, head_rows)]
    used = sorted({t for s in seqs for t in s["prompt"] + s["gen"]})
    plan = {"model": os.path.abspath(model), "ranges": ranges, "heads": heads, "output": out_name,
            "seqs": seqs, "used_ids": used}
    (outd / "plan.json").write_text(json.dumps(plan))
    np.savez(outd / "reference.npz", **{f"i{p}": a for p, a in enumerate(ref_i)},
             **{f"v{p}": a for p, a in enumerate(ref_v)})
    return plan


def stage_count(plan) -> int:
    return len(plan["ranges"]) + len(plan["heads"])


def _stage_ids(plan, hidden_in: bool) -> list[list[int]]:
    """The 'token ids' a stage is fed: rows of the first stage's embedding subset, or of the
    hidden-state table of a later one."""
    out, row = [], 0
    remap = {t: r for r, t in enumerate(plan["used_ids"])}
    for s in plan["seqs"]:
        ids = s["prompt"] + s["gen"][:-1]
        if not hidden_in:
            out.append([remap[t] for t in ids])
        else:
            out.append(list(range(row, row + len(ids))))
            row += len(ids)
    return out


# ---- build: one stage file ---------------------------------------------------------------------
def copy_metadata(reader, writer, replace: dict) -> None:
    """Every metadata key of a GGUFReader into a GGUFWriter (the writer sets the architecture
    itself), with the values in `replace` swapped in."""
    import gguf

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = replace.get(key, f.contents())
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, f.types[0], sub_type=f.types[1])
        else:
            writer.add_key_value(key, value, f.types[0])


def build(work: str, k: int, prev: list[str]) -> pathlib.Path:
    import gguf

    work = pathlib.Path(work)
    plan = json.loads((work / "plan.json").read_text())
    r = gguf.GGUFReader(plan["model"], "r")
    arch = str(r.fields["general.architecture"].contents())
    n_ranges = len(plan["ranges"])
    head = k >= n_ranges
    first, end = (1, 1) if head else plan["ranges"][k]
    path = work / f"stage-{k}.gguf"
    w = gguf.GGUFWriter(os.fspath(path), arch)
    # a head stage runs no layer (and must not claim layers it has no tensors for)
    copy_metadata(r, w, {f"{arch}.block_count": 1} if head else {})
    w.add_uint32("orcd.stage.first_layer", first)
    w.add_uint32("orcd.stage.end_layer", end)
    w.add_bool("orcd.stage.hidden_in", k > 0)
    w.add_bool("orcd.stage.hidden_out", not head)
    tensors = {t.name: t for t in r.tensors}
    if k == 0:
        t = tensors["token_embd.weight"]
        rows = np.ascontiguousarray(t.data[np.array(plan["used_ids"])])
        w.add_tensor("token_embd.weight", rows, raw_shape=rows.shape, raw_dtype=t.tensor_type)
    else:
        if len(prev) != 1:
            raise SystemExit("stage > 0 needs the previous layer stage's output (one .npz)")
        hidden = np.load(prev[0])
        table = np.concatenate([hidden[f"h{p}"] for p in range(len(plan["seqs"]))]).astype(np.float32)
        w.add_tensor("token_embd.weight", table)
    if head:
        v0, v1 = plan["heads"][k - n_ranges]
        t = tensors[plan["output"]]
        rows = np.ascontiguousarray(t.data[v0:v1])
        w.add_tensor("output.weight", rows, raw_shape=rows.shape, raw_dtype=t.tensor_type)
        t = tensors["output_norm.weight"]
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    else:
        for name, t in tensors.items():
            if name.startswith("blk.") and first <= int(name.split(".")[1]) < end:
                w.add_tensor(name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            elif name == "rope_freqs.weight":
                w.add_tensor(name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- run: one stage on a backend ---------------------------------------------------------------
def run(stage: str, plan_path: str, out: str, backend: str) -> dict:
    plan = json.loads(pathlib.Path(plan_path).read_text())
    eng = _engine(stage, backend)
    try:
        st = eng.adapter.stage
        res = {}
        for p, (ids, s) in enumerate(zip(_stage_ids(plan, st.hidden_in), plan["seqs"])):
            rows = _schedule(eng, ids, len(s["prompt"]))
            if st.hidden_out:
                res[f"h{p}"] = rows
            else:
                i, v = _top2(rows)
                res[f"i{p}"], res[f"v{p}"] = i, v
        np.savez(out, **res)
        return {"stage": os.path.basename(stage), "backend": eng.backend.name, "hidden_out": st.hidden_out,
                "rows": int(sum(a.shape[0] for a in res.values()) // (1 if st.hidden_out else 2))}
    finally:
        eng.close()


# ---- verify: combine the head slices, compare with the reference --------------------------------
def verify(work: str, heads: list[str]) -> dict:
    work = pathlib.Path(work)
    plan = json.loads((work / "plan.json").read_text())
    ref = np.load(work / "reference.npz")
    if len(heads) != len(plan["heads"]):
        raise SystemExit(f"{len(plan['heads'])} head outputs expected, got {len(heads)}")
    outs = [np.load(h) for h in heads]
    agree = total = 0
    greedy_same, worst_gap = [], 0.0
    for p, s in enumerate(plan["seqs"]):
        cand_i = np.concatenate([o[f"i{p}"] + v0 for o, (v0, _) in zip(outs, plan["heads"])], axis=1)
        cand_v = np.concatenate([o[f"v{p}"] for o in outs], axis=1)
        best = np.argmax(cand_v, axis=1)
        top1 = cand_i[np.arange(len(best)), best]
        top1_v = cand_v[np.arange(len(best)), best]
        r_i, r_v = ref[f"i{p}"], ref[f"v{p}"]
        same = top1 == r_i[:, 0]
        agree += int(same.sum())
        total += len(same)
        worst_gap = max(worst_gap, float(np.abs(top1_v - r_v[:, 0]).max()))
        P = len(s["prompt"])
        greedy_same.append(bool(np.array_equal(top1[P - 1:], np.array(s["gen"]))))
    return {"positions": total, "top1_agreement": agree / total, "greedy_identical": greedy_same,
            "prompts": len(plan["seqs"]), "max_abs_top1_logit_diff": worst_gap}


def selftest(model, work, split, head_rows, n_prompts) -> dict:
    """Every stage on the NumPy backend: must agree with the whole model exactly."""
    plan = prepare(model, work, split, head_rows, n_prompts)
    work = pathlib.Path(work)
    prev, heads = [], []
    for k in range(stage_count(plan)):
        path = build(work, k, prev[-1:] if k else [])
        out = work / f"out-{k}.npz"
        run(os.fspath(path), os.fspath(work / "plan.json"), os.fspath(out), "numpy")
        if k < len(plan["ranges"]):
            prev.append(os.fspath(out))
        else:
            heads.append(os.fspath(out))
    return verify(work, heads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "selftest"):
        a = sub.add_parser(name)
        a.add_argument("model")
        a.add_argument("dir")
        a.add_argument("--split", required=True)
        a.add_argument("--head-rows", type=int, default=65536)
        a.add_argument("--prompts", type=int, default=len(PROMPTS))
    a = sub.add_parser("build")
    a.add_argument("dir")
    a.add_argument("k", type=int)
    a.add_argument("prev", nargs="*")
    a = sub.add_parser("run")
    a.add_argument("stage")
    a.add_argument("plan")
    a.add_argument("out")
    a.add_argument("--backend", default="cuda")
    a = sub.add_parser("verify")
    a.add_argument("dir")
    a.add_argument("heads", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        plan = prepare(args.model, args.dir, args.split, args.head_rows, args.prompts)
        print(json.dumps({"stages": stage_count(plan), "prompts": len(plan["seqs"]),
                          "positions": sum(len(s["prompt"]) + GEN - 1 for s in plan["seqs"])}))
    elif args.cmd == "build":
        p = build(args.dir, args.k, args.prev)
        print(json.dumps({"stage": os.fspath(p), "bytes": p.stat().st_size}))
    elif args.cmd == "run":
        print(json.dumps(run(args.stage, args.plan, args.out, args.backend)))
    elif args.cmd == "verify":
        print(json.dumps(verify(args.dir, args.heads)))
    else:
        print(json.dumps(selftest(args.model, args.dir, args.split, args.head_rows, args.prompts)))


if __name__ == "__main__":
    main()
