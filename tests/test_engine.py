"""The engine on the real SmolLM2 file with the NumPy backend: batching, chunking and the prefix
cache must not change the math."""
import pathlib
import sys

import numpy as np

from orcd_grpc.backends.runner import pack_bitmask
import pytest

from orcd_grpc.loader import load_engine
from orcd_grpc.sampling import SamplingParams

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/: the tiny-model writer, the schedules
from gpu.test_cuda_models import write_tiny_llama  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine(smollm2_path):
    # the float32 reference: these tests check the engine's chunking and prefix cache, at float32 tolerances
    eng = load_engine(smollm2_path, backend="numpy", context_length=512, max_sequences=8)
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


def test_step_token_cap_leaves_room_for_logits():
    from types import SimpleNamespace

    from orcd_grpc.backends.runner import max_step_tokens as _max_step_tokens

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


def test_host_runner_declares_what_it_can_do(engine):
    caps = engine.capabilities
    assert caps.name == "numpy" and caps.memory == "host"
    assert not (caps.device_sampling or caps.overlap or caps.graphs)
    assert caps.max_step_tokens == 1 << 30


def test_plan_returns_logits_at_several_positions_and_samples_the_last(engine):
    """A row may ask for the logits of several of its positions (prompt log-probs, speculative
    verification) and still sample from its last: the logits are those of a plain scoring."""
    from orcd_grpc.backends.runner import StepPlan

    ids = engine.tokenizer.encode("The capital of France is")
    s = engine.new_sequence(ids, GREEDY)
    want = engine.score(s)
    engine.release(s)
    s = engine.new_sequence(ids, GREEDY)
    _, (row,) = engine._schedule([s], 1 << 30)
    row.logits = 3
    res = engine.runner.run(StepPlan([row], engine.allocator.block_size))
    engine.release(s)
    np.testing.assert_allclose(res.logits[s.seq_id], want[-3:], rtol=1e-5, atol=1e-5)
    assert res.samples[s.seq_id].token_id == int(np.argmax(want[-1]))


def test_mask_and_bias_apply_before_sampling(engine):
    """Per-row masks (grammars) and biases (logit_bias) change what is sampled, on the host."""
    ids = engine.tokenizer.encode("The capital of France is")
    paris = engine.tokenizer.encode(" Paris", add_bos=False)[0]
    s = engine.new_sequence(ids, GREEDY)
    s.bias = {paris: -1e9}
    out = engine.step([s])
    assert out[s.seq_id].token_id != paris
    engine.release(s)
    mask = np.zeros(engine.info.vocab_size, bool)
    mask[[11, 12]] = True
    s = engine.new_sequence(ids, GREEDY)
    s.mask = pack_bitmask(mask)
    out = engine.step([s])
    assert out[s.seq_id].token_id in (11, 12) and s.output_ids == [out[s.seq_id].token_id]
    engine.release(s)


def _names_and_logits(path, monkeypatch, var: str, prompt) -> dict:
    """{value: (the loaded weights' names, the prompt's logits)} with env var at "1", then "0"."""
    out = {}
    for value in ("1", "0"):
        monkeypatch.setenv(var, value)
        eng = load_engine(path, backend="numpy", max_sequences=2, max_context=256)
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
