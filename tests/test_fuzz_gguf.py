"""A fast, deterministic slice of the GGUF fuzz campaign, the regressions it found, and a check
that the harness really detects crashes and hangs (a harness that cannot see them proves nothing).

The full campaign: python -m fuzz.fuzz_gguf --cases 10000 --seed N (docs/reliability.md).
"""
from __future__ import annotations

import os
import time

import pytest

from fuzz import fuzz_gguf


def test_fast_slice_has_no_findings(tmp_path):
    t0 = time.monotonic()
    s = fuzz_gguf.campaign(300, seed=20251123, workers=1, timeout=30.0, out=str(tmp_path / "out"), log=lambda m: None)
    assert s["cases"] == 300
    bad = {k: s["outcomes"][k] for k in ("finding", "memory", "crash", "hang")}
    assert bad == {"finding": 0, "memory": 0, "crash": 0, "hang": 0}, s["findings"][:3]
    # the slice reaches every stage: files refused by the guard, by the model/engine, and accepted
    assert s["outcomes"]["accepted"] > 0 and s["rejected_at_stage"].get("guard", 0) > 150
    assert time.monotonic() - t0 < 120


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    return fuzz_gguf.build_seeds(str(d)), d


def test_seeds_are_accepted_by_the_whole_path(seeds, tmp_path):
    data, _ = seeds
    for name, blob in data.items():
        p = tmp_path / "seed.gguf"
        p.write_bytes(blob)
        outcome, detail = fuzz_gguf.run_one(str(p), name.startswith("engine:"))
        if name == "real-head":  # a header without its data: refused, by the guard
            assert outcome == "rejected" and detail.startswith("guard:"), detail
        else:
            assert outcome == "accepted", (name, detail)


def _tiny_variant(path, edit):
    """The tiny engine model with one metadata value replaced (regressions found by the fuzzer)."""
    import gguf

    fuzz_gguf._tiny_llama(path)
    r = gguf.GGUFReader(path, "r")
    out = path + ".v.gguf"
    w = gguf.GGUFWriter(out, "llama")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vt = f.types[0]
        value = f.contents()
        value = edit.get(key, value)
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vt, sub_type=f.types[1])
        else:
            w.add_key_value(key, value, vt)
    for t in r.tensors:
        w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("edit, match", [
    # case 4813 (seed 1): head_count 0 reached `d // n_heads` in the adapter (ZeroDivisionError)
    ({"llama.attention.head_count": 0}, "llama.attention.head_count: value 0 is outside"),
    # case 5179 (seed 1): a flipped bit made block_count 4194305; required_tensors looped for minutes
    ({"llama.block_count": 4194305}, "llama.block_count: value 4194305 is outside"),
    ({"llama.block_count": 40}, "40 layers but only 11 tensors"),
    # case 2382 (seed 1): a merge naming a missing piece made the tokenizers library raise a bare Exception
    ({"tokenizer.ggml.merges": ["a b", "% f"]}, r"merges\[1\] '% f': '%' is not in the vocabulary"),
])
def test_fuzz_regressions(tmp_path, edit, match):
    import re

    p = _tiny_variant(str(tmp_path / "tiny.gguf"), edit)
    outcome, detail = fuzz_gguf.run_one(p, True)
    assert outcome == "rejected" and detail.startswith("guard:") and re.search(match, detail), detail


def test_harness_detects_crash_hang_memory_and_findings(monkeypatch, tmp_path):
    """Workers forked (not from the fork server), so a patched run_one is what they run; the fake
    runs no numba kernel, which a forked child may not."""
    def fake(path, engine):
        name = os.path.basename(path)
        if name == "case1.gguf":
            os.abort()
        if name == "case2.gguf":
            time.sleep(600)
        if name == "case3.gguf":
            return "memory", "MemoryError"
        if name == "case4.gguf":
            return "finding", "ZeroDivisionError"
        return "rejected", "guard: fine"

    monkeypatch.setattr(fuzz_gguf, "run_one", fake)
    s = fuzz_gguf.campaign(7, seed=1, workers=2, timeout=3.0, out=str(tmp_path), mem_limit=0, log=lambda m: None,
                               start_method="fork")
    assert s["outcomes"] == {"accepted": 0, "rejected": 3, "finding": 1, "memory": 1, "crash": 1, "hang": 1}
    assert sorted(os.listdir(tmp_path / "findings")) == ["case1-crash.gguf", "case2-hang.gguf",
                                                         "case3-memory.gguf", "case4-finding.gguf"]
