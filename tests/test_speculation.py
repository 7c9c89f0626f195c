"""Speculative decoding (issue #20): prompt-lookup drafts verified in one step.

Unit: the n-gram proposer; the verifier's output distribution against an exact float64 reference
of the sampling pipeline (penalties, temperature, top-k, top-p, min-p), by chi-square over many
fresh draws. Engine (a tiny random llama exported to GGUF, NumPy backend): greedy output with
speculation is the output without it, with drafts that are kept and drafts that are rejected;
sampled output has the exact joint distribution of its first tokens (chi-square, independent
reference from teacher-forced logits); KV blocks all come back; draft-model speculation with a
second tiny model (and the model drafting for itself). Server (SmolLM2 on the CPU backend over a
real port): greedy equality, Usage and metrics counts, cancellation mid-speculation, bad values
refused with INVALID_ARGUMENT naming the field, a draft model loaded by LoadModel. The CUDA
runner's host side (a NumPy stand-in backend): verify rows run eagerly and are never fed ahead.
The scheduler (test double engine): a stop inside a verify step's tokens ends the stream there.

Chi-square tests fail at p < 1e-4 (fresh random logits and seeds each run, so about one run in
10,000 per test fails by chance when the sampler is right).
"""
from __future__ import annotations

import pathlib
import sys
import time

import grpc
import numpy as np
import pytest

from orcd_grpc import speculation
from orcd_grpc.sampling import Sampler, SamplingParams

stats = pytest.importorskip("scipy.stats")

P_MIN = 1e-4


# ---- the proposer ---------------------------------------------------------------------------

def test_ngram_proposes_what_followed_the_latest_longest_match():
    h = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # trailing [1, 2, 3] occurs at 0..2 (followed by 4 5 9); [2, 3] also at 6..7 (7 8), shorter
    assert speculation.propose_ngram(h, 3, 4, 2) == [4, 5, 9]
    assert speculation.propose_ngram(h, 3, 2, 2) == [7, 8, 1]  # n capped at 2: the latest [2, 3]
    assert speculation.propose_ngram(h, 1, 4, 2) == [4]
    assert speculation.propose_ngram([5, 6, 7], 3, 4, 1) == []  # the last token never occurred before
    assert speculation.propose_ngram([5, 6, 5], 3, 4, 2) == []  # only a 1-gram matches
    assert speculation.propose_ngram([5, 6, 5], 3, 4, 1) == [6, 5]  # cut at the history's end


# ---- the verifier against an exact reference -------------------------------------------------

def _exact(logits, params: SamplingParams, prompt, out) -> np.ndarray:
    """float64 probabilities the sampler draws from, written independently of sampling.py."""
    x = np.asarray(logits, np.float64).copy()
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(out):
            x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    for t in set(out):
        x[t] -= params.frequency_penalty * out.count(t) + params.presence_penalty
    if params.temperature == 0.0:
        p = np.zeros_like(x)
        p[int(np.argmax(x))] = 1.0
        return p
    x = x / params.temperature
    keep = np.ones(x.size, bool)
    order = np.argsort(-x, kind="stable")
    if params.top_k:
        keep[order[params.top_k:]] = False
    w = np.where(keep, np.exp(x - x.max()), 0.0)
    if params.top_p < 1.0:
        cdf = np.cumsum(w[order]) / w.sum()
        cut = int(np.searchsorted(cdf, params.top_p, side="left")) + 1
        keep[order[cut:]] = False
        w = np.where(keep, w, 0.0)
    if params.min_p:
        w = np.where(w >= params.min_p * w.max(), w, 0.0)
    return w / w.sum()


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of counts against probs, cells expected below 5 merged into one."""
    n = counts.sum()
    exp = probs * n
    assert counts[exp == 0].sum() == 0, "a token of probability 0 was drawn"
    small = (exp > 0) & (exp < 5)
    obs = np.append(counts[exp >= 5], counts[small].sum())
    ex = np.append(exp[exp >= 5], exp[small].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    if obs.size < 2:
        return 1.0
    return float(stats.chisquare(obs, ex).pvalue)


PARAMS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.85),
    dict(temperature=1.0, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3),
]


@pytest.mark.parametrize("kw", PARAMS, ids=["plain", "top_k", "top_p", "min_p+penalties"])
def test_verify_keeps_the_target_distribution(kw):
    rng = np.random.default_rng()
    V, N = 8, 20000
    params = SamplingParams(**kw).effective(V)
    prompt, out = [1, 2, 2], [3]
    while True:
        logits = rng.normal(0, 1.5, (3, V)).astype(np.float32)
        p0 = _exact(logits[0], params, prompt, out)
        # a likely draft, but not the likeliest, so that both outcomes happen: min_p, top_p or top_k
        # with the penalties can leave one token alone in the distribution; redraw then
        if np.sort(p0)[-2] >= 0.02:
            break
    d1 = int(np.argsort(-p0)[1])
    p1 = _exact(logits[1], params, prompt, out + [d1])
    d2 = int(rng.integers(V))
    first = np.zeros(V, np.int64)
    second = np.zeros(V, np.int64)
    sampler = Sampler(SamplingParams(**kw, seed=int(rng.integers(1 << 63))))
    kept_all = 0
    for _ in range(N):
        toks, kept = speculation.verify(logits, [d1, d2], sampler, prompt, out)
        ids = [t.token_id for t in toks]
        assert 1 <= len(ids) <= 3 and kept == len(ids) - 1 and ids[:kept] == [d1, d2][:kept]
        first[ids[0]] += 1
        if ids[0] == d1:
            second[ids[1]] += 1
        kept_all += kept == 2
    assert _chi2(first, p0) > P_MIN, (first, p0 * N)
    assert _chi2(second, p1) > P_MIN, (second, p1 * second.sum())
    assert first[d1] > 0 and first.sum() - first[d1] > 0  # both acceptance and rejection were seen


def test_verify_greedy_is_the_argmax_walk():
    rng = np.random.default_rng()
    logits = rng.normal(0, 1, (4, 50)).astype(np.float32)
    best = [int(np.argmax(r)) for r in logits]
    sampler = Sampler(SamplingParams(temperature=0.0, top_logprobs=2))
    toks, kept = speculation.verify(logits, best[:3], sampler, [0], [])
    assert [t.token_id for t in toks] == best and kept == 3
    assert len(toks[0].top) == 2 and toks[0].top[0][0] == best[0]
    wrong = (best[1] + 1) % 50
    toks, kept = speculation.verify(logits, [best[0], wrong, 7], sampler, [0], [])
    assert [t.token_id for t in toks] == best[:2] and kept == 1
    lse = np.log(np.exp(logits[1].astype(np.float64)).sum())
    assert abs(toks[1].logprob - (logits[1, best[1]] - lse)) < 1e-5


def test_bad_values_name_their_field():
    from orcd_grpc.errors import InvalidArgument
    from orcd_grpc.proto import pb

    for msg, field in ((pb.Speculation(mode=2, num_draft_tokens=17), "speculation.num_draft_tokens"),
                       (pb.Speculation(mode=2, ngram_max=17), "speculation.ngram_max"),
                       (pb.Speculation(mode=2, ngram_max=2, ngram_min=3), "speculation.ngram_min"),
                       (pb.Speculation(mode=9), "speculation.mode")):
        with pytest.raises(InvalidArgument) as err:
            speculation.from_proto(msg, True, None)
        assert err.value.field == field
    assert speculation.from_proto(pb.Speculation(), True, speculation.Speculation()) is None  # DEFAULT: the server's
    assert speculation.from_proto(pb.Speculation(num_draft_tokens=3), True, None) == speculation.OFF  # its default: off
    assert speculation.from_proto(pb.Speculation(mode=1), True, speculation.Speculation()) == speculation.OFF
    got = speculation.from_proto(pb.Speculation(num_draft_tokens=3), True, speculation.Speculation(ngram_max=6))
    assert got == speculation.Speculation(speculation.NGRAM, 3, 6, 2)


# ---- a tiny model through the engine ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    from gguf_export import export_hf_model
    from tiny_models import tiny_model

    from orcd_grpc.loader import load_engine

    path = export_hf_model(tiny_model("llama"), tmp_path_factory.mktemp("spec") / "tiny.gguf", qtype="F32")
    eng = load_engine(path, backend="cpu", max_sequences=48, max_context=256)
    yield eng
    eng.close()


def _decode(eng, prompt, params, n, batch=1):
    seqs = [eng.new_sequence(prompt, params) for _ in range(batch)]
    while any(len(s.output_ids) < n for s in seqs):
        eng.step([s for s in seqs if len(s.output_ids) < n])
    for s in seqs:
        eng.release(s)
    return seqs


def test_greedy_with_speculation_is_greedy_without(tiny_engine, monkeypatch):
    eng = tiny_engine
    rng = np.random.default_rng()
    block = rng.integers(3, 500, 12).tolist()
    prompt = block + rng.integers(3, 500, 5).tolist() + block[:6]  # the prompt repeats itself
    ref = _decode(eng, prompt, SamplingParams(temperature=0.0, speculation=speculation.OFF), 20)[0].output_ids
    plain = _decode(eng, prompt, SamplingParams(temperature=0.0, speculation=speculation.Speculation()), 20)[0]
    assert plain.output_ids[:20] == ref

    # drafts that are partly right: the reference's continuation with its third token wrong
    def oracle(history, k, *_):
        done = len(history) - len(prompt)
        d = ref[done:done + k]
        if len(d) >= 3:
            d[2] = (d[2] + 1) % 500
        return d
    monkeypatch.setattr(speculation, "propose_ngram", oracle)
    seq = _decode(eng, prompt, SamplingParams(temperature=0.0, speculation=speculation.Speculation(num_draft_tokens=4)),
                  20)[0]
    assert seq.output_ids[:20] == ref
    assert seq.accepted_drafts >= 2 * 5 and seq.draft_tokens > seq.accepted_drafts  # kept and rejected
    assert eng.free_blocks() == eng.total_blocks()


def test_sampled_joint_distribution_is_the_targets(tiny_engine, monkeypatch):
    """The first three tokens of top_k=3 sampling: token 1 from the prefill, then one verify step
    of forced drafts (a, b) gives tokens 2 (and 3 when a is kept) - their joint distribution
    over 27 cells against the exact one from teacher-forced logits."""
    eng = tiny_engine
    rng = np.random.default_rng()
    prompt = rng.integers(3, 500, 10).tolist()
    K = 3
    params = SamplingParams(temperature=1.0, top_k=K)

    def dist(ctx):  # {token: prob} of top-3 sampling after ctx, float64
        s = eng.new_sequence(ctx, SamplingParams(temperature=0.0))
        x = eng.score(s)[-1].astype(np.float64)
        eng.release(s)
        p = _exact(x, params, ctx, [])
        return {int(t): float(p[t]) for t in np.flatnonzero(p)}

    d1 = dist(prompt)
    t1 = max(d1, key=d1.get)
    d2 = dist(prompt + [t1])
    a = max(d2, key=d2.get)
    b = max((d := dist(prompt + [t1, a])), key=d.get)
    monkeypatch.setattr(speculation, "propose_ngram", lambda history, k, *_: [a, b][:k])
    cells, exact = {}, []
    for x, px in d1.items():
        for y, py in dist(prompt + [x]).items():
            for z, pz in dist(prompt + [x, y]).items():
                cells[(x, y, z)] = len(exact)
                exact.append(px * py * pz)
    counts = np.zeros(len(exact), np.int64)
    batches, B = 40, 48
    for i in range(batches):
        seeds = rng.integers(1 << 62, size=B)
        seqs = [eng.new_sequence(prompt, SamplingParams(temperature=1.0, top_k=K, seed=int(sd),
                                                        speculation=speculation.Speculation(num_draft_tokens=2)))
                for sd in seeds]
        while any(len(s.output_ids) < 3 for s in seqs):
            eng.step([s for s in seqs if len(s.output_ids) < 3])
        for s in seqs:
            counts[cells[tuple(s.output_ids[:3])]] += 1
            eng.release(s)
    assert eng.free_blocks() == eng.total_blocks()
    p = _chi2(counts, np.asarray(exact))
    print(f"joint of 3 tokens, {counts.sum()} draws: chi-square p = {p:.3g}")
    assert p > P_MIN, (counts, np.asarray(exact) * counts.sum())


# ---- SmolLM2 through a real server -------------------------------------------------------------

COPY_PROMPT = ("Copy the list exactly.\nList:\n1. apples and pears\n2. plums and figs\n3. grapes and limes\n"
               "4. cherries and dates\nCopy:\n1. apples and pears\n2.")


@pytest.fixture(scope="module")
def spec_server(real_server, smollm2_path):
    return real_server(smollm2_path, max_context=512, speculation=speculation.Speculation())


def _execute(srv, spec=None, max_tokens=16, **kw):
    from orcd_grpc.proto import pb

    req = pb.ExecuteRequest(text=COPY_PROMPT, sampling=pb.SamplingParams(temperature=0.0),
                            stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True), **kw)
    if spec is not None:
        req.speculation.CopyFrom(spec)
    events = list(srv.stub.Execute(req, timeout=600))
    ids = [e.token.token_id for e in events if e.HasField("token")]
    assert [e.token.index for e in events if e.HasField("token")] == list(range(len(ids)))
    return ids, events[-1].finished


def _wait_idle(srv, timeout=60.0):
    end = time.monotonic() + timeout
    while srv.scheduler.stats()["live"] and time.monotonic() < end:
        time.sleep(0.02)
    assert srv.scheduler.stats()["live"] == 0


def test_server_greedy_output_and_usage(spec_server):
    from orcd_grpc.proto import pb

    srv = spec_server
    reg = srv.scheduler.metrics.registry
    before = [reg.get_sample_value(f"orcd_speculative_{m}_total") or 0.0 for m in ("draft_tokens", "accepted_tokens")]
    off, f_off = _execute(srv, pb.Speculation(mode=pb.Speculation.SPECULATION_MODE_OFF))
    on, f_on = _execute(srv)  # the server's default: ngram
    k3, f_k3 = _execute(srv, pb.Speculation(mode=pb.Speculation.SPECULATION_MODE_NGRAM, num_draft_tokens=3))
    assert on == off == k3 and len(off) == 16
    assert f_off.usage.draft_tokens == 0 and f_off.usage.accepted_draft_tokens == 0
    assert 0 < f_on.usage.accepted_draft_tokens <= f_on.usage.draft_tokens
    assert f_on.usage.completion_tokens == 16
    after = [reg.get_sample_value(f"orcd_speculative_{m}_total") for m in ("draft_tokens", "accepted_tokens")]
    assert after[0] - before[0] == f_on.usage.draft_tokens + f_k3.usage.draft_tokens
    assert after[1] - before[1] == f_on.usage.accepted_draft_tokens + f_k3.usage.accepted_draft_tokens
    _wait_idle(srv)
    eng = srv.scheduler.engine
    assert eng.free_blocks() == eng.total_blocks()


def test_server_cancel_mid_speculation_frees_blocks(spec_server):
    from orcd_grpc.proto import pb

    srv = spec_server
    eng = srv.scheduler.engine
    req = pb.ExecuteRequest(text=COPY_PROMPT, request_id="spec-cancel", sampling=pb.SamplingParams(temperature=0.0),
                            stopping=pb.StoppingCriteria(max_tokens=200, ignore_eos=True))
    call = srv.stub.Execute(req, timeout=600)
    seen = 0
    for ev in call:
        seen += ev.HasField("token")
        if seen >= 2:
            break
    assert eng.free_blocks() < eng.total_blocks()
    assert srv.stub.Cancel(pb.CancelRequest(request_id="spec-cancel"), timeout=10).cancelled
    rest = [e for e in call if e.HasField("finished")]
    assert rest and rest[0].finished.reason == pb.FINISH_REASON_CANCELLED
    _wait_idle(srv)
    assert eng.free_blocks() == eng.total_blocks()


def test_server_refuses_bad_speculation_naming_the_field(spec_server):
    from orcd_grpc.proto import pb

    M = pb.Speculation
    for spec, field in ((M(mode=M.SPECULATION_MODE_NGRAM, num_draft_tokens=17), "speculation.num_draft_tokens"),
                        (M(mode=M.SPECULATION_MODE_NGRAM, ngram_min=5, ngram_max=3), "speculation.ngram_min"),
                        (M(mode=M.SPECULATION_MODE_DRAFT), "speculation.mode")):
        with pytest.raises(grpc.RpcError) as err:
            _execute(spec_server, spec)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert err.value.details().startswith(field + ":"), err.value.details()


@pytest.mark.parametrize("verify_graphs", [False, True])
def test_cuda_runner_runs_verify_rows_and_never_feeds_them(tmp_path, monkeypatch, verify_graphs):
    """The CUDA runner's host side (test_cuda_runner's stand-in backend, lookahead on, greedy
    device sampling): through the overlap loop, speculating sequences give the tokens of plain
    (fed) decoding; no verify step took a decode bucket and no step was ever fed to a batch with a
    speculating sequence. ORCD_VERIFY_GRAPHS: verify steps whose rows all have the same number of
    tokens went through graph_step padded to a batch bucket (the stand-in runs the padded step), the
    rest eagerly; off, none did."""
    import dataclasses

    from test_cuda_runner import _queued_device_backend, write_tiny_llama

    from orcd_grpc.loader import load_engine
    from orcd_grpc.overlap import Overlap

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    rng = np.random.default_rng()
    block = rng.integers(3, 320, 10).tolist()
    prompts = [[1] + block + block[:4], [1] + rng.integers(3, 320, 7).tolist() * 2, [2] + block[::-1] + block[:3]]
    outs = {}
    for spec in (speculation.OFF, speculation.Speculation(num_draft_tokens=3)):
        base = type(_queued_device_backend())

        class Greedy(base):
            def sample_packed_async(self, logits, prm, pen, n_top=0, bits=None):
                h = super().sample_packed_async(logits, prm, pen, n_top, bits)
                h.toks = np.argmax(self.to_host(logits), -1).astype(np.int32)
                return h

        if spec != speculation.OFF:  # drafts: the plain run's continuation, every third token wrong
            ref = {tuple(p): o for p, o in zip(prompts, outs[speculation.OFF])}

            def oracle(history, k, *_):
                p = next(p for p in prompts if list(history[:len(p)]) == p)
                d = list(ref[tuple(p)][len(history) - len(p):][:k])
                return [(t + 1) % 320 if i == 2 else t for i, t in enumerate(d)]
            monkeypatch.setattr(speculation, "propose_ngram", oracle)
        be = Greedy()
        be.tuning = dataclasses.replace(be.tuning, verify_graphs=verify_graphs)
        keys = []
        graph_step = be.graph_step
        be.graph_step = lambda key, meta, *a, **kw: (keys.append((key, meta.num_seqs)), graph_step(key, meta, *a,
                                                                                                   **kw))[1]
        eng = load_engine(path, backend=be, max_sequences=4, max_context=128)
        plans = []
        launch = eng.runner.launch
        eng.runner.launch = lambda plan: (plans.append((plan, eng.runner._bucket(plan))), launch(plan))[1]
        try:
            seqs = [eng.new_sequence(p, SamplingParams(temperature=0.0, speculation=spec)) for p in prompts]
            loop = Overlap(eng)
            while any(len(s.output_ids) < 16 for s in seqs):
                loop.step(seqs, 256, lambda s: len(s.output_ids) + 2 <= 16)
            loop.drain()
            outs[spec] = [s.output_ids[:16] for s in seqs]
            verify = [(p, b) for p, b in plans if any(r.drafts for r in p.rows)]
            if spec == speculation.OFF:
                assert be.fed > 0 and not verify  # the fed path really ran without speculation
            else:
                assert verify and be.fed == 0 and all(p.after is None for p, _ in plans)
                assert all(b == 0 for _, b in verify)  # never a decode bucket
                assert sum(s.accepted_drafts for s in seqs) > 0
                uniform = [p for p, _ in verify if len({r.n for r in p.rows}) == 1]
                vkeys = [k for k in keys if k[0][0] == "verify"]
                if verify_graphs:
                    assert uniform and len(vkeys) == len(uniform)
                    assert all(nb == key[1] >= len(p.rows) and key[2] == p.rows[0].n
                               for (key, nb), p in zip(vkeys, uniform))
                    assert any(nb > len(p.rows) for (_, nb), p in zip(vkeys, uniform))  # padding rows ran
                else:
                    assert not vkeys
            for s in seqs:
                eng.release(s)
            assert eng.free_blocks() == eng.total_blocks()
        finally:
            eng.close()
    assert outs[speculation.OFF] == outs[speculation.Speculation(num_draft_tokens=3)]


# ---- draft-model speculation ----------------------------------------------------------------

def test_draft_model_greedy_is_greedy_without(tiny_engine, tmp_path):
    """A second tiny llama (other weights, same vocabulary) as the draft model: greedy output is
    the output without speculation; the target as its own draft keeps every draft; the draft
    engine's KV all comes back; a model of another vocabulary is refused naming draft_path."""
    from gguf_export import export_hf_model
    from test_cuda_runner import write_tiny_llama
    from tiny_models import tiny_model

    from orcd_grpc.errors import InvalidArgument
    from orcd_grpc.loader import load_engine

    eng = tiny_engine
    rng = np.random.default_rng()
    prompt = rng.integers(3, 500, 14).tolist()
    ref = _decode(eng, prompt, SamplingParams(temperature=0.0, speculation=speculation.OFF), 18)[0].output_ids[:18]
    other = export_hf_model(tiny_model("llama", seed=7), tmp_path / "draft.gguf", qtype="Q8_0")
    for path, all_kept in ((other, False), (eng.info.path, True)):
        draft = load_engine(path, backend="cpu", max_sequences=48, max_context=256)
        eng.attach_draft(draft)
        try:
            mode = speculation.Speculation(speculation.DRAFT, 4)
            seqs = _decode(eng, prompt, SamplingParams(temperature=0.0, speculation=mode), 18, batch=2)
            for s in seqs:
                assert s.output_ids[:18] == ref
                assert s.draft_tokens > 0 and (s.accepted_drafts == s.draft_tokens) == all_kept
            sampled = _decode(eng, prompt, SamplingParams(temperature=0.9, seed=3, speculation=mode), 12)[0]
            assert sampled.draft_tokens > 0 and len(sampled.output_ids) >= 12
            assert draft.free_blocks() == draft.total_blocks()
            assert eng.free_blocks() == eng.total_blocks()
        finally:
            eng.draft.close()
            eng.draft = None
    with pytest.raises(InvalidArgument) as err:
        eng.new_sequence(prompt, SamplingParams(speculation=speculation.Speculation(speculation.DRAFT)))
    assert err.value.field == "speculation.mode"
    small = load_engine(write_tiny_llama(tmp_path / "v320.gguf", "Q8_0"), backend="cpu", max_sequences=2)
    try:
        with pytest.raises(InvalidArgument) as err:
            eng.attach_draft(small)
        assert err.value.field == "draft_path" and eng.draft is None
    finally:
        small.close()


def test_server_draft_model_loaded_with_load_model(spec_server, smollm2_path):
    """LoadModel with draft_path (SmolLM2 drafting for itself): DRAFT-mode greedy output is the
    output without speculation and keeps every draft; a bad draft_path is refused naming it."""
    from orcd_grpc.proto import pb

    srv = spec_server
    with pytest.raises(grpc.RpcError) as err:
        list(srv.stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name, draft_path="missing.gguf"), timeout=600))
    assert err.value.details().startswith("draft_path:"), err.value.details()
    events = list(srv.stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name, draft_path=smollm2_path.name),
                                     timeout=600))
    # the description names the draft model and what it holds, in the load's answer and in ListModels
    stem = smollm2_path.name.removesuffix(".gguf")
    listed = srv.stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    for m in (events[-1].model, *listed):
        assert m.draft_model == stem and m.draft_bytes > 0, m
    off, _ = _execute(srv, pb.Speculation(mode=pb.Speculation.SPECULATION_MODE_OFF), max_tokens=10)
    on, fin = _execute(srv, pb.Speculation(mode=pb.Speculation.SPECULATION_MODE_DRAFT, num_draft_tokens=4),
                       max_tokens=10)
    assert on == off
    assert fin.usage.draft_tokens > 0 and fin.usage.accepted_draft_tokens == fin.usage.draft_tokens
    _wait_idle(srv)
    eng = srv.scheduler.engine
    assert eng.free_blocks() == eng.total_blocks()
    d = eng.draft.engine
    assert d.free_blocks() == d.total_blocks()


# ---- the scheduler with several tokens per step (test double engine) ----------------------

def test_scheduler_stops_inside_a_verify_steps_tokens():
    """A step that gives several tokens (a verify step's `following`) is streamed token by token,
    and a stop token or max_tokens inside it ends the request there: the tokens after it are never
    streamed or counted."""
    from test_scheduler import EOS, FakeDecoder, FakeEngine, Sample, drain, make_request, text_of

    from orcd_grpc.request import LENGTH, STOP_TOKEN, FinishedEvent, Stopping, TokenEvent
    from orcd_grpc.scheduler import Scheduler

    class Verifying(FakeEngine):
        def launch(self, seqs, token_budget=2048, after=None):
            out = super().launch(seqs, token_budget, after)
            for s in seqs:
                smp = out.get(s.seq_id) if out else None
                if smp is not None and s.output_ids:  # decode steps give 4 tokens
                    at = len(s.output_ids)
                    smp.following = [Sample(self.script[(at + j) % len(self.script)]) for j in (1, 2, 3)]
            return out

    h, e, l, o = (c + 2 for c in b"helo")
    for script, stopping, text, n, reason in (
            ([h, e, l, EOS, o, o], Stopping(max_tokens=20), "hel", 4, STOP_TOKEN),
            ([h, e, l, l, o, o, o, o], Stopping(max_tokens=3), "hel", 3, LENGTH)):
        eng = Verifying(script)
        sched = Scheduler(loader=lambda path, **_: eng, decoder_factory=FakeDecoder)
        try:
            sched.load("fake")
            free = eng.free_blocks()
            req = make_request(eng, stopping=stopping)
            sched.submit(req)
            events = drain(req)
            fin = events[-1]
            assert isinstance(fin, FinishedEvent) and fin.reason == reason and fin.completion_tokens == n
            assert text_of(events) == text
            assert [ev.index for ev in events if isinstance(ev, TokenEvent)] == list(range(n))
            assert eng.free_blocks() == free
        finally:
            sched.shutdown(0)


def test_python_client_builds_the_speculation_field():
    from orcd_grpc.client import build_request
    from orcd_grpc.proto import pb

    M = pb.Speculation
    assert not build_request("hi").HasField("speculation")
    assert build_request("hi", speculation="off").speculation == M(mode=M.SPECULATION_MODE_OFF)
    got = build_request("hi", speculation={"mode": "ngram", "num_draft_tokens": 8, "ngram_min": 3})
    assert got.speculation == M(mode=M.SPECULATION_MODE_NGRAM, num_draft_tokens=8, ngram_min=3)
    with pytest.raises(ValueError):
        build_request("hi", speculation="sometimes")


def test_serve_flags_make_the_default():
    from orcd_grpc import cli, cli_serve

    args = cli.build_parser().parse_args(["serve", "--speculation", "ngram", "--num-draft-tokens", "7"])
    assert cli_serve._speculation(args.speculation, args.num_draft_tokens) == speculation.Speculation(speculation.NGRAM, 7)
    assert cli_serve._speculation(None, None) is None and cli_serve._speculation("off", None) is None
    for mode, k, draft, word in (("ngram", 17, None, "--num-draft-tokens"), ("draft", None, None, "--draft-model"),
                                 (None, 4, None, "--num-draft-tokens")):
        with pytest.raises(ValueError, match=word):
            cli_serve._speculation(mode, k, draft)
