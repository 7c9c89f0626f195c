"""bench/constraint_cost.py runs end to end on a tiny random model (CPU backend, tiny sizes), so the
benchmark the lead runs on the GPU cannot rot: both runs decode every token, the constrained
sequences' matchers neither stop early nor fail, and a mask-fill time is measured."""
from __future__ import annotations

import pathlib
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llguidance")

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))
from tiny_models import tiny_model  # noqa: E402
from gguf_export import export_hf_model  # noqa: E402

import constraint_cost  # noqa: E402


def test_constraint_cost_bench_on_a_tiny_model(tmp_path, capsys):
    path = export_hf_model(tiny_model("llama"), tmp_path / "tiny.gguf", qtype="F32")
    out = constraint_cost.main([str(path), "--backend", "cpu", "--batches", "1,3", "--gen", "12",
                                 "--context-length", "256"])
    for b in (1, 3):
        r = out[f"B{b}"]
        assert r["free_tok_s"] > 0 and r["constrained_tok_s"] > 0
        assert r["ratio"] == pytest.approx(r["constrained_tok_s"] / r["free_tok_s"])
        assert r["fill_us_per_row"] > 0          # the timer saw the runner fill masks
        assert r["matchers_ended_early"] == 0    # the schema outlasts the run, no matcher failed
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 and rows[1].split("|")[3].strip() == "3"


def test_schema_forces_long_outputs():
    s = constraint_cost.schema(128)
    assert s["minItems"] == 128 and s["items"]["required"]
