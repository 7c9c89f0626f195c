"""Speculative decoding on the CUDA engine (speculation.py): a verify step runs the last token and
k drafts as one multi-token step, and the host keeps the drafts while they are the argmax.

Greedy output with speculation must be greedy output without it. The two take different kernels
for the same positions (one multi-token step against single-token decode steps: other GEMV and
attention routes, other roundings), so on a random tiny model a near-tie may flip: the outputs must
agree up to the first difference, and a difference is only allowed where the reference's two best
tokens are within 5e-2 of each other in log-probability.
"""
from __future__ import annotations

import numpy as np
import pytest

from orcd_grpc import speculation
from orcd_grpc.sampling import SamplingParams

from .test_cuda_models import write_tiny_llama

pytestmark = pytest.mark.gpu

NEAR_TIE = 5e-2


def _greedy(eng, prompt, spec, n):
    """n greedy tokens of prompt through Engine.step: [(token, top-2 [(id, logprob)])]."""
    s = eng.new_sequence(prompt, SamplingParams(temperature=0.0, top_logprobs=2, speculation=spec))
    got = []
    try:
        while len(got) < n:
            smp = eng.step([s], 512).get(s.seq_id)
            if smp is not None:
                got += [(t.token_id, t.top) for t in [smp, *(getattr(smp, "following", None) or [])]]
        return got[:n], s.draft_tokens, s.accepted_drafts
    finally:
        eng.release(s)


@pytest.mark.parametrize("qtype,verify_graphs", [("Q8_0", "0"), ("Q4_0", "0"), ("Q8_0", "1")])
def test_greedy_with_speculation_is_greedy_without(tmp_path, monkeypatch, qtype, verify_graphs):
    """verify_graphs "1" (ORCD_VERIFY_GRAPHS): the verify steps replay a captured graph."""
    from orcd_grpc.loader import load_engine

    monkeypatch.setenv("ORCD_VERIFY_GRAPHS", verify_graphs)

    path = write_tiny_llama(tmp_path / f"tiny-{qtype}.gguf", qtype)
    rng = np.random.default_rng()
    block = rng.integers(3, 320, 12).tolist()
    prompt = [1] + block + rng.integers(3, 320, 5).tolist() + block[:6]
    eng = load_engine(path, backend="cuda", max_sequences=4, max_context=256)
    try:
        ref, _, _ = _greedy(eng, prompt, speculation.OFF, 24)
        ref_ids = [t for t, _ in ref]

        def oracle(history, k, *_):  # the reference's continuation, its third token wrong
            done = len(history) - len(prompt)
            d = list(ref_ids[done:done + k])
            if len(d) >= 3:
                d[2] = (d[2] + 1) % 320
            return d
        monkeypatch.setattr(speculation, "propose_ngram", oracle)
        got, drafted, kept = _greedy(eng, prompt, speculation.Speculation(num_draft_tokens=4), 24)
        assert drafted > kept > 0, (drafted, kept)  # drafts were kept and rejected: verify steps ran
        captured = any(key[0] == "verify" for key in eng.backend._graphs)
        assert captured == (verify_graphs == "1")
        for i, ((a, _), (b, top)) in enumerate(zip(got, ref)):
            if a != b:
                gap = top[0][1] - top[1][1]
                assert gap < NEAR_TIE, f"token {i}: {a} against {b}, the reference's top two {gap:.3f} apart"
                break
        assert eng.free_blocks() == eng.total_blocks()
    finally:
        eng.close()
