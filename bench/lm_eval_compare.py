"""lm-evaluation-harness through orcd's OpenAI front door vs. its Hugging Face backend (issue #21).

    python3 bench/lm_eval_compare.py --limit 100

Scores the same GGUF twice with the same lm-eval tasks (bench/lm_eval_tasks: ARC-Easy and
HellaSwag validation, read offline) and the same tokenizer (the GGUF's, as transformers reads it):
once with `--model hf` (transformers dequantizes the GGUF to float32 and runs it in torch), once
with `--model local-completions` against `orcd serve --http-port` (loglikelihood through
`/v1/completions` with echo and logprobs). It prints both scores per metric and how far apart the
per-choice log-likelihoods are, and exits 1 when a score differs by more than its standard error.

Both lm-eval runs are subprocesses started with the exact command lines printed, so a run can be
repeated by hand. `--base-url` scores a worker that is already running instead of starting one.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "bench" / "lm_eval_tasks"
DEFAULT_MODEL = Path.home() / ".cache" / "orcd" / "models" / "smollm2-135m-instruct.gguf"
METRICS = ("acc", "acc_norm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    print("$", shlex.join(cmd), flush=True)
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc:
        sys.exit(f"exit {rc}; see {log}")


def save_tokenizer(gguf: Path, out: Path) -> Path:
    """lm-eval's local-completions loads a tokenizer by directory (no gguf_file argument), so the
    GGUF's own tokenizer, as transformers converts it for the hf backend, is saved to one (each
    run: --out may have held another model's)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def lm_eval_cmd(model: str, model_args: dict, args, out: Path, extra: list[str]) -> list[str]:
    margs = ",".join(f"{k}={v}" for k, v in model_args.items())
    return [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", margs,
            "--tasks", args.tasks, "--include_path", str(TASKS_DIR), "--limit", str(args.limit),
            "--output_path", str(out), "--log_samples", *extra]


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"orcd serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    sys.exit(f"{url} not ready after {seconds:.0f} s")


def model_id(base: str) -> str:
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def run_hf(args, out: Path) -> None:
    env = dict(os.environ)
    # One torch thread: on a shared, oversubscribed machine OpenMP's spinning threads cost more
    # than they give (set OMP_NUM_THREADS to override).
    env.setdefault("OMP_NUM_THREADS", "1")
    margs = {"pretrained": args.model.parent, "gguf_file": args.model.name, "dtype": "float32"}
    run(lm_eval_cmd("hf", margs, args, out / "hf", ["--batch_size", str(args.hf_batch_size),
                                                    "--device", "cpu"]), out / "hf.log", env)


def run_orcd(args, tok: Path, out: Path) -> None:
    proc = None
    base = args.base_url
    if base is None:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("OPENBLAS_NUM_THREADS", "1")  # as OMP_NUM_THREADS above, for NumPy's BLAS
        cmd = [sys.executable, "-m", "orcd_grpc", "serve", "--model", str(args.model),
               "--backend", args.backend, "--port", str(free_port()), "--http-port", str(port)]
        print("$", shlex.join(cmd), flush=True)
        log = (out / "serve.log").open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_http(base + "/health", 900, proc)
        margs = {"model": model_id(base), "base_url": base + "/v1/completions",
                 "tokenizer_backend": "huggingface", "tokenizer": tok,
                 "num_concurrent": args.num_concurrent, "max_retries": 1}
        run(lm_eval_cmd("local-completions", margs, args, out / "orcd", []), out / "orcd.log")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def latest(out: Path, pattern: str) -> Path:
    found = sorted(glob.glob(str(out / "*" / pattern)), key=os.path.getmtime)
    if not found:
        sys.exit(f"no {pattern} under {out}")
    return Path(found[-1])


def loglikelihoods(path: Path) -> dict[int, list[float]]:
    # resps: per choice, [[loglikelihood, is_greedy]] (as strings)
    rows = (json.loads(line) for line in path.open())
    return {r["doc_id"]: [float(c[0][0]) for c in r["resps"]] for r in rows}


def report(args, out: Path) -> bool:
    res = {side: json.loads(latest(out / side, "results_*.json").read_text())["results"]
           for side in ("hf", "orcd")}
    print(f"\n--limit {args.limit}; ± is lm-eval's standard error of the mean; agree: the scores "
          "differ by at most the larger of the two\n")
    print("| task | metric | HF transformers | orcd HTTP | orcd − HF | agree |")
    print("| --- | --- | --- | --- | --- | --- |")
    ok = True
    for task in args.tasks.split(","):
        for m in METRICS:
            h, o = res["hf"][task], res["orcd"][task]
            hv, ov = h[f"{m},none"], o[f"{m},none"]
            se = max(h[f"{m}_stderr,none"], o[f"{m}_stderr,none"])
            agree = abs(hv - ov) <= se or math.isclose(hv, ov)
            ok &= agree
            print(f"| {task} | {m} | {hv:.4f} ± {h[f'{m}_stderr,none']:.4f} | "
                  f"{ov:.4f} ± {o[f'{m}_stderr,none']:.4f} | {ov - hv:+.4f} | "
                  f"{'yes' if agree else 'NO'} |")
    print()
    for task in args.tasks.split(","):
        a = loglikelihoods(latest(out / "hf", f"samples_{task}_*.jsonl"))
        b = loglikelihoods(latest(out / "orcd", f"samples_{task}_*.jsonl"))
        diffs = [abs(x - y) for d in a for x, y in zip(a[d], b[d], strict=True)]
        flips = sum(max(range(len(a[d])), key=a[d].__getitem__)
                    != max(range(len(b[d])), key=b[d].__getitem__) for d in a)
        print(f"{task}: {len(a)} docs, {len(diffs)} choices; per-choice log-likelihood |orcd − HF| max "
              f"{max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e}; docs whose acc answer differs: "
              f"{flips}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file (default: %(default)s)")
    p.add_argument("--tasks", default="arc_easy_val,hellaswag_val")
    p.add_argument("--limit", type=int, default=100, help="documents per task")
    p.add_argument("--out", type=Path, default=Path("/tmp/orcd-lm-eval"))
    p.add_argument("--base-url", help="an orcd HTTP front door already serving --model "
                   "(http://HOST:PORT); default: start one")
    p.add_argument("--backend", default="cpu", choices=("cpu", "numpy", "cuda"),
                   help="the started server's backend; numpy (float32 weights and KV) is the one whose "
                   "log-likelihoods match the hf side's float32 to rounding (default: %(default)s)")
    p.add_argument("--num-concurrent", type=int, default=1)
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--skip", choices=("hf", "orcd"), action="append", default=[],
                   help="reuse that side's results already under --out")
    p.add_argument("--report-only", action="store_true", help="only print the table from --out")
    args = p.parse_args()
    args.model = args.model.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        sys.path.insert(0, str(TASKS_DIR))
        import orcd_eval_data

        orcd_eval_data.fetch()
        tok = save_tokenizer(args.model, args.out / "tokenizer")
        if "hf" not in args.skip:
            run_hf(args, args.out)
        if "orcd" not in args.skip:
            run_orcd(args, tok, args.out)
    sys.exit(0 if report(args, args.out) else 1)


if __name__ == "__main__":
    main()
