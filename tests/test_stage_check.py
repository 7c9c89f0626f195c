"""bench/stage_check.py: a model cut into stage files (layer ranges, then head slices of the
vocabulary), run stage by stage on the NumPy backend, gives exactly the full model's arg-max and
top logit (to float32 rounding) at every position. This is what makes its GPU run (one stage per device call) evidence
about the whole model."""
from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "gpu"))
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "bench"))
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "tools"))

import stage_check  # noqa: E402


def _check(model, work, split):
    res = stage_check.selftest(str(model), str(work), split, head_rows=120, n_prompts=2)
    assert res["top1_agreement"] == 1.0, res
    # the same float32 arithmetic, except that a vocabulary slice's matmul may sum in another order
    assert res["max_abs_top1_logit_diff"] <= 1e-5, res
    assert res["greedy_identical"] == [True, True], res
    # two layer ranges, then the vocabulary in slices of 120 rows
    import json

    plan = json.loads((work / "plan.json").read_text())
    vocab = plan["heads"][-1][1]
    assert [tuple(h) for h in plan["heads"]] == [(v, min(v + 120, vocab)) for v in range(0, vocab, 120)]
    n = 2 + len(plan["heads"])
    assert len(plan["heads"]) >= 3
    assert sorted(p.name for p in work.glob("stage-*.gguf")) == sorted(f"stage-{k}.gguf" for k in range(n))


def test_tiny_llama_stages_compose_exactly(tmp_path):
    from test_cuda_models import write_tiny_llama

    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model, "Q8_0", n_layers=3)
    _check(model, tmp_path / "work", "0:1,1:3")


def test_tiny_gemma3_stages_compose_exactly(tmp_path):
    """gemma3 scales its embedding; a stage reading hidden states must not scale them again."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from gguf_export import export_hf_model
    from tiny_models import tiny_model

    model = export_hf_model(tiny_model("gemma3"), tmp_path / "g.gguf", qtype="Q8_0")
    _check(model, tmp_path / "work", "0:4,4:6")  # a cut between sliding-window layers and the global one


def test_stage_file_missing_a_layer_tensor_is_refused(tmp_path):
    import gguf

    from orcd_grpc.loader import load_engine
    from orcd_grpc.errors import InvalidArgument
    from test_cuda_models import write_tiny_llama

    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model, "F32", n_layers=3)
    stage_check.prepare(str(model), str(tmp_path / "w"), "0:2,2:3", head_rows=400, n_prompts=1)
    path = stage_check.build(str(tmp_path / "w"), 0, [])
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    stage_check.copy_metadata(r, w, {})
    for t in r.tensors:
        if t.name != "blk.1.ffn_down.weight":
            w.add_tensor(t.name, t.data.copy(), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidArgument, match="blk.1.ffn_down.weight"):
        load_engine(tmp_path / "bad.gguf", backend="cpu", max_sequences=1, max_context=64)
