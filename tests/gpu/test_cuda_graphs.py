"""Decode steps replayed as CUDA graphs, and sampling on the GPU, through Engine.step.

The same schedule (sequences of different lengths joining and leaving, so batch buckets change
and padding rows appear) runs on the CUDA engine with graphs, the CUDA engine without them and
the NumPy engine: greedy tokens must be identical with and without graphs, agree with the NumPy
engine (see below), and the reported logprobs agree with the NumPy engine's within 2e-2
(f16 KV cache, f16 tensor-core prefill tiles).
"""
from __future__ import annotations

import numpy as np
import pytest

from orcd_grpc.sampling import SamplingParams

from .test_cuda_models import write_tiny_llama

pytestmark = pytest.mark.gpu


def _run_schedule(engine, prompts, n_new, leave_after=None, join=None):
    """Steps the engine until every sequence has n_new tokens. Sequence 0 leaves after
    `leave_after` tokens; `join` (a prompt) joins once the first sequence has 3 tokens."""
    params = SamplingParams(temperature=0.0, top_logprobs=3)
    seqs = [engine.new_sequence(p, params) for p in prompts]
    running, done, logprobs = list(seqs), {}, {s.seq_id: [] for s in seqs}
    joined = None
    while running:
        out = engine.step(running, 512)
        for s in list(running):
            smp = out.get(s.seq_id)
            if smp is not None:
                logprobs[s.seq_id].append(smp.logprob)
            if len(s.output_ids) >= n_new or (s is seqs[0] and leave_after and len(s.output_ids) >= leave_after):
                done[s.seq_id] = list(s.output_ids)
                running.remove(s)
                engine.release(s)
        if join is not None and joined is None and len(seqs[0].output_ids) >= 3:
            joined = engine.new_sequence(join, params)
            logprobs[joined.seq_id] = []
            running.append(joined)
    order = seqs + ([joined] if joined is not None else [])
    return [done[s.seq_id] for s in order], [logprobs[s.seq_id] for s in order]


@pytest.mark.parametrize("qtype,blas_min", [("Q8_0", None), ("Q4_0", None), ("Q8_0", "2")])
def test_graph_decode_matches_eager_and_numpy(tmp_path, monkeypatch, qtype, blas_min):
    """blas_min "2": every matmul of two or more tokens runs on cuBLAS (cuda_blas), inside the
    captured decode graphs too."""
    from orcd_grpc.loader import load_engine

    monkeypatch.setenv("ORCD_PDL", "1")
    if blas_min:
        monkeypatch.setenv("ORCD_GEMM_BLAS_MIN", blas_min)

    path = write_tiny_llama(tmp_path / f"tiny-{qtype}.gguf", qtype)
    rng = np.random.default_rng(11)
    prompts = [[1] + rng.integers(3, 320, n).tolist() for n in (5, 40, 17)]
    join = [1] + rng.integers(3, 320, 23).tolist()
    results = {}
    for name, kind, graphs in (("graph", "cuda", True), ("eager", "cuda", False), ("numpy", "numpy", False)):
        eng = load_engine(path, backend=kind, max_sequences=8, max_context=512)
        try:
            if not graphs:
                eng.runner.buckets = []  # every step eager (and none queued)
            results[name] = _run_schedule(eng, prompts, 20, leave_after=6, join=join)
            if name == "graph":
                keys = set(eng.backend._graphs)
                assert keys, "no decode step was captured as a CUDA graph"
                assert {k[1] for k in keys} <= set(eng.runner.buckets)
                # ORCD_PDL (the default, from sm_90): the captured kernels follow each other through
                # programmatic edges; otherwise none
                pdl = eng.backend._pdl
                assert all((g.programmatic_edges > 0) == pdl for g, *_ in eng.backend._graphs.values())
        finally:
            eng.close()
    toks_g, lp_g = results["graph"]
    toks_e, lp_e = results["eager"]
    toks_n, lp_n = results["numpy"]
    assert toks_g == toks_e, "graph replay and eager launches chose different tokens"
    # A random tiny model has near-ties that f16 rounding may flip, after which the two
    # continuations differ for good: compare the first 8 tokens, and logprobs up to a split.
    for g, n, a, b in zip(toks_g, toks_n, lp_g, lp_n):
        assert g[:8] == n[:8], "CUDA and NumPy engines chose different greedy tokens"
        same = next((i for i, (x, y) in enumerate(zip(g, n)) if x != y), len(g))
        np.testing.assert_allclose(a[:same], b[:same], rtol=2e-2, atol=2e-2)


def test_gpu_sampling_is_seeded(tmp_path):
    from orcd_grpc.loader import load_engine

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    eng = load_engine(path, backend="cuda", max_sequences=4, max_context=256)
    try:
        assert eng.capabilities.device_sampling

        def sample(seed):
            s = eng.new_sequence([1, 7, 9, 11], SamplingParams(temperature=1.5, top_p=0.95, seed=seed))
            try:
                while len(s.output_ids) < 24:
                    eng.step([s])
                return list(s.output_ids)
            finally:
                eng.release(s)

        a, b, c = sample(5), sample(5), sample(6)
        assert a == b, "the same seed gave different tokens"
        assert a != c, "different seeds gave the same 24 tokens"
        assert all(0 <= t < eng.info.vocab_size for t in a + c)
    finally:
        eng.close()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_lookahead_matches_step_by_step(tmp_path, qtype, monkeypatch):
    """The overlap loop on the GPU: decode steps queued before the host reads the previous step's
    tokens (fed on the device, host twins alternating, waits on events) must give exactly the
    tokens and top logprobs of step-by-step graph replay, while the batch changes (a sequence
    finishes with a step of it queued, one joins, one leaves unreleased and resumes)."""
    import sys
    from pathlib import Path

    from orcd_grpc.loader import load_engine

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from schedules import changing_batch

    path = write_tiny_llama(tmp_path / f"tiny-{qtype}.gguf", qtype)
    rng = np.random.default_rng()
    prompts = [[1] + rng.integers(3, 320, int(k)).tolist() for k in rng.integers(2, 60, 4)]
    runs = {}
    for mode in ("changed", "lookahead", "plain"):
        # ORCD_FEED_CHANGED: the steps of the changed batches are queued and fed too (rows copied
        # from where the step before sampled them; a joining prompt on a mixed-step graph)
        monkeypatch.setenv("ORCD_FEED_CHANGED", "1" if mode == "changed" else "0")
        eng = load_engine(path, backend="cuda", max_sequences=8, max_context=512)
        fed, changed = [], []
        step = eng.backend.graph_step

        def counting(key, meta, record, feed=None, overlap=False, feed_rows=None):
            fed.append(feed is not None)
            changed.append(feed is not None and (feed_rows not in (None, [(0, 0, feed.R)]) or key[0] == "mixed"))
            return step(key, meta, record, feed=feed, overlap=overlap, feed_rows=feed_rows)

        eng.backend.graph_step = counting
        try:
            assert eng.capabilities.overlap and eng.capabilities.overlap_changed == (mode == "changed")
            eng.runner.lookahead = mode != "plain"
            free0 = eng.free_blocks()
            got, outputs, c_queued = changing_batch(eng, prompts, top_logprobs=2)
            runs[mode] = got
            assert got == outputs
            assert eng.free_blocks() + len(eng.allocator._evictable) >= free0
            if mode != "plain":
                assert sum(fed) >= 5 and c_queued, (sum(fed), c_queued)
                assert (sum(changed) >= 5) == (mode == "changed"), sum(changed)
            else:
                assert not any(fed)
        finally:
            eng.close()
    assert runs["lookahead"] == runs["plain"] == runs["changed"]


def test_an_eager_step_feeds_the_decode_step_after_it(tmp_path):
    """ORCD_FEED_EAGER on the GPU: a step carrying a new prompt beside a running decode row runs
    eagerly and samples without a wait; the decode step after it is queued behind it and fed its
    tokens on the device ("decode_ahead" right after "prefill"). Every sequence gets the tokens of
    step-by-step decoding without lookahead (seeded sampling: the token index is the counter)."""
    import sys
    from pathlib import Path

    from orcd_grpc.loader import load_engine

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from schedules import join_beside_decoding

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    rng = np.random.default_rng()
    prompts = [[1] + rng.integers(3, 320, int(k)).tolist() for k in rng.integers(3, 60, 3)]
    runs = {}
    for mode in ("feed", "plain"):
        eng = load_engine(path, backend="cuda", max_sequences=4, max_context=512)
        try:
            eng.runner.lookahead = mode == "feed"
            params = [SamplingParams(temperature=0.8, seed=i + 11) for i in range(3)]
            runs[mode] = join_beside_decoding(eng, prompts, params, 5)
        finally:
            eng.close()
    (fa, fc), kinds = runs["feed"]
    (pa, pc), _ = runs["plain"]
    assert fa[: len(pa)] == pa and fc[: len(pc)] == pc  # drained steps ahead add tokens after the plain ones
    assert "prefill" in kinds and kinds[kinds.index("prefill") + 1] == "decode_ahead", kinds


def test_mixed_step_graphs_match_eager_steps(tmp_path, monkeypatch):
    """ORCD_MIXED_GRAPHS on the GPU: steps carrying prompt tokens (sequences joining a running batch,
    a long prompt chunked by the token budget) padded to (rows, tokens) buckets and replayed from
    captured graphs give the greedy tokens of the same steps launched eagerly, and logprobs within
    2e-2; the mixed buckets really were captured."""
    from orcd_grpc.loader import load_engine

    rng = np.random.default_rng()
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    prompts = [[1] + rng.integers(3, 320, int(n)).tolist() for n in (*rng.integers(20, 30, 7), 150)]
    runs = {}
    for mode in ("graphs", "eager"):
        monkeypatch.setenv("ORCD_MIXED_GRAPHS", "1" if mode == "graphs" else "0")
        eng = load_engine(path, backend="cuda", max_sequences=16, max_context=512)
        try:
            params = SamplingParams(temperature=0.0, top_logprobs=2)
            seqs = [eng.new_sequence(p, params) for p in prompts]
            running, got = [seqs[0]], {s.seq_id: [] for s in seqs}
            for step in range(40):
                if step % 2 == 0 and step // 2 < len(seqs) and seqs[step // 2] not in running:
                    running.append(seqs[step // 2])  # a join every other step: the same buckets recur
                for sid, smp in eng.step(running, 64).items():
                    got[sid].append((smp.token_id, smp.logprob))
            runs[mode] = [got[s.seq_id] for s in seqs]
            if mode == "graphs":
                assert any(k[0] == "mixed" for k in eng.backend._graphs), list(eng.backend._graphs)
        finally:
            eng.close()
    for a, b in zip(runs["graphs"], runs["eager"]):
        assert [t for t, _ in a] == [t for t, _ in b]
        np.testing.assert_allclose([lp for _, lp in a], [lp for _, lp in b], atol=2e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3", "gpt_oss"])
def test_graphs_captured_at_load_serve_every_architecture(arch, tmp_path, monkeypatch):
    """ORCD_MIXED_GRAPHS (the default) captures every decode and mixed bucket at load, on steps of
    padding rows alone: for each tiny architecture (gpt-oss: MoE, MXFP4 experts, sinks; gemma3:
    sliding windows, softcaps) every bucket is captured, none failed, and sequences joining a
    running batch get the greedy tokens of eager steps (loaded with the switch off; gpt-oss: three
    in four, its routing being discontinuous)."""
    from orcd_grpc.loader import load_engine

    from .test_cuda_architectures import _path

    path = _path(arch, "Q8_0", tmp_path)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 200, int(n)).tolist() for n in rng.integers(5, 40, 3)]
    runs = {}
    for mode in ("graphs", "eager"):
        monkeypatch.setenv("ORCD_MIXED_GRAPHS", "1" if mode == "graphs" else "0")
        eng = load_engine(path, backend="cuda", max_sequences=4, max_context=256)
        try:
            if mode == "graphs":
                want = set(eng.runner.prepared_keys())  # which keys: tests/test_cuda_runner.py
                assert want <= set(eng.backend._graphs) and not eng.backend._graph_failed, \
                    (sorted(want - set(eng.backend._graphs)), eng.backend._graph_failed)
            else:
                assert not eng.backend._graphs  # nothing captured at load
            seqs = [eng.new_sequence(p, SamplingParams(temperature=0.0)) for p in prompts]
            running = []
            for step in range(12):
                if step < len(seqs):
                    running.append(seqs[step])  # each joins beside the ones decoding
                eng.step(running, 64)
            runs[mode] = [list(s.output_ids) for s in seqs]
        finally:
            eng.close()
    assert all(len(t) >= 8 for t in runs["graphs"])
    if arch != "gpt_oss":
        assert runs["graphs"] == runs["eager"]
    else:  # MoE routing: a near-tie of two router logits may pick other experts (test_cuda_architectures)
        pairs = [(a, b) for x, y in zip(runs["graphs"], runs["eager"]) for a, b in zip(x, y)]
        assert sum(a == b for a, b in pairs) >= 0.75 * len(pairs), runs


def test_graphs_with_the_moe_pair(tmp_path, monkeypatch):
    """The gate/up pair inside captured graphs: its kernel reads the expert ids before its programmatic-
    launch wait (their producer, moe_route, is two launches back), so graph replays with PDL edges
    must route every slot as the eager steps do (the same test, gpt-oss, every expert matmul on the
    int8 input: the tiny model's are below ORCD_GEMV_INT8_MIN otherwise)."""
    monkeypatch.setenv("ORCD_GEMV_INT8_MIN", "0")
    test_graphs_captured_at_load_serve_every_architecture("gpt_oss", tmp_path, monkeypatch)


def test_deep_decode_graphs_match_eager(tmp_path, monkeypatch):
    """ORCD_ATTN_SPLITS_DEEP=256: a sequence crossing 4,096 keys while it decodes moves from its
    ("decode", nb) graph to ("decode", nb, "deep") (more key slices, captured then), and both give the
    tokens of eager steps."""
    from orcd_grpc.loader import load_engine

    monkeypatch.setenv("ORCD_ATTN_SPLITS_DEEP", "256")
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0", ctx=8192)
    rng = np.random.default_rng(7)
    prompts = [[1] + rng.integers(3, 320, 4088).tolist(), [1] + rng.integers(3, 320, 50).tolist()]
    results = {}
    for name in ("graph", "eager"):
        eng = load_engine(path, backend="cuda", max_sequences=4, max_context=4352)
        try:
            if name == "eager":
                eng.runner.buckets = []
            results[name] = _run_schedule(eng, prompts, 16)
            if name == "graph":
                keys = set(eng.backend._graphs)
                decode = [k for k in keys if k[0] == "decode"]
                assert any(len(k) == 3 for k in decode) and any(len(k) == 2 for k in decode), sorted(keys)
        finally:
            eng.close()
    assert results["graph"][0] == results["eager"][0]

