"""The engine on the real SmolLM2 file with the NumPy backend: batching, chunking and the prefix
cache must not change the math."""
import pathlib
import sys

import numpy as np
import pytest

from orcd_grpc.loader import load_engine
from orcd_grpc.sampling import SamplingParams

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/: the tiny-model writer, the schedules
from gpu.test_cuda_models import write_tiny_llama  # noqa: E402
from schedules import changing_batch  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine(smollm2_path):
    eng = load_engine(smollm2_path, backend="cpu", context_length=512, max_sequences=8)
    yield eng
    eng.close()


def test_capital_of_france_greedy(engine):
    ids = engine.tokenizer.encode("The capital of France is")
    s = engine.new_sequence(ids, GREEDY)
    out = engine.step([s])
    assert engine.tokenizer.decode([out[s.seq_id].token_id]) == " Paris"
    engine.release(s)


# Chunked, batched prefill must give the logits of one pass. Tolerance: max|chunked - one pass|
# <= 1e-4 * max|one pass| (float32 reassociation across chunk shapes measures about 2e-6 here).
# The bug this once caught (a step of prompt chunks none of which finished its prompt skipped the
# forward, so those tokens' KV was never written) showed up as differences of 0.2-1.0 relative.
CHUNK_REL_TOL = 1e-4


def _record_sampled_logits(seq) -> list:
    """Wraps seq's host sampler so every logits row it samples from is kept."""
    rows, sample = [], seq.sampler.sample

    def recording(logits, *args, **kwargs):
        rows.append(np.array(logits, np.float64, copy=True))
        return sample(logits, *args, **kwargs)

    seq.sampler.sample = recording
    return rows


def test_chunked_prefill_and_batching_match_one_pass(engine):
    # Without the prefix cache, so every prompt token really goes through the chunked prefill.
    engine.allocator.prefix_cache = False
    try:
        _chunked_prefill_and_batching(engine)
    finally:
        engine.allocator.prefix_cache = True


def _chunked_prefill_and_batching(engine):
    rng = np.random.default_rng()
    a_ids = rng.integers(200, 40000, 37).tolist()
    b_ids = rng.integers(200, 40000, 21).tolist()
    free0 = engine.free_blocks()
    ref = {}
    for ids in (a_ids, b_ids):
        s = engine.new_sequence(ids, GREEDY)
        ref[len(ids)] = engine.score(s)[-1].astype(np.float64)
        engine.release(s)
    a, b = engine.new_sequence(a_ids, GREEDY), engine.new_sequence(b_ids, GREEDY)
    got = {a.seq_id: _record_sampled_logits(a), b.seq_id: _record_sampled_logits(b)}
    steps = 0
    while a.prefill_remaining or b.prefill_remaining:
        # Chunks of at most 16 tokens shared by the batch: a alone for two steps (nothing is
        # sampled in them), then a's last 5 tokens with b's first 11, then b's last 10.
        engine.step([a, b], token_budget=16)
        steps += 1
    assert steps >= 4
    for s, ids in ((a, a_ids), (b, b_ids)):
        want, first = ref[len(ids)], got[s.seq_id][0]
        rel = np.abs(first - want).max() / np.abs(want).max()
        assert rel <= CHUNK_REL_TOL, (len(ids), rel)
        assert s.output_ids[0] == int(np.argmax(first))
    engine.release(a)
    engine.release(b)
    assert engine.free_blocks() == free0


def test_prompt_only_chunk_steps_write_kv(engine):
    """A step whose chunks all stop short of their prompt's end samples nothing, yet must still
    run the forward: the next chunk attends to the KV it writes."""
    engine.allocator.prefix_cache = False
    try:
        ids = np.random.default_rng().integers(200, 40000, 40).tolist()
        s = engine.new_sequence(ids, GREEDY)
        want = engine.score(s)[-1].astype(np.float64)
        engine.release(s)
        s = engine.new_sequence(ids, GREEDY)
        rows = _record_sampled_logits(s)
        outs = [engine.step([s], token_budget=16) for _ in range(3)]  # 16 + 16 + 8 tokens
        assert outs[0] == {} and outs[1] == {} and s.seq_id in outs[2]
        rel = np.abs(rows[0] - want).max() / np.abs(want).max()
        assert rel <= CHUNK_REL_TOL, rel
        engine.release(s)
    finally:
        engine.allocator.prefix_cache = True


def test_prefix_cache_reuses_blocks_without_changing_logits(engine):
    rng = np.random.default_rng()
    system = rng.integers(200, 40000, 40).tolist()
    q1 = system + rng.integers(200, 40000, 5).tolist()
    s1 = engine.new_sequence(q1, GREEDY)
    engine.score(s1)
    s2 = engine.new_sequence(system + [11, 12, 13], GREEDY)
    cached_logits = engine.score(s2)[-1]
    assert s2.cached_prompt_tokens == 32  # two full 16-token blocks of the shared 40-token prefix
    assert s2.block_table[:2] == s1.block_table[:2]
    engine.release(s1)
    engine.release(s2)
    engine.allocator.prefix_cache = False
    try:
        s3 = engine.new_sequence(system + [11, 12, 13], GREEDY)
        fresh_logits = engine.score(s3)[-1]
        engine.release(s3)
    finally:
        engine.allocator.prefix_cache = True
    rel = np.abs(cached_logits - fresh_logits).max() / np.abs(fresh_logits).max()
    assert rel < 1e-5


def test_device_sampling_rows_are_packed_once_and_counted(tmp_path):
    """The engine's fast path for backends that sample on the device: per step each row carries
    the sequence's packed parameters with the token index as the Philox counter. A NumPy backend
    with a recording sample_packed (greedy argmax) stands in for the GPU here."""
    from orcd_grpc.backends.cuda import pack_sampling_row as pack_row
    from orcd_grpc.backends.numpy_backend import NumpyBackend

    calls = []

    class Recording(NumpyBackend):
        pack_sampling_row = staticmethod(pack_row)

        def sample_packed(self, logits, prm, pen, n_top=0):
            calls.append(prm.copy())
            return np.argmax(logits, -1).astype(np.int32), np.zeros(len(logits), np.float32)

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    eng = load_engine(path, backend=Recording(), max_sequences=4, max_context=256)
    try:
        eng.device_sampling = True
        a = eng.new_sequence([1, 5, 6], SamplingParams(temperature=0.5, top_k=7, seed=3))
        b = eng.new_sequence([1, 9], SamplingParams(temperature=0.0, seed=(1 << 40) + 2))
        for _ in range(4):
            eng.step([a, b])
        assert len(a.output_ids) == len(b.output_ids) == 4
        first, last = calls[0], calls[-1]
        assert first.view(np.float32)[0, 0] == np.float32(0.5) and first[0, 1] == 7
        assert (first[0, 4], first[0, 5]) == (3, 0) and (first[1, 4], first[1, 5]) == (2, 1 << 8)
        assert list(first[:, 6]) == [0, 0] and list(last[:, 6]) == [3, 3]
        assert a.device_row is not None and not np.shares_memory(a.device_row, first)
    finally:
        eng.close()


def test_padded_decode_steps_match_unpadded(tmp_path):
    """The CUDA-graph path pads a decode batch to its bucket (pad rows write KV into the spare
    block and attend to it alone). Run on the NumPy backend, the padded steps must give the real
    rows exactly the logits of unpadded steps, while sequences join and leave."""
    from orcd_grpc.backends.numpy_backend import NumpyBackend

    class Padded(NumpyBackend):
        supports_graphs = True
        buckets_seen: set = set()

        def graph_step(self, key, meta, record):
            self.buckets_seen.add((key, meta.num_seqs))
            return record(self.begin_step(meta))

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    rng = np.random.default_rng(3)
    prompts = [[1] + rng.integers(3, 320, n).tolist() for n in (3, 21, 40)]
    runs = {}
    for name, be in (("padded", Padded()), ("plain", NumpyBackend())):
        eng = load_engine(path, backend=be, max_sequences=8, max_context=256)
        try:
            if name == "padded":
                assert eng.graph_buckets and eng.graph_buckets[0] == 1
            seqs = [eng.new_sequence(p, GREEDY) for p in prompts]
            rec = [_record_sampled_logits(s) for s in seqs]
            running = list(seqs)
            while running:
                eng.step(running)
                for s in list(running):
                    if len(s.output_ids) >= (4 if s is seqs[1] else 9):
                        running.remove(s)
                        eng.release(s)
            runs[name] = ([list(s.output_ids) for s in seqs], [np.stack(r) for r in rec])
        finally:
            eng.close()
    assert runs["padded"][0] == runs["plain"][0]
    for a, b in zip(runs["padded"][1], runs["plain"][1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert {b for (_, b) in Padded.buckets_seen} >= {4, 2}  # 3 sequences padded to 4; then 2


def test_step_token_cap_leaves_room_for_logits():
    from types import SimpleNamespace

    from orcd_grpc.engine import _max_step_tokens

    gpt_oss = SimpleNamespace(d_model=2880, d_ff=2880, n_heads=64, n_kv_heads=8, head_dim=64, head_dim_v=64,
                              vocab_size=201088)
    ws = 512 << 20
    few, many = _max_step_tokens(gpt_oss, ws, 4, 8), _max_step_tokens(gpt_oss, ws, 4, 64)
    assert 16 <= many < few < 65535
    per_token = 4 * (6 * 2880 + 2 * (64 * 64 + 8 * 128) + 3 * 2880 * 4 + 4 * 2880)
    assert many * 2 * per_token + 2 * 4 * 201088 * 64 <= ws  # activations + logits fit
    assert _max_step_tokens(gpt_oss, ws, 4, 400) == 16        # logits alone overflow: the floor
    tiny = SimpleNamespace(d_model=64, d_ff=128, n_heads=2, n_kv_heads=1, head_dim=32, head_dim_v=32, vocab_size=320)
    assert _max_step_tokens(tiny, 4 * ws, 0, 4) == 65535 and _max_step_tokens(tiny, 0) == 1 << 30


class _Rows(np.ndarray):
    def row_slice(self, a, b):
        return self[a:b]


def _queued_device_backend():
    """The NumPy backend behind the device API that Engine lookahead uses: a step may be fed the
    token ids of a sampling the host has not read yet (here computed at once, as the GPU would
    have by the time the fed step runs), and sampling is a function of the logits and of the
    row's counter (the GPU's Philox counter), so a wrong counter changes the tokens."""
    from types import SimpleNamespace

    from orcd_grpc.backends.cuda import pack_sampling_row as pack_row
    from orcd_grpc.backends.numpy_backend import NumpyBackend

    class Queued(NumpyBackend):
        supports_graphs = True
        pack_sampling_row = staticmethod(pack_row)

        def __init__(self):
            super().__init__()
            self.ready, self.pending, self.fed, self.overlapped = set(), [], 0, 0

        def graph_ready(self, key):
            return key in self.ready

        def graph_step(self, key, meta, record, feed=None, overlap=False):
            if feed is not None:
                assert overlap and feed in self.pending, "fed by a sampling the host has not read"
                meta.token_ids = meta.token_ids.copy()
                meta.token_ids[: feed.R] = feed.toks
                self.fed += 1
            self.overlapped += bool(overlap)
            self.ready.add(key)  # the first step of a key stands for the eager run and the capture
            return np.asarray(record(self.begin_step(meta))).view(_Rows)

        def sample_packed_async(self, logits, prm, pen, n_top=0):
            x = self.to_host(logits)
            toks = ((np.argmax(x, -1) + 31 * prm[:, 6].astype(np.int64)) % x.shape[-1]).astype(np.int32)
            h = SimpleNamespace(R=len(toks), toks=toks, lps=-prm[:, 6].astype(np.float32))
            self.pending.append(h)
            return h

        def sample_result(self, h):
            self.pending.remove(h)
            return h.toks, h.lps

        def sample_packed(self, logits, prm, pen, n_top=0):
            return self.sample_result(self.sample_packed_async(logits, prm, pen, n_top))

        def sample(self, logits, rows, n_top=0):
            raise AssertionError("no penalised rows in this test")

    return Queued()


def test_lookahead_steps_give_the_tokens_of_plain_steps(tmp_path):
    """Engine lookahead (a decode step queued on the device, fed the previous step's tokens,
    before the host reads them) must give every sequence exactly the tokens of step-by-step
    decoding, while sequences finish, join, and leave the batch without being released."""

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    rng = np.random.default_rng()
    prompts = [[1] + rng.integers(3, 320, int(k)).tolist() for k in rng.integers(2, 40, 4)]
    runs: dict = {}
    for mode in ("lookahead", "plain"):
        be = _queued_device_backend()
        eng = load_engine(path, backend=be, max_sequences=8, max_context=256)
        try:
            assert eng.lookahead
            eng.lookahead = mode == "lookahead"
            free0 = eng.free_blocks()
            got, outputs, c_queued = changing_batch(eng, prompts)
            runs[mode] = (got, outputs)
            assert not be.pending, "a queued sampling was never read"
            assert eng.free_blocks() + len(eng.allocator._evictable) >= free0  # every block came back
            if mode == "lookahead":
                assert be.fed >= 5, be.fed  # the lookahead path really ran
                assert c_queued  # so c's queued-ahead step was dropped and its position given back
            else:
                assert be.fed == 0 and be.overlapped == 0
        finally:
            eng.close()
    got, outputs = runs["lookahead"]
    assert got == outputs  # what step returned is what each sequence holds
    assert [len(g) for g in got] == [4, 14, 14, 14]
    assert runs["lookahead"] == runs["plain"]


def test_scheduler_over_lookahead_streams_the_plain_tokens(tmp_path):
    """The real scheduler over an engine with lookahead: requests of different lengths join and
    finish (each finish leaves a step of it queued) and a late one joins a running batch; every
    stream must carry the tokens it carries without lookahead, and every KV block comes back."""
    import time

    from orcd_grpc.scheduler import LENGTH, FinishedEvent, Request, Scheduler, Stopping, TokenEvent

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
    for mode in ("lookahead", "plain"):
        be = _queued_device_backend()
        eng = load_engine(path, backend=be, max_sequences=8, max_context=256)
        eng.lookahead = mode == "lookahead"
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
            results[mode] = [[e.token_id for e in ev if isinstance(e, TokenEvent)] for ev in events]
            assert [len(t) for t in results[mode]] == [m for _, m in jobs]
            deadline = time.monotonic() + 10
            while eng.free_blocks() + len(eng.allocator._evictable) < free0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert eng.free_blocks() + len(eng.allocator._evictable) >= free0
            assert (be.fed > 0) == (mode == "lookahead"), be.fed
            assert eng._inflight is None and not be.pending  # every request ended by its max_tokens
        finally:
            sched.shutdown(0)
            eng.close()
    assert results["lookahead"] == results["plain"]


def test_lookahead_queues_no_step_past_max_tokens(tmp_path):
    """A sequence's max_tokens (the server passes each request's) bounds lookahead: once the step
    in flight brings it there, nothing more is queued, so the GPU is free for the next request
    the moment the last token is read. Without one, a step stays queued."""

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    be = _queued_device_backend()
    eng = load_engine(path, backend=be, max_sequences=4, max_context=256)
    try:
        for max_tokens in (7, 0):
            s = eng.new_sequence([1, 5, 9, 13], SamplingParams(temperature=0.7, seed=1), max_tokens)
            while len(s.output_ids) < 7:
                eng.step([s])
            assert len(s.output_ids) == 7
            if max_tokens:
                assert eng._inflight is None and not be.pending
                assert be.fed >= 3  # it did run ahead before the end
            else:
                assert eng._inflight is not None and len(be.pending) == 1
            eng.release(s)
            eng.drain()
            assert not be.pending
    finally:
        eng.close()


def _names_and_logits(path, monkeypatch, var: str, prompt) -> dict:
    """{value: (the loaded weights' names, the prompt's logits)} with env var at "1", then "0"."""
    out = {}
    for value in ("1", "0"):
        monkeypatch.setenv(var, value)
        eng = load_engine(path, backend="cpu", max_sequences=2, max_context=256)
        try:
            s = eng.new_sequence(prompt, GREEDY)
            out[value] = (set(eng.adapter.w), eng.score(s))
            eng.release(s)
        finally:
            eng.close()
    return out


def test_fused_qk_gives_the_separate_projections_logits(tmp_path, monkeypatch):
    """ORCD_FUSE_QK (default on; =0 off): where V's type differs from Q's and K's (qwen2.5's Q4_K_M files), Q
    and K load as one matrix with one bias and are split after the matmul; the logits must be those
    of the three separate projections (NumPy backend: the same weights, summed in another order)."""

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q4_0", v_qtype="Q8_0", qkv_bias=True)
    prompt = [1] + np.random.default_rng().integers(3, 320, 30).tolist()
    monkeypatch.setenv("ORCD_FUSE_WIDEN", "0")  # else Q/K/V fuse as one Q8_0 matrix (the test below)
    got = _names_and_logits(path, monkeypatch, "ORCD_FUSE_QK", prompt)
    for fuse, (names, _) in got.items():
        assert not any("attn_qkv_fused" in n for n in names)  # V's type differs: no Q/K/V fusion
        assert ("blk.0.attn_qk_fused.weight" in names) == (fuse == "1")
        assert ("blk.0.attn_qk_fused.bias" in names) == (fuse == "1")
    np.testing.assert_allclose(got["1"][1], got["0"][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qk_type", ["Q4_0", "Q5_0"])
def test_widened_qkv_gives_the_separate_projections_logits(tmp_path, monkeypatch, qk_type):
    """Q/K of a type that widens exactly to Q8_0 and V in Q8_0 (qwen2.5's Q4_K_M layout) load as
    one Q8_0 matrix; the logits must be those of the three separate projections as stored."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", qk_type, v_qtype="Q8_0", qkv_bias=True)
    prompt = [1] + np.random.default_rng().integers(3, 320, 30).tolist()
    got = _names_and_logits(path, monkeypatch, "ORCD_FUSE_WEIGHTS", prompt)
    for fuse, (names, _) in got.items():
        assert ("blk.0.attn_qkv_fused.weight" in names) == (fuse == "1")
        assert ("blk.0.attn_qkv_fused.bias" in names) == (fuse == "1")
        assert "blk.0.attn_qk_fused.weight" not in names
    np.testing.assert_allclose(got["1"][1], got["0"][1], rtol=1e-4, atol=1e-4)


def test_weights_sized_for_admission_are_the_weights_loaded(tmp_path):
    """The estimate that admits a model and the load come from one plan: with a backend that pads
    each weight (as the CUDA backend does), ModelInfo.weights_bytes is the sum over the very
    load_weight calls made, packed Q/K/V and gate/up included."""
    from orcd_grpc.backends.numpy_backend import NumpyBackend

    class Padded(NumpyBackend):
        def __init__(self):
            super().__init__()
            self.loaded = []

        def weight_nbytes(self, qtype, shape, raw_nbytes):
            return -(-(int(raw_nbytes) + 16) // 256) * 256

        def load_weight(self, name, raw, qtype, shape):
            self.loaded.append(self.weight_nbytes(qtype, shape, np.asarray(raw).nbytes))
            return super().load_weight(name, raw, qtype, shape)

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q5_0", v_qtype="Q8_0", qkv_bias=True)
    be = Padded()
    eng = load_engine(path, backend=be, max_sequences=2, max_context=256)
    try:
        assert "blk.0.attn_qkv_fused.weight" in eng.adapter.w
        assert eng.info.weights_bytes == sum(be.loaded)
    finally:
        eng.close()
