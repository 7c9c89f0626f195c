"""Every supported architecture against an independent reference (HF transformers).

F32: a tiny random HF model -> tools/gguf_export.py (F32 GGUF) -> orcd engine (NumPy backend) vs
transformers on the same weights. Metric: rel = max|orcd - ref| / max|ref| over all logits of a
32-token random prompt (prefill) and 16 teacher-forced cached decode steps. Bound: 1e-4.

Quantized (Q8_0, Q4_0; gpt-oss experts MXFP4): orcd on the quantized file vs a float64
transformers forward of the file's DEQUANTIZED weights (loaded back with load_gguf_into_hf).
Bound: 1e-2 relative. Each quantized case also checks that quantization really changed the
logits (vs the float model) by much more than the orcd-vs-reference error, so the comparison
could tell a wrong decoder from a right one.
"""
from __future__ import annotations

import sys
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
from tiny_models import ARCHS, N_DECODE, N_PROMPT, VOCAB, tiny_model  # noqa: E402
from tiny_models import engine_logits as _orcd_logits  # noqa: E402
from gguf_export import export_hf_model, load_gguf_into_hf  # noqa: E402

from orcd_grpc.loader import load_engine  # noqa: E402
from orcd_grpc.sampling import SamplingParams  # noqa: E402



def _hf_logits(model, ids: np.ndarray, dtype=torch.float32) -> np.ndarray:
    with torch.no_grad():
        return model.to(dtype)(torch.tensor(ids[None], dtype=torch.long)).logits[0].double().numpy()


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def ids():
    # fresh random prompt each run; N_PROMPT + N_DECODE tokens, last decode token's logits included
    return np.random.default_rng().integers(0, VOCAB, N_PROMPT + N_DECODE)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_matches_transformers(arch, ids, tmp_path):
    model = tiny_model(arch)
    path = export_hf_model(model, tmp_path / f"{arch}.gguf", qtype="F32", expert_qtype="F32")
    ref = _hf_logits(model, ids)[: N_PROMPT + N_DECODE]
    got = _orcd_logits(path, ids)
    assert got.shape == ref.shape == (N_PROMPT + N_DECODE, VOCAB)
    rel = _rel(got, ref)
    print(f"{arch} F32 rel={rel:.2e}")
    assert rel <= 1e-4, (arch, rel)


QUANT_CASES = [(a, "Q8_0") for a in ARCHS if a != "phi3_longrope"] + \
              [(a, "Q4_0") for a in ARCHS if a != "phi3_longrope"]


@pytest.mark.parametrize("arch,qtype", QUANT_CASES, ids=[f"{a}-{q}" for a, q in QUANT_CASES])
def test_quantized_matches_float64_of_dequantized(arch, qtype, ids, tmp_path):
    model = tiny_model(arch)
    float_ref = _hf_logits(model, ids)
    # gpt-oss ships MXFP4 experts; the attention/embedding matrices take qtype
    path = export_hf_model(model, tmp_path / f"{arch}-{qtype}.gguf", qtype=qtype, expert_qtype="MXFP4")
    deq = tiny_model(arch, seed=123)  # different weights, all overwritten from the file
    load_gguf_into_hf(deq, path)
    ref = _hf_logits(deq, ids, torch.float64)
    got = _orcd_logits(path, ids)
    rel = _rel(got, ref)
    quant_effect = _rel(ref, float_ref)
    print(f"{arch} {qtype} rel={rel:.2e} (quantization moved logits by {quant_effect:.2e})")
    assert rel <= 1e-2, (arch, qtype, rel)
    assert quant_effect > 20 * rel, (arch, qtype, quant_effect, rel)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_oss"])
def test_export_import_roundtrip_is_exact(arch, tmp_path):
    """The exporter's transforms (llama Q/K permutation, Gemma +1, expert de-interleave) are
    inverted exactly by load_gguf_into_hf, so the F32 file carries the model's exact weights."""
    model = tiny_model(arch)
    path = export_hf_model(model, tmp_path / "m.gguf", qtype="F32", expert_qtype="F32")
    other = tiny_model(arch, seed=7)
    load_gguf_into_hf(other, path)
    a, b = model.state_dict(), other.state_dict()
    for k in a:
        if "rotary_emb" in k:
            continue
        if arch == "gemma3" and k.endswith("norm.weight"):
            # (w + 1) - 1 in float32 is exact only to half an ulp of 1 + w
            np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=0, atol=2.5e-7, err_msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_llama_qk_rows_are_permuted(tmp_path):
    """Without the permutation llama's interleaved rope would rotate the wrong pairs; check the
    file's Q rows are the permuted HF rows (first head: HF row d/2 lands at file row 1)."""
    import gguf

    model = tiny_model("llama")
    path = export_hf_model(model, tmp_path / "m.gguf")
    q_file = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"].data
    q_hf = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    hd = model.config.hidden_size // model.config.num_attention_heads
    np.testing.assert_array_equal(q_file[1], q_hf[hd // 2])
    np.testing.assert_array_equal(q_file[0], q_hf[0])
    assert not np.array_equal(q_file[1], q_hf[1])


def test_phi3_longrope_factors_follow_served_context(tmp_path):
    """llama.cpp (llama_model::get_rope_factors) picks rope_factors_long when the per-sequence
    context exceeds rope.scaling.original_context_length and rope_factors_short otherwise, for
    every position. The tiny model: original context 16, trained 256. Served at 16, a 12-token
    prompt uses the short factors, as transformers does for a sequence of at most 16 tokens, and
    the logits agree with it (F32, <= 1e-4 relative); served at 256 the long factors apply from
    the first token and the same prompt's logits move far from that reference."""
    model = tiny_model("phi3_longrope")
    rp = model.config.rope_parameters
    path = export_hf_model(model, tmp_path / "phi3_longrope.gguf", qtype="F32")
    ids = np.random.default_rng().integers(0, VOCAB, 12)
    ref = _hf_logits(model, ids)

    def run(n_ctx):
        eng = load_engine(path, backend="numpy", max_sequences=1)
        try:
            ad = eng.adapter
            assert eng.info.context_length == 256 and ad.rope_factors_kind() == "long"  # unset: trained
            assert ad.rope_factors_kind(16) == "short" and ad.rope_factors_kind(17) == "long"
            ad.set_context_length(n_ctx)
            s = eng.new_sequence(ids.tolist(), SamplingParams(temperature=0.0))
            return np.asarray(ad.rope.freq_factors, np.float64), eng.score(s).astype(np.float64)
        finally:
            eng.close()

    short_f, short_logits = run(16)
    np.testing.assert_allclose(short_f, rp["short_factor"], rtol=1e-6)
    rel_short = _rel(short_logits, ref)
    long_f, long_logits = run(256)
    np.testing.assert_allclose(long_f, rp["long_factor"], rtol=1e-6)
    rel_long = _rel(long_logits, ref)
    print(f"phi3 LongRoPE: short@16 rel={rel_short:.2e}, long@256 rel={rel_long:.2e}")
    assert rel_short <= 1e-4, rel_short
    assert rel_long > 100 * max(rel_short, 1e-6), (rel_long, rel_short)


def test_load_engine_serves_phi3_longrope_at_its_context(tmp_path):
    """load_engine tells the adapter the per-sequence context it serves, so LongRoPE factors are
    chosen as llama.cpp chooses them: short at or under the original context (16), long above."""
    path = export_hf_model(tiny_model("phi3_longrope"), tmp_path / "p.gguf", qtype="F32", expert_qtype="F32")
    for ctx, kind in ((16, "short"), (0, "long")):
        eng = load_engine(path, backend="cpu", max_sequences=1, context_length=ctx)
        try:
            assert eng.adapter.n_ctx == eng.info.context_length
            assert eng.adapter.rope_factors_kind() == kind, (ctx, kind)
        finally:
            eng.close()
