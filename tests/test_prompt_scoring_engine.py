"""Scoring below the scheduler, on a tiny random llama (NumPy backend): the plan's scored rows,
the runner's PromptScores and the engine's delivery, against a float64 log-softmax of the logits
that Engine.score (every position's logits, teacher-forced) gives for the same prompt.

Tolerance 1e-4 absolute: both sides run the same float32 forward, only in other step shapes."""
import dataclasses
import pathlib
import sys

import numpy as np
import pytest

from orcd_grpc.backends.runner import PlanRow, prompt_scores, step_meta, StepPlan
from orcd_grpc.loader import load_engine
from orcd_grpc.sampling import SamplingParams

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gpu.test_cuda_models import write_tiny_llama  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "Q8_0")
    eng = load_engine(path, backend="numpy", max_sequences=4, max_context=256)
    yield eng
    eng.close()


def _ref(engine, ids):
    cache, engine.allocator.prefix_cache = engine.allocator.prefix_cache, False
    try:
        s = engine.new_sequence(ids, SamplingParams(temperature=0.0))
        x = np.asarray(engine.score(s), np.float64)
        engine.release(s)
    finally:
        engine.allocator.prefix_cache = cache
    m = x.max(1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def _run(engine, seqs, budget):
    """Steps seqs through their prefill (and one token each); returns {seq_id: [PromptScores]}."""
    got = {s.seq_id: [] for s in seqs}
    while any(not s.output_ids for s in seqs):
        engine.step([s for s in seqs if not s.output_ids], budget)
        for s in seqs:
            got[s.seq_id] += s.prompt_scores
            s.prompt_scores = []
    return got


def _flat(chunks):
    pos = 1
    for c in chunks:
        assert c.first == pos, "a position delivered twice or skipped"
        pos += len(c.targets)
    return (np.concatenate([c.targets for c in chunks]), np.concatenate([c.logprobs for c in chunks]),
            np.concatenate([c.top_ids for c in chunks]), np.concatenate([c.top_logprobs for c in chunks]))


@pytest.mark.parametrize("budget", [7, 16, 512])
def test_scores_in_a_batch_match_the_reference(engine, budget):
    rng = np.random.default_rng(budget)
    prompts = [[1] + rng.integers(3, 320, n).tolist() for n in (40, 5, 23)]
    seqs = [engine.new_sequence(p, SamplingParams(temperature=0.0, prompt_logprobs=k))
            for p, k in zip(prompts, (3, 0, 20))]
    plain = engine.new_sequence([1] + rng.integers(3, 320, 30).tolist(), SamplingParams(temperature=0.0))
    got = _run(engine, seqs + [plain], budget)
    assert got[plain.seq_id] == [], "a request that did not ask got scores"
    for s, p, k in zip(seqs, prompts, (3, 0, 20)):
        ref = _ref(engine, p)
        targets, lp, tid, tlp = _flat(got[s.seq_id])
        assert targets.tolist() == p[1:]
        np.testing.assert_allclose(lp, ref[np.arange(len(p) - 1), p[1:]], atol=ATOL, rtol=0)
        assert tid.shape == (len(p) - 1, k)
        np.testing.assert_allclose(tlp, np.take_along_axis(ref[:-1], tid.astype(np.int64), 1), atol=ATOL, rtol=0)
        np.testing.assert_allclose(tlp, -np.sort(-ref[:-1], axis=1)[:, :k], atol=ATOL, rtol=0)
    for s in seqs + [plain]:
        engine.release(s)
    assert engine.free_blocks() == engine.total_blocks()
    assert not engine._scoring


def test_scoring_skips_the_prefix_cache_and_a_chunk_fits_the_logits_cap(engine, monkeypatch):
    rng = np.random.default_rng(5)
    p = [1] + rng.integers(3, 320, 60).tolist()
    warm = engine.new_sequence(p, SamplingParams(temperature=0.0))
    engine.step([warm])
    engine.release(warm)
    again = engine.new_sequence(p, SamplingParams(temperature=0.0))
    engine.step([again])
    assert again.cached_prompt_tokens >= 48  # the cache holds the prompt's blocks
    engine.release(again)
    monkeypatch.setattr(engine, "capabilities", dataclasses.replace(engine.capabilities, max_logits_rows=9))
    s = engine.new_sequence(p, SamplingParams(temperature=0.0, prompt_logprobs=1))
    chunks = _run(engine, [s], 512)[s.seq_id]
    assert s.cached_prompt_tokens == 0
    assert max(len(c.targets) for c in chunks) <= 9 and len(chunks) >= 60 // 9
    targets, lp, _, _ = _flat(chunks)
    np.testing.assert_allclose(lp, _ref(engine, p)[np.arange(len(p) - 1), p[1:]], atol=ATOL, rtol=0)
    engine.release(s)


def test_a_preempted_sequence_delivers_each_position_once(engine):
    rng = np.random.default_rng(9)
    p = [1] + rng.integers(3, 320, 50).tolist()
    s = engine.new_sequence(p, SamplingParams(temperature=0.0, prompt_logprobs=2))
    engine.step([s], 20)
    first = list(s.prompt_scores)
    s.prompt_scores = []
    assert sum(len(c.targets) for c in first) == 20
    engine.release(s)  # what the scheduler's preemption does: the KV is gone, the tokens stay
    rest = _run(engine, [s], 16)[s.seq_id]
    targets, lp, _, _ = _flat(first + rest)
    assert targets.tolist() == p[1:]
    np.testing.assert_allclose(lp, _ref(engine, p)[np.arange(len(p) - 1), p[1:]], atol=ATOL, rtol=0)
    engine.release(s)


def test_plan_rows_ask_for_logits_of_scored_positions_only():
    """The runner contract: a scored row's logits rows are its scored positions and its sampled
    one; prompt_scores takes the target of each position from the prompt."""
    prompt = list(range(10, 30))
    common = dict(block_table=[0, 1], prompt_ids=prompt, output_ids=[], sampling=None)
    mid = PlanRow(1, prompt[0:8], 0, 8, sample=False, prompt_logprobs=2, **common)
    last = PlanRow(2, prompt[8:20], 8, 12, sample=True, prompt_logprobs=2, **common)
    plain = PlanRow(3, prompt[8:20], 8, 12, sample=True, **common)
    assert (mid.scored, mid.logits_count) == (8, 8)
    assert (last.scored, last.logits_count) == (11, 12)  # position 19 has no prompt token after it
    assert (plain.scored, plain.logits_count) == (0, 1)
    meta = step_meta(StepPlan([mid, last, plain], 16))
    assert meta.logits_rows.tolist() == list(range(0, 8)) + list(range(8, 20)) + [31]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 50)).astype(np.float32) * 4
    sc = prompt_scores(x, dataclasses.replace(mid, prompt_ids=list(rng.integers(0, 50, 20))))
    x64 = x.astype(np.float64)
    ref = x64 - np.log(np.exp(x64).sum(1, keepdims=True))
    assert sc.first == 1
    np.testing.assert_allclose(sc.logprobs, ref[np.arange(8), sc.targets], atol=1e-6)
    np.testing.assert_array_equal(sc.top_ids, np.argsort(-ref, axis=1, kind="stable")[:, :2])
