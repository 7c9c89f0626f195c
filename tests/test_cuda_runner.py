"""The CUDA runner's host side, without a GPU: a NumPy backend stands in behind the CudaBackend
methods the runner uses (graph_step, graph_ready, sample_packed[_async], sample_result, sample),
so its padding to graph buckets, packed sampling rows and queued (fed) steps run on the CPU."""
import pathlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from orcd_grpc.backends.cuda_padding import MIXED_TOKEN_BUCKETS, decode_meta, mixed_bucket, mixed_meta, mixed_token_buckets
from orcd_grpc.backends.cuda_runner import CudaRunner, _Unsampled
from orcd_grpc.backends.numpy_backend import NumpyBackend
from orcd_grpc.backends.runner import PlanRow, RunnerModel, StepPlan, pack_bitmask, unpack_bitmask
from orcd_grpc.loader import load_engine
from orcd_grpc.overlap import Overlap
from orcd_grpc.sampling import SamplingParams
from orcd_grpc.tuning import Tuning

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/: the tiny-model writer, the schedules
from gpu.test_cuda_models import write_tiny_llama  # noqa: E402
from schedules import changing_batch, join_beside_decoding  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


class _Rows(np.ndarray):
    def row_slice(self, a, b):
        return self[a:b]


class FakeCuda(NumpyBackend):
    """Runs plans through CudaRunner; graphs run eagerly, sampling is greedy (argmax). The graphs a
    load captures (CudaRunner.prepare: a NumPy forward per bucket here, seconds a load) only where
    a test asks for them (prepare_at_load)."""

    prepare_at_load = False

    def __init__(self):
        super().__init__()
        self.tuning = Tuning()  # graphs and lookahead on, as a CudaBackend's defaults
        self.buckets_seen, self.packed = set(), []

    def reserve_step_meta(self, tokens, seqs, table):
        self.reserved = (tokens, seqs, table)

    def runner(self, model):
        runner = CudaRunner(self, model)
        if not self.prepare_at_load:
            runner.prepare = lambda: None
        return runner

    def graph_ready(self, key):
        return False

    def graph_step(self, key, meta, record, feed=None, overlap=False, feed_rows=None):
        self.buckets_seen.add((key, meta.num_seqs))
        return np.asarray(record(self.begin_step(meta))).view(_Rows)

    def sample_packed(self, logits, prm, pen, n_top=0, bits=None):
        x = np.array(self.to_host(logits), copy=True)
        self.packed.append((prm.copy(), x.copy(), None if bits is None else bits.copy()))
        if bits is not None:  # what sample.cu does with a row's bitmask
            x[~unpack_bitmask(bits, x.shape[1])] = -np.inf
        return np.argmax(x, -1).astype(np.int32), np.zeros(len(x), np.float32)

    def sample_packed_async(self, logits, prm, pen, n_top=0, bits=None):
        """An eager step's sampling, queued (ORCD_FEED_EAGER): done at once here."""
        toks, lps = self.sample_packed(logits, prm, pen, n_top, bits)[:2]
        R = len(toks)
        return SimpleNamespace(R=R, toks=toks, res=(toks, lps, np.tile(toks[:, None], max(1, n_top)),
                                                    np.zeros((R, max(1, n_top)), np.float32)))

    def sample_result(self, h):
        return h.res

    def sample(self, logits, rows, n_top=0):
        raise AssertionError("no penalised rows in these tests")


def test_sampling_rows_are_packed_once_and_counted(tmp_path):
    """Per step each row carries its sequence's packed parameters (sample.cu's RowParams) with
    the token index as the Philox counter (word 6); the row is packed once per sequence."""
    be = FakeCuda()
    eng = load_engine(write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0"), backend=be, max_sequences=4, max_context=256)
    try:
        assert eng.capabilities.device_sampling and eng.capabilities.graphs
        a = eng.new_sequence([1, 5, 6], SamplingParams(temperature=0.5, top_k=7, seed=3))
        b = eng.new_sequence([1, 9], SamplingParams(temperature=0.0, seed=(1 << 40) + 2))
        for _ in range(4):
            eng.step([a, b])
        assert len(a.output_ids) == len(b.output_ids) == 4
        first, last = be.packed[0][0], be.packed[-1][0]
        assert first.view(np.float32)[0, 0] == np.float32(0.5) and first[0, 1] == 7
        assert (first[0, 4], first[0, 5]) == (3, 0) and (first[1, 4], first[1, 5]) == (2, 1 << 8)
        assert list(first[:, 6]) == [0, 0] and list(last[:, 6]) == [3, 3]
        assert a.row.state is not None and not np.shares_memory(a.row.state.row, first)
    finally:
        eng.close()


def _assert_padded_matches_plain(path, prompts, padded, drive):
    """drive(engine, sequences) on `padded` (a FakeCuda, steps padded by CudaRunner) and on the host
    runner (NumPy, unpadded), every sequence greedy with a seed of its own: the same tokens, and the
    logits each token was sampled from equal to 1e-5 (the padded side's from its packed sampling
    rows, told apart by seed; the plain side's from its samplers)."""
    runs = {}
    for name in ("padded", "plain"):
        be = padded if name == "padded" else NumpyBackend()
        eng = load_engine(path, backend=be, max_sequences=8, max_context=256)
        try:
            seqs = [eng.new_sequence(p, SamplingParams(temperature=0.0, seed=i + 1)) for i, p in enumerate(prompts)]
            rec = {s.seq_id: [] for s in seqs}
            if name == "plain":
                for s in seqs:
                    sample = s.sampler.sample
                    s.sampler.sample = (lambda f, r: lambda x, *a: (r.append(np.array(x, copy=True)), f(x, *a))[1])(
                        sample, rec[s.seq_id])
            drive(eng, seqs)
            if name == "padded":
                by_seed = {s.sampling.seed: s.seq_id for s in seqs}
                for prm, x, _ in be.packed:
                    for i in range(len(prm)):
                        rec[by_seed[int(prm[i, 4])]].append(x[i])
            runs[name] = ([list(s.output_ids) for s in seqs], [np.stack(rec[s.seq_id]) for s in seqs])
        finally:
            eng.close()
    assert runs["padded"][0] == runs["plain"][0]
    for a, b in zip(runs["padded"][1], runs["plain"][1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_padded_decode_steps_match_unpadded(tmp_path):
    """Decode steps padded to their graph bucket (pad rows write KV into the spare block and
    attend to it alone) must give the real rows exactly the logits of the host runner's unpadded
    steps, while sequences join and leave."""
    rng = np.random.default_rng(3)
    prompts = [[1] + rng.integers(3, 320, n).tolist() for n in (3, 21, 40)]

    def drive(eng, seqs):
        running = list(seqs)
        while running:
            eng.step(running)
            for s in list(running):
                if len(s.output_ids) >= (4 if s is seqs[1] else 9):
                    running.remove(s)
                    eng.release(s)

    padded = FakeCuda()
    _assert_padded_matches_plain(write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0"), prompts, padded, drive)
    assert {b for (_, b) in padded.buckets_seen} >= {4, 2}  # 3 sequences padded to 4; then 2


def test_masked_rows_go_to_the_device_sampler_as_a_bitmask(tmp_path):
    """A row with a mask is sampled by the device sampler with its packed bitmask (only the
    bitmask crosses; logits stay on the device), and the mask holds; an unmasked row beside it
    carries no bitmask row (mask_row, word 13, is -1)."""
    be = FakeCuda()
    eng = load_engine(write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0"), backend=be, max_sequences=4, max_context=256)
    try:
        V = eng.info.vocab_size
        allowed = np.zeros(V, bool)
        allowed[[17, 42]] = True
        s = eng.new_sequence([1, 5, 6], GREEDY)
        s.mask = pack_bitmask(allowed)
        free = eng.new_sequence([1, 7, 8], GREEDY)
        for _ in range(3):
            out = eng.step([s, free])
            assert out[s.seq_id].token_id in (17, 42)
        assert len(be.packed) == 3
        for prm, _, bits in be.packed:
            assert bits.shape == (2, (V + 31) // 32)
            assert np.array_equal(unpack_bitmask(bits[0], V), allowed) and (bits[1] == -1).all()
    finally:
        eng.close()


def _queued_device_backend():
    """FakeCuda with queued steps, as CudaRunner's lookahead uses them: a step may be fed the
    token ids of a sampling the host has not read yet (here computed at once, as the GPU would
    have by the time the fed step runs), and sampling is a function of the logits and of the
    row's counter (the GPU's Philox counter), so a wrong counter changes the tokens."""

    class Queued(FakeCuda):
        def __init__(self):
            super().__init__()
            self.ready, self.pending, self.fed, self.overlapped, self.fed_changed = set(), [], 0, 0, 0

        def graph_ready(self, key):
            return key in self.ready

        def graph_step(self, key, meta, record, feed=None, overlap=False, feed_rows=None):
            if feed is not None:
                assert overlap and feed in self.pending, "fed by a sampling the host has not read"
                meta.token_ids = meta.token_ids.copy()
                for dst, src, n in feed_rows or ((0, 0, feed.R),):  # begin_step's device copies
                    assert dst + n <= meta.num_tokens and src + n <= feed.R
                    meta.token_ids[dst: dst + n] = feed.toks[src: src + n]
                self.fed += 1
                # a changed batch's step: rows gone from the step before, or new ones (a mixed step)
                self.fed_changed += feed_rows not in (None, [(0, 0, feed.R)]) or key[0] == "mixed"
            self.overlapped += bool(overlap)
            self.ready.add(key)  # the first step of a key stands for the eager run and the capture
            return np.asarray(record(self.begin_step(meta))).view(_Rows)

        def sample_packed_async(self, logits, prm, pen, n_top=0, bits=None):
            x = self.to_host(logits)
            toks = ((np.argmax(x, -1) + 31 * prm[:, 6].astype(np.int64)) % x.shape[-1]).astype(np.int32)
            h = SimpleNamespace(R=len(toks), toks=toks, lps=-prm[:, 6].astype(np.float32),
                                top=np.tile(toks[:, None], 2), tlp=np.zeros((len(toks), 2), np.float32))
            self.pending.append(h)
            return h

        def sample_result(self, h):
            self.pending.remove(h)
            return h.toks, h.lps, h.top, h.tlp

        def sample_packed(self, logits, prm, pen, n_top=0, bits=None):
            return self.sample_result(self.sample_packed_async(logits, prm, pen, n_top))

    return Queued()


def _changed_feed_backend(mode):
    """The queued fake for a run in `mode`: "changed" also queues the steps of changed batches
    (ORCD_FEED_CHANGED, new prompts on mixed-step graphs, captured at load)."""
    import dataclasses

    be = _queued_device_backend()
    if mode == "changed":
        be.tuning = dataclasses.replace(Tuning(), mixed_graphs=True, feed_changed=True)
        be.prepare_at_load = True
    return be


def _masking_device_backend():
    """The queued fake whose sampling keeps to a row's bitmask, as sample.cu does (which allowed
    token: the one the counter picks among them)."""

    class Masking(type(_queued_device_backend())):
        def sample_packed_async(self, logits, prm, pen, n_top=0, bits=None):
            h = super().sample_packed_async(logits, prm, pen, n_top)
            if bits is not None:  # sample.cu: only a masked row's allowed tokens (which one: the counter's)
                x = self.to_host(logits)
                for i in range(h.R):
                    ok = np.flatnonzero(unpack_bitmask(bits[i], x.shape[1]))
                    h.toks[i] = ok[(int(np.argmax(x[i, ok])) + int(prm[i, 6])) % ok.size]
            return h

        def sample_packed(self, logits, prm, pen, n_top=0, bits=None):
            return self.sample_result(self.sample_packed_async(logits, prm, pen, n_top, bits))

    return Masking()


def _with_and_without_lookahead(path, run, max_sequences):
    """{lookahead: run(engine, backend, lookahead)} for lookahead on and off, each on a fresh
    masking fake, and {"changed": ...} with lookahead on across changed batches too
    (ORCD_FEED_CHANGED); no queued sampling may be left unread."""
    import dataclasses

    runs = {}
    for mode in ("changed", True, False):
        be = _masking_device_backend()
        if mode == "changed":
            be.tuning = dataclasses.replace(Tuning(), mixed_graphs=True, feed_changed=True)
            be.prepare_at_load = True
        eng = load_engine(path, backend=be, max_sequences=max_sequences, max_context=256)
        try:
            eng.runner.lookahead = bool(mode)
            runs[mode] = run(eng, be, bool(mode))
            assert not be.pending, "a queued sampling was never read"
            assert mode or be.fed == 0
            assert (mode == "changed") or be.fed_changed == 0
        finally:
            eng.close()
    return runs


def test_overlap_gives_the_tokens_of_plain_steps(tmp_path):
    """The overlap loop over the CUDA runner (a decode step launched, fed the previous step's
    tokens on the device, before the host reads them) must give every sequence exactly the
    tokens of step-by-step decoding, while sequences finish, join, and leave the batch without
    being released."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    rng = np.random.default_rng()
    prompts = [[1] + rng.integers(3, 320, int(k)).tolist() for k in rng.integers(2, 40, 4)]
    runs: dict = {}
    for mode in ("changed", "lookahead", "plain"):
        be = _changed_feed_backend(mode)
        eng = load_engine(path, backend=be, max_sequences=8, max_context=256)
        try:
            assert eng.capabilities.overlap and eng.capabilities.overlap_changed == (mode == "changed")
            eng.runner.lookahead = mode != "plain"
            free0 = eng.free_blocks()
            got, outputs, c_queued = changing_batch(eng, prompts, top_logprobs=2)
            runs[mode] = (got, outputs)
            assert not be.pending, "a queued sampling was never read"
            assert eng.free_blocks() + len(eng.allocator._evictable) >= free0  # every block came back
            if mode != "plain":
                assert be.fed >= 5, be.fed  # the lookahead path really ran
                assert c_queued  # c left with a step of it in flight, and that step was delivered to it
                # ORCD_FEED_CHANGED: a finishes, d joins, c leaves and comes back: steps of changed batches
                assert (be.fed_changed >= 5) == (mode == "changed"), be.fed_changed
            else:
                assert be.fed == 0 and be.overlapped == 0
        finally:
            eng.close()
    got, outputs = runs["lookahead"]
    assert got == outputs  # what the loop delivered is what each sequence holds
    assert [len(g) for g in got] == [4, 14, 14, 14]
    assert runs["lookahead"] == runs["plain"] == runs["changed"]


def test_scheduler_overlap_streams_the_plain_tokens(tmp_path):
    """The real scheduler over the CUDA runner: requests of different lengths join and finish
    (each finish may leave a step of it in flight) and a late one joins a running batch; every
    stream must carry the tokens it carries without lookahead, and every KV block comes back."""
    import time

    from orcd_grpc.request import LENGTH, FinishedEvent, Request, Stopping, TokenEvent
    from orcd_grpc.scheduler import Scheduler

    def drain(req):
        events = []
        while not events or not isinstance(events[-1], FinishedEvent):
            events.append(req.events.get(timeout=30))
        return events

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    rng = np.random.default_rng()
    jobs = [([1] + rng.integers(3, 320, int(k)).tolist(), int(m))
            for k, m in zip(rng.integers(2, 40, 4), (3, 17, 9, 12))]
    results = {}
    for mode in ("changed", "lookahead", "plain"):
        be = _changed_feed_backend(mode)
        eng = load_engine(path, backend=be, max_sequences=8, max_context=256)
        eng.runner.lookahead = mode != "plain"
        free0 = eng.free_blocks()
        sched = Scheduler(loader=lambda p, **_: eng)
        try:
            sched.load("tiny")
            reqs = [Request(f"r{i}", prompt, SamplingParams(temperature=0.7, seed=i),
                            Stopping(max_tokens=m, ignore_eos=True), engine=eng, model_id=eng.info.model_id)
                    for i, (prompt, m) in enumerate(jobs)]
            for r in reqs[:3]:
                sched.submit(r)
            events = [drain(reqs[0])]
            sched.submit(reqs[3])  # joins the two still decoding
            events += [drain(r) for r in reqs[1:]]
            assert all(ev[-1].reason == LENGTH for ev in events)
            assert [ev[-1].completion_tokens for ev in events] == [m for _, m in jobs]
            results[mode] = [[e.token_id for e in ev if isinstance(e, TokenEvent)] for ev in events]
            assert [len(t) for t in results[mode]] == [m for _, m in jobs]
            deadline = time.monotonic() + 10
            while eng.free_blocks() + len(eng.allocator._evictable) < free0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert eng.free_blocks() + len(eng.allocator._evictable) >= free0
            assert (be.fed > 0) == (mode != "plain"), be.fed
            assert (be.fed_changed > 0) == (mode == "changed"), be.fed_changed
            # every request ended by its max_tokens: nothing was launched past it
            assert all(o.inflight is None for o in sched._overlaps.values())
            assert not be.pending
        finally:
            sched.shutdown(0)
            eng.close()
    assert results["lookahead"] == results["plain"] == results["changed"]


def test_overlap_launches_no_step_past_max_tokens(tmp_path):
    """may_follow (the scheduler passes each request's max_tokens) bounds the overlap: once the
    step in flight brings a sequence there, nothing more is launched, so the GPU is free for the
    next request the moment the last token is read. Without it, a step stays in flight."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    be = _queued_device_backend()
    eng = load_engine(path, backend=be, max_sequences=4, max_context=256)
    try:
        for max_tokens in (7, 0):
            s = eng.new_sequence([1, 5, 9, 13], SamplingParams(temperature=0.7, seed=1))
            ov = Overlap(eng)
            follow = None if not max_tokens else (lambda q: len(q.output_ids) + 2 <= max_tokens)
            while len(s.output_ids) < 7:
                ov.step([s], may_follow=follow)
            assert len(s.output_ids) == 7
            if max_tokens:
                assert ov.inflight is None and not be.pending
                assert be.fed >= 3  # it did run ahead before the end
            else:
                assert ov.inflight is not None and len(be.pending) == 1
                assert ov.inflight[1].plan.after is None  # no chain of every earlier step stays alive
            eng.release(s)
            ov.drain()
            assert not be.pending and len(s.output_ids) == 7  # released: the queued token is dropped
    finally:
        eng.close()


def test_device_sampling_rows_carry_the_limits():
    """The rows the CUDA runner hands the device sampler hold the effective limits, so the
    kernel runs greedy (temperature 0) and a finite penalty."""
    from orcd_grpc.backends.cuda_sampling import pack_sampling_row
    from orcd_grpc.backends.runner import RowSampling
    from orcd_grpc.sampling import Sampler

    vocab = 64
    recorded = []
    be = SimpleNamespace(name="cuda", host_memory=False, workspace_bytes=0, tuning=Tuning(),
                         sample=lambda logits, rows, n_top, bits=None: (recorded.extend(rows), (np.zeros(len(rows), np.int64),
                                                                                    np.zeros(len(rows), np.float32)))[1])
    runner = CudaRunner(be, RunnerModel(forward=None, hp=None, n_experts_used=0, block_size=16, pad_block=0,
                                        table_width=1, max_sequences=1))

    def row(params, n_out=0):
        p = params.effective(vocab)
        return PlanRow(seq_id=1, tokens=[5], start=3, n=1, block_table=[0], prompt_ids=[5, 6, 7],
                       output_ids=[1] * n_out, sampling=RowSampling(p, Sampler(p)))

    tiny = float(np.float32(1e-38))
    for params in (SamplingParams(temperature=tiny, top_p=0.5, seed=3), SamplingParams(temperature=1.0, top_p=tiny, seed=3)):
        assert runner._packed_rows([row(params)]).view(np.float32)[0, 0] == 0.0  # temperature word: greedy
    pen = row(SamplingParams(temperature=0.7, repetition_penalty=tiny, seed=3), n_out=2)
    runner._sample(StepPlan([pen], 16), np.zeros((1, vocab), np.float32))
    r = recorded[0]
    # 1e-30: the documented floor of repetition_penalty; the counter is the token's index
    assert r["temperature"] == np.float32(0.7) or abs(r["temperature"] - 0.7) < 1e-6
    assert r["repetition_penalty"] == 1e-30 and r["seed"] == 3
    packed = pack_sampling_row(r["temperature"], r["top_k"], r["top_p"], r["min_p"], r["seed"],
                               r["repetition_penalty"]).view(np.float32)
    assert np.isfinite(np.float32(30.0) / packed[8])  # a positive logit over the penalty stays finite


def test_padded_metadata_of_large_batches_is_the_row_by_row_one():
    """Batches of 24 rows and more build their padded block tables and slots with whole-batch
    array operations; they must equal the row-by-row construction of small batches."""
    from orcd_grpc.backends.runner import RowSampling

    be = SimpleNamespace(name="cuda", host_memory=False, workspace_bytes=0, tuning=Tuning())
    runner = CudaRunner(be, RunnerModel(forward=None, hp=None, n_experts_used=0, block_size=4, pad_block=999,
                                        table_width=12, max_sequences=64))
    rng = np.random.default_rng(5)
    sampling = RowSampling(GREEDY, None)
    rows = []
    for i in range(37):
        nblocks = int(rng.integers(1, 13))
        table = rng.choice(900, nblocks, replace=False).tolist()
        start = int(rng.integers(4 * (nblocks - 1), 4 * nblocks))
        fed = i % 3 == 0
        rows.append(PlanRow(i, None if fed else [int(rng.integers(0, 300))], start, 1, table, [1], [2] * start,
                            sampling))
    plan = StepPlan(rows, 4)
    big = decode_meta(plan, 48, runner.model)
    want_tables = np.full((48, 12), -1, np.int32)
    want_tables[37:, 0] = 999
    for b, r in enumerate(rows):
        want_tables[b, : len(r.block_table)] = r.block_table
    np.testing.assert_array_equal(big.block_tables, want_tables)
    np.testing.assert_array_equal(big.slot_mapping[:37], [r.block_table[r.start // 4] * 4 + r.start % 4 for r in rows])
    assert (big.slot_mapping[37:] == 999 * 4).all()
    np.testing.assert_array_equal(big.positions[:37], [r.start for r in rows])
    np.testing.assert_array_equal(big.token_ids[:37], [0 if r.tokens is None else r.tokens[0] for r in rows])
    np.testing.assert_array_equal(big.ctx_lens, big.positions + 1)
    # and a small batch (row by row) of the same rows gives the same rows
    small = decode_meta(StepPlan(rows[:5], 4), 8, runner.model)
    np.testing.assert_array_equal(small.block_tables[:5], want_tables[:5])
    np.testing.assert_array_equal(small.slot_mapping[:5], big.slot_mapping[:5])


def test_deep_decode_steps_key_a_graph_of_their_own():
    """ORCD_ATTN_SPLITS_DEEP: a decode step whose deepest row holds more than 4,096 keys replays the graph
    ("decode", bucket, "deep"), its metadata marked deep (attention's key slices were captured for
    it); shallower steps, or the switch off, keep ("decode", bucket) and deep=False."""
    from orcd_grpc.backends.runner import RowSampling

    sampling = RowSampling(GREEDY, None)

    def plan(*starts):
        return StepPlan([PlanRow(i, [5], s, 1, list(range(s // 16 + 1)), [1], [2] * s, sampling)
                         for i, s in enumerate(starts)], 16)

    model = RunnerModel(forward=None, hp=None, n_experts_used=0, block_size=16, pad_block=999, table_width=600,
                        max_sequences=8)
    for tuning, starts, key in ((Tuning(attn_splits_deep=256), (100, 5000), ("decode", 2, "deep")),
                                (Tuning(attn_splits_deep=256), (100, 4095), ("decode", 2)),
                                (Tuning(attn_splits_deep=256), (4096,), ("decode", 1, "deep")),
                                (Tuning(), (100, 5000), ("decode", 2))):
        be = SimpleNamespace(name="cuda", host_memory=False, workspace_bytes=0, tuning=tuning)
        runner = CudaRunner(be, model)
        p = plan(*starts)
        got = runner._decode_key(p)
        meta = runner._decode_meta(p, got)
        assert got == key and meta.deep is (len(key) > 2), (starts, got)


class ScoringFakeCuda(FakeCuda):
    """FakeCuda with score.cu's and the row gather's contracts in NumPy: the device-side
    scoring path's indexing (which logits row is which position, which rows are sampled after)."""

    def __init__(self):
        super().__init__()
        self.scored_rows = []

    def prompt_logprobs(self, logits, rows, targets, n_top=0):
        x = np.asarray(logits, np.float64)[rows]
        self.scored_rows.append(len(rows))
        lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
        order = np.argsort(-x, axis=1, kind="stable")[:, :n_top]
        return ((x[np.arange(len(rows)), targets] - lse).astype(np.float32), order.astype(np.int32),
                (np.take_along_axis(x, order, 1) - lse[:, None]).astype(np.float32))

    def gather_row_blocks(self, x, blocks):
        return np.concatenate([np.asarray(x)[a:a + n] for a, n in blocks]).view(_Rows)


def test_scored_rows_are_scored_and_the_others_still_sampled(tmp_path):
    """A step with scored prompt chunks beside plain ones: the scores equal the host runner's
    (the same logits rows, the same targets), and every sampled token is the host runner's."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    rng = np.random.default_rng(3)
    prompts = [[1] + rng.integers(3, 320, n).tolist() for n in (37, 9, 20)]
    got = {}
    for name, backend in (("cuda", ScoringFakeCuda()), ("host", "numpy")):
        eng = load_engine(path, backend=backend, max_sequences=4, max_context=256)
        try:
            seqs = [eng.new_sequence(p, SamplingParams(temperature=0.0, prompt_logprobs=k))
                    for p, k in zip(prompts, (4, None, 0))]
            scores = {s.seq_id: [] for s in seqs}
            while any(len(s.output_ids) < 3 for s in seqs):
                eng.step(seqs, 12)
                for s in seqs:
                    scores[s.seq_id] += s.prompt_scores
                    s.prompt_scores = []
            got[name] = ([list(s.output_ids) for s in seqs],
                         [[(c.first, c.targets.tolist(), c.logprobs, c.top_ids) for c in scores[s.seq_id]] for s in seqs])
            if name == "cuda":
                assert backend.scored_rows, "the device path never scored"
        finally:
            eng.close()
    assert got["cuda"][0] == got["host"][0]
    for a, b in zip(got["cuda"][1], got["host"][1]):
        assert [(f, t) for f, t, _, _ in a] == [(f, t) for f, t, _, _ in b]
        for (_, _, lp_a, ti_a), (_, _, lp_b, ti_b) in zip(a, b):
            np.testing.assert_allclose(lp_a, lp_b, atol=1e-5, rtol=0)
            np.testing.assert_array_equal(ti_a, ti_b)


class _History:
    """A stand-in matcher whose allowed tokens depend on every token it was given: after tokens
    t1..tn, only the three ids (sum * 7 + j) % V, j < 3. A mask filled before the token in flight
    reached it allows other tokens, so a step sampled too early shows."""

    def __init__(self, vocab):
        self.vocab, self.seen = vocab, []

    def allowed(self) -> list[int]:
        return [(sum(self.seen) * 7 + j) % self.vocab for j in range(3)]

    @staticmethod
    def fill_rows(items, bits):
        for i, c in items:
            a = np.zeros(c.vocab, bool)
            a[c.allowed()] = True
            bits[i] = pack_bitmask(a)

    def accept(self, token):
        self.seen.append(int(token))


def test_constrained_rows_are_queued_and_masked_after_the_token_in_flight(tmp_path):
    """Rows with a constraint ride the overlap loop: the forward of the step after the one in
    flight is queued fed on the device, and its sampling waits until the host has given that
    step's token to the matcher. Every token must be one the matcher allowed after all the tokens
    before it, and the outputs must equal step-by-step decoding's; an unconstrained row beside
    them is unaffected."""
    def run(eng, be, lookahead):
        V = eng.info.vocab_size
        cons = [_History(V), _History(V)]
        seqs = [eng.new_sequence([1, 5 + i, 9], SamplingParams(temperature=0.7, seed=i, constraint=c))
                for i, c in enumerate(cons)]
        seqs.append(eng.new_sequence([1, 4, 4, 8], SamplingParams(temperature=0.7, seed=7)))
        ov = Overlap(eng)
        checked = settled = 0
        while len(seqs[0].output_ids) < 12:
            before = [list(c.seen) for c in cons]
            allowed = [c.allowed() for c in cons]
            out = ov.step(seqs, may_follow=lambda s: len(s.output_ids) + 2 <= 12)
            if ov.inflight is not None:  # settled: its sampling queued as soon as the matchers took `out`
                assert not isinstance(ov.inflight[1].pending, _Unsampled)
                settled += 1
            for c, s, seen, ok in zip(cons, seqs, before, allowed):
                if s.seq_id in out:
                    assert c.seen == seen + [out[s.seq_id].token_id]  # the sequence's append fed it
                    assert out[s.seq_id].token_id in ok, (lookahead, seen, out[s.seq_id].token_id, ok)
                    checked += 1
        assert checked == 24 and ov.inflight is None
        if lookahead:
            assert be.fed >= 8 and settled >= 8, (be.fed, settled)  # constrained steps were queued ahead
        outputs = [list(s.output_ids) for s in seqs]
        for s in seqs:
            eng.release(s)
        return outputs

    runs = _with_and_without_lookahead(write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0"), run, max_sequences=4)
    assert runs[True] == runs[False] == runs["changed"]


def test_llguidance_constraints_on_the_overlap_loop_match_step_by_step(tmp_path):
    """tests/schedules.py's constrained_batch (real llguidance matchers, a changing batch) over
    the queued fake: the same tokens with and without lookahead, each in its language. The GPU
    test of the same schedule is tests/gpu/test_constraints_gpu.py."""
    from schedules import constrained_batch

    changed = []

    def run(eng, be, lookahead):
        outputs = constrained_batch(eng)
        assert (be.fed >= 5) if lookahead else be.fed == 0, be.fed
        changed.append(be.fed_changed)
        return outputs

    runs = _with_and_without_lookahead(write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0"), run, max_sequences=8)
    assert runs[True] == runs[False] == runs["changed"]
    assert changed[0] > 0, changed  # constrained sequences left a batch whose next step was queued
    assert sum(len(r) for r in runs[False]) >= 20


def test_overlap_names_the_kind_of_each_step_it_delivers(tmp_path):
    """Overlap.last_kind (what orcd_engine_steps{kind} counts): a step that carried prompt tokens
    is prefill; with lookahead, the decode steps after it were queued behind the one in flight
    (decode_ahead); without it, each was launched on its own (decode). A changed batch delivers
    the step in flight, one queued ahead."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    for lookahead, later in ((True, "decode_ahead"), (False, "decode")):
        be = _queued_device_backend()
        eng = load_engine(path, backend=be, max_sequences=4, max_context=256)
        try:
            eng.runner.lookahead = lookahead
            a = eng.new_sequence([1, 5, 9, 13, 17], SamplingParams(temperature=0.7, seed=3))
            ov = Overlap(eng)
            kinds = []
            for _ in range(5):
                ov.step([a])
                kinds.append(ov.last_kind)
            # queuing ahead needs the bucket's graph captured: the first decode steps run on their own
            assert kinds[0] == "prefill" and set(kinds[1:]) <= {"decode", later} and kinds[-1] == later, kinds
            b = eng.new_sequence([1, 7, 11], SamplingParams(temperature=0.7, seed=4))
            ov.step([a, b])  # the batch changed: what was in flight (if anything) is delivered
            assert ov.last_kind == ("decode_ahead" if lookahead else "prefill")
            ov.step([a, b])
            assert ov.last_kind == ("prefill" if lookahead else "decode")
            ov.drain()
            assert ov.last_kind in (None, "decode_ahead")
            eng.release(a)
            eng.release(b)
        finally:
            eng.close()


def test_an_eager_step_feeds_the_decode_step_after_it(tmp_path):
    """ORCD_FEED_EAGER: a step carrying prompt tokens runs eagerly; when each of its rows samples one
    token on the device, the decode step after it is queued behind it and fed on the device
    ("decode_ahead" right after "prefill"), and every sequence gets the tokens of plain step-by-step
    decoding. Off, the step after it waits for the host."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    rng = np.random.default_rng()
    prompts = [[1] + rng.integers(3, 320, int(k)).tolist() for k in rng.integers(3, 30, 3)]
    runs = {}
    for mode in ("feed", "no-feed", "plain"):
        be = _queued_device_backend()
        eng = load_engine(path, backend=be, max_sequences=4, max_context=256)
        try:
            eng.runner.lookahead = mode != "plain"
            eng.runner.feed_eager = mode != "no-feed"
            params = [SamplingParams(temperature=0.7, seed=i + 5) for i in range(3)]
            runs[mode] = join_beside_decoding(eng, prompts, params, 4)
            assert not be.pending, "a queued sampling was never read"
        finally:
            eng.close()
    want = runs["plain"][0]
    for mode in ("feed", "no-feed"):  # steps queued ahead add tokens when drained: the plain ones come first
        for got, plain in zip(runs[mode][0], want):
            assert got[: len(plain)] == plain and len(got) >= len(plain), mode
    k = runs["feed"][1]
    assert "prefill" in k and k[k.index("prefill") + 1] == "decode_ahead", k
    k = runs["no-feed"][1]
    assert k[k.index("prefill") + 1] == "decode", k


def test_only_steps_sampled_wholly_on_the_device_feed_the_next():
    """_feedable: an eager step may feed the step after it only if every row samples one token on
    the device; a row that does not sample (a prompt chunk), wants logits, has a bias, is scored,
    verifies drafts or needs penalties keeps the step synchronous."""
    plain = SamplingParams(temperature=0.7)
    pen = SamplingParams(temperature=0.7, repetition_penalty=1.2)

    def row(**kw):
        base = dict(sample=True, logits=0, bias=None, scored=0, drafts=None,
                    sampling=SimpleNamespace(penalised=pen is kw.pop("params", plain)))
        return SimpleNamespace(**{**base, **kw})

    ok = [row(), row()]
    assert CudaRunner._feedable(SimpleNamespace(rows=ok))
    for bad in (row(sample=False), row(logits=1), row(bias={3: 1.0}), row(scored=2), row(drafts=[4, 5]),
                row(params=pen)):
        assert not CudaRunner._feedable(SimpleNamespace(rows=ok + [bad])), bad


def test_padded_mixed_steps_match_unpadded(tmp_path):
    """ORCD_MIXED_GRAPHS: steps that carry prompt tokens, padded to a (rows, tokens) bucket (one
    padding row in the spare block, further rows without tokens, max_q pinned to the bucket), must
    give the real rows exactly the logits of the host runner's unpadded steps, while sequences join
    a running batch and a long prompt is chunked over steps that sample nothing for it."""
    import dataclasses

    rng = np.random.default_rng()
    prompts = [[1] + rng.integers(3, 320, int(n)).tolist() for n in (*rng.integers(2, 40, 4), 150)]
    joins = {2: 2, 4: 3, 6: 4}  # step -> the prompt that joins before it

    def drive(eng, seqs):
        running, step = list(seqs[:2]), 0
        while running or step <= max(joins):
            if step in joins:
                running.append(seqs[joins[step]])
            if running:
                eng.step(running, 64)  # a token budget that chunks the long prompt
            for s in list(running):
                if len(s.output_ids) >= 6:
                    running.remove(s)
                    eng.release(s)
            step += 1

    padded = FakeCuda()
    padded.tuning = dataclasses.replace(Tuning(), mixed_graphs=True)
    _assert_padded_matches_plain(write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0"), prompts, padded, drive)
    mixed = {key for key, _ in padded.buckets_seen if key[0] == "mixed"}
    assert mixed and all(key[2] in MIXED_TOKEN_BUCKETS for key in mixed), padded.buckets_seen


def test_mixed_step_metadata_pads_to_its_bucket():
    """mixed_meta: the real rows' tokens, positions, slots and tables first; the padding row
    holds the missing tokens at positions 0.. of the spare block; rows without tokens after it; one
    logits row per row, the sampled rows' last tokens first; max_q pinned to the token bucket."""
    model = SimpleNamespace(table_width=6, pad_block=99)
    runner = CudaRunner.__new__(CudaRunner)
    runner.model = model

    def row(start, n, table, sample=True, tokens=None):
        return SimpleNamespace(start=start, n=n, block_table=table, sample=sample, logits_count=int(sample),
                               tokens=tokens if tokens is not None else list(range(100 + start, 100 + start + n)))

    plan = SimpleNamespace(block_size=4, rows=[row(9, 1, [5, 6, 7]), row(0, 6, [3, 4], sample=False), row(6, 2, [1, 2])])
    meta = mixed_meta(plan, 8, 16, runner.model)
    assert meta.max_q == 16 and meta.num_tokens == 16 and meta.num_seqs == 8
    assert list(meta.q_starts) == [0, 1, 7, 9] + [16] * 5
    assert list(meta.ctx_lens) == [10, 6, 8, 7, 0, 0, 0, 0]
    assert list(meta.positions) == [9, 0, 1, 2, 3, 4, 5, 6, 7] + list(range(7))
    assert list(meta.slot_mapping[:9]) == [7 * 4 + 1, 12, 13, 14, 15, 16, 17, 2 * 4 + 2, 2 * 4 + 3]
    assert list(meta.slot_mapping[9:]) == [99 * 4 + p % 4 for p in range(7)]
    assert list(meta.token_ids[:9]) == [109, 100, 101, 102, 103, 104, 105, 106, 107]
    assert (meta.block_tables[3:] == 99).all() and list(meta.block_tables[0, :4]) == [5, 6, 7, -1]
    assert list(meta.logits_rows) == [0, 8] + [15] * 6


def test_mixed_token_buckets_stop_at_the_switch():
    """ORCD_MIXED_MAX_TOKENS: a step of more prompt tokens than the largest bucket it allows launches
    eagerly; raised, the same step pads to the next bucket up (with a padding row: rows bucket 4)."""
    import dataclasses

    def key(max_tokens, T, rows=3, step_tokens=4096):
        runner = CudaRunner.__new__(CudaRunner)
        tuning = dataclasses.replace(Tuning(), mixed_graphs=True, mixed_max_tokens=max_tokens)
        runner.buckets, runner.mixed_graphs = [1, 2, 4, 8], True
        runner.mixed_tokens = mixed_token_buckets(tuning)
        runner.capabilities = SimpleNamespace(max_step_tokens=step_tokens)
        runner.model = SimpleNamespace(table_width=64)
        ns = [T - (rows - 1)] + [1] * (rows - 1)
        plan = SimpleNamespace(block_size=16, rows=[SimpleNamespace(n=n, logits=0, scored=0, drafts=None) for n in ns])
        return runner._mixed_key(plan)

    assert key(512, 512) == (4, 512) and key(512, 511) == (4, 512)
    assert key(512, 513) is None and key(512, 900) is None
    assert key(1024, 900) == (4, 1024) and key(768, 700) == (4, 768) and key(768, 900) is None
    assert key(2048, 2048) == (4, 2048) and key(2048, 2049) is None
    assert key(1024, 900, step_tokens=1000) is None  # the bucket must fit the step workspace
    with pytest.raises(ValueError, match="ORCD_MIXED_MAX_TOKENS"):
        Tuning.from_env({"ORCD_MIXED_MAX_TOKENS": "600"})


def test_mixed_graphs_capture_every_reachable_bucket_at_load(tmp_path):
    """ORCD_MIXED_GRAPHS: the load runs every decode bucket and every (rows, tokens) bucket a step can
    reach twice (graph_step's eager first step, then its capture), on padding rows that write only
    the spare block, with the shapes a real step of the bucket has; without the switch, none."""
    import dataclasses


    class Recording(FakeCuda):
        prepare_at_load = True

        def __init__(self):
            super().__init__()
            self.steps = []

        def reserve_step_meta(self, tokens, seqs, table):
            assert not self.steps, "reserved after a graph was captured: growing drops the graphs"
            super().reserve_step_meta(tokens, seqs, table)

        def graph_step(self, key, meta, record, **kw):
            self.steps.append((key, meta))
            return super().graph_step(key, meta, record, **kw)

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    plain = Recording()
    plain.tuning = dataclasses.replace(Tuning(), mixed_graphs=False)
    load_engine(path, backend=plain, max_sequences=16, max_context=256).close()
    assert plain.steps == []

    be = Recording()
    be.tuning = dataclasses.replace(Tuning(), mixed_graphs=True, mixed_max_tokens=512)
    eng = load_engine(path, backend=be, max_sequences=16, max_context=256)
    try:
        runner, pad = eng.runner, eng.allocator.num_blocks
        keys = [k for k, _ in be.steps]
        assert len(keys) == 2 * len(set(keys)) and keys[0::2] == keys[1::2]
        room = runner.model.table_width * eng.allocator.block_size  # 256: the context
        want = {("decode", nb) for nb in runner.buckets} | {("mixed", *k) for k in runner.mixed_keys() if k[1] <= room}
        assert set(keys) == want and ("mixed", 16, 256) in want and ("mixed", 16, 384) not in want
        tokens, seqs, table = be.reserved  # every step of every bucket fits what was reserved first
        assert tokens >= runner.capabilities.max_step_tokens or tokens == 65535
        for key, meta in be.steps:
            assert meta.num_tokens <= tokens and meta.num_seqs <= seqs and meta.block_tables.size <= table, key
            nb = key[1]
            assert meta.num_seqs == nb and (meta.slot_mapping // eng.allocator.block_size == pad).all(), key
            assert set(np.unique(meta.block_tables)) <= {pad, -1}, key
            if key[0] == "mixed":
                assert meta.num_tokens == meta.max_q == key[2] and list(meta.ctx_lens[:1]) == [key[2]], key
        # every step the scheduler can make pads to a captured bucket
        rng = np.random.default_rng()
        for _ in range(2000):
            rows = int(rng.integers(1, 17))
            tokens = int(rng.integers(rows, 600))
            k = mixed_bucket(tokens, rows, runner.buckets, runner.mixed_tokens, runner.capabilities.max_step_tokens,
                             runner.model.table_width * eng.allocator.block_size)
            assert k is None or k in runner.mixed_keys(), (tokens, rows, k)
        # the model still decodes as before
        s = eng.new_sequence([1, 5, 6, 7], GREEDY)
        for _ in range(3):
            eng.step([s])
        assert len(s.output_ids) == 3
    finally:
        eng.close()
