"""Parallel sampling (ExecuteRequest.n, issue #18) through a real server on a real port: SmolLM2 on
the CPU backend, driven by the real client stubs.

The n samples of a request share its one prefill (the KV blocks of the prompt but its last token;
a partly filled last block is copied for each sample, on the device, before they diverge). Each
sample streams its own tokens and ends with its own Finished event, and with a seed, sample k is
the request with n = 1 and seed + k. Cancelling or dropping the call frees every sample's blocks.
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from orcd_grpc.backends.numpy_backend import NumpyBackend
from orcd_grpc.backends.base import KVLayout
from orcd_grpc.kv_cache import BlockAllocator
from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.request import sample_seed
from orcd_grpc.server import ServerConfig, start_server

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, in a land far away,"  # 11 tokens: the last block is partly filled
MAX_SEQUENCES = 6
MAX_SAMPLES = 6


@pytest.fixture(scope="module")
def srv(smollm2_path):
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(smollm2_path.parent)], backend="cpu",
                       max_context=128, max_sequences=MAX_SEQUENCES, max_queue=8, grace_seconds=1,
                       max_samples=MAX_SAMPLES)
    worker, port, _ = start_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.WorkerStub(channel)
    list(stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name), timeout=600))
    engine = worker.scheduler.engine
    copies: list = []
    real_copy = engine.backend.copy_kv_blocks

    def counting(kv, pairs):  # the real op, counted: which blocks the forks copied
        copies.extend(pairs)
        return real_copy(kv, pairs)

    engine.backend.copy_kv_blocks = counting
    yield SimpleNamespace(worker=worker, stub=stub, engine=engine, copies=copies)
    channel.close()
    worker.stop(1)


def _request(n, *, text=PROMPT, tokens=None, temperature=0.0, seed=None, max_tokens=8, **kw):
    sampling = pb.SamplingParams(temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    req = pb.ExecuteRequest(n=n, sampling=sampling,
                            stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True), **kw)
    if tokens is not None:
        req.tokens.ids.extend(tokens)
    else:
        req.text = text
    return req


def _run(srv, req, timeout=300):
    """(started, {sample: [token ids]}, {sample: Finished}), checking the stream's shape."""
    events = list(srv.stub.Execute(req, timeout=timeout))
    kinds = [e.WhichOneof("event") for e in events]
    n = max(1, req.n)
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("finished") == n, kinds
    ids: dict[int, list[int]] = {}
    fins = {}
    for e in events[1:]:
        if e.HasField("token"):
            t = e.token
            assert t.sample_index not in fins, "a token after its sample's Finished"
            assert t.index == len(ids.setdefault(t.sample_index, [])), "Token.index counts within a sample"
            ids[t.sample_index].append(t.token_id)
        else:
            fins[e.finished.sample_index] = e.finished
    assert sorted(fins) == list(range(n)) and set(ids) <= set(fins)
    return events[0].started, ids, fins


def _wait_idle(srv, timeout=30.0):
    end = time.monotonic() + timeout
    while srv.worker.scheduler.stats()["live"] and time.monotonic() < end:
        time.sleep(0.02)
    assert srv.worker.scheduler.stats() == {"waiting": 0, "running": 0, "live": 0}


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_sample_k_is_the_single_request_with_the_derived_seed(srv, temperature):
    free = srv.engine.free_blocks()
    del srv.copies[:]
    started, ids, fins = _run(srv, _request(4, temperature=temperature, seed=11))
    p = started.prompt_tokens
    assert p == 11 and started.queue_position == 0
    # one prefill of the prompt but its last token; its partly filled block copied for samples 1..3
    assert len(srv.copies) == 3 and len({dst for _, dst in srv.copies}) == 3
    assert len({src for src, _ in srv.copies}) == 1
    for k in range(4):
        f = fins[k]
        assert f.reason == pb.FINISH_REASON_LENGTH and f.usage.completion_tokens == 8 == len(ids[k])
        assert f.usage.prompt_tokens == p
        if k:
            assert f.usage.cached_prompt_tokens == p - 1  # shared from sample 0's prefill
    for k in range(4):
        _, single, _ = _run(srv, _request(1, temperature=temperature, seed=sample_seed(11, k)))
        assert single[0] == ids[k], (k, single[0], ids[k])
    if temperature:
        assert len({tuple(v) for v in ids.values()}) > 1, "four seeds drew one completion"
    else:
        assert all(ids[k] == ids[0] for k in range(4))
    _wait_idle(srv)
    assert srv.engine.free_blocks() == free


def test_block_aligned_prompt_shares_every_block_without_a_copy(srv):
    ids = srv.engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)[:17]
    assert len(ids) == 17  # the 16 tokens before the last fill one block exactly
    del srv.copies[:]
    _, got, fins = _run(srv, _request(3, tokens=ids, max_tokens=5))
    assert srv.copies == []
    _, single, _ = _run(srv, _request(1, tokens=ids, max_tokens=5))
    assert got == {k: single[0] for k in range(3)}
    assert [fins[k].usage.cached_prompt_tokens for k in (1, 2)] == [16, 16]


def test_one_token_prompt_forks_at_once(srv):
    bos = srv.engine.tokenizer.encode("")
    _, got, _ = _run(srv, _request(2, tokens=bos[:1] or [1], max_tokens=3, temperature=0.7, seed=5))
    _, single, _ = _run(srv, _request(1, tokens=bos[:1] or [1], max_tokens=3, temperature=0.7, seed=6))
    assert got[1] == single[0]


def test_samples_end_on_their_own(srv):
    # stop at the first "," each sample writes: they finish at different steps, each with its own reason
    req = _request(4, temperature=1.0, seed=3, max_tokens=24)
    req.stopping.stop.append(",")
    _, ids, fins = _run(srv, req)
    reasons = {fins[k].reason for k in range(4)}
    assert reasons <= {pb.FINISH_REASON_STOP_STRING, pb.FINISH_REASON_LENGTH}
    assert len({fins[k].usage.completion_tokens for k in range(4)}) > 1
    for k in range(4):
        assert fins[k].usage.completion_tokens == len(ids.get(k, []))


@pytest.mark.parametrize("how", ["cancel-rpc", "client-gone"])
def test_cancel_frees_every_samples_blocks(srv, how):
    _wait_idle(srv)
    free = srv.engine.free_blocks()
    rid = f"par-{how}"
    call = srv.stub.Execute(_request(4, temperature=0.9, seed=1, max_tokens=100, request_id=rid), timeout=300)
    seen: set[int] = set()
    for ev in call:
        if ev.HasField("token"):
            seen.add(ev.token.sample_index)
        if seen == {0, 1, 2, 3}:
            break
    assert srv.engine.free_blocks() < free  # the samples hold blocks now
    if how == "cancel-rpc":
        assert srv.stub.Cancel(pb.CancelRequest(request_id=rid), timeout=10).cancelled
        rest = [e for e in call if e.HasField("finished")]
        assert sorted(e.finished.sample_index for e in rest) == [0, 1, 2, 3]
        assert {e.finished.reason for e in rest} == {pb.FINISH_REASON_CANCELLED}
    else:
        call.cancel()
    _wait_idle(srv)
    assert srv.engine.free_blocks() == free


def test_n_and_priority_are_checked_before_queueing(srv):
    for req, field in ((_request(MAX_SAMPLES + 1), "n: "), (_request(2, priority=1001), "priority: "),
                       (_request(2, priority=-5000), "priority: ")):
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.Execute(req, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    _, ids, _ = _run(srv, _request(MAX_SAMPLES, max_tokens=2))  # the cap itself is fine
    assert len(ids) == MAX_SAMPLES


def test_deadline_behind_a_full_batch_is_refused_at_once(srv):
    """Eight samples of a long request fill every sequence slot; a call whose deadline falls
    before the estimated start is refused at once with a retry hint, one without a deadline is
    queued and told its place and estimated wait, and one of higher priority goes ahead of it."""
    assert MAX_SAMPLES == MAX_SEQUENCES
    _wait_idle(srv)
    free = srv.engine.free_blocks()
    long = srv.stub.Execute(_request(MAX_SEQUENCES, temperature=0.9, seed=2, max_tokens=100, request_id="hog"),
                            timeout=300)
    tokens = 0
    for ev in long:
        tokens += ev.HasField("token")
        if tokens >= 2 * MAX_SEQUENCES:  # a few steps in: their time is known
            break
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(srv.stub.Execute(_request(1, max_tokens=4), timeout=1.0))
    assert time.monotonic() - t0 < 0.9  # refused, not timed out
    e = err.value
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "deadline" in e.details()
    assert int(dict(e.trailing_metadata())["retry-after-ms"]) > 0

    # no deadline on these two: on a busy machine the estimate may well exceed any fixed one
    # each needs every slot: they cannot run side by side, so their order shows
    low = srv.stub.Execute(_request(MAX_SEQUENCES, max_tokens=2, request_id="low"))
    first = next(low).started
    assert first.queue_position == 0 and first.estimated_start_ms > 1000.0
    high = srv.stub.Execute(_request(MAX_SEQUENCES, max_tokens=2, request_id="high", priority=5))
    assert next(high).started.queue_position == 0  # ahead of "low", which came first
    order: list[str] = []
    done = threading.Event()

    def drain(call, name):
        for ev in call:
            if ev.HasField("token") and name not in order:
                order.append(name)
        done.set()

    threads = [threading.Thread(target=drain, args=(c, nm)) for c, nm in ((low, "low"), (high, "high"))]
    for t in threads:
        t.start()
    srv.stub.Cancel(pb.CancelRequest(request_id="hog"), timeout=10)
    for t in threads:
        t.join(120)
    list(long)
    assert order == ["high", "low"]
    _wait_idle(srv)
    assert srv.engine.free_blocks() == free


# ---- the pieces, without a server ------------------------------------------------------------

def test_numpy_copy_kv_blocks_copies_whole_blocks_of_every_layer():
    rng = np.random.default_rng(7)
    layout = KVLayout(n_layers=3, num_blocks=6, block_size=4, n_kv_heads=2, head_dim_k=8, head_dim_v=6)
    be = NumpyBackend()
    kv = be.alloc_kv(layout)
    kv.k[...] = rng.standard_normal(kv.k.shape)
    kv.v[...] = rng.standard_normal(kv.v.shape)
    k0, v0 = kv.k.copy(), kv.v.copy()
    be.copy_kv_blocks(kv, [(1, 4), (4, 5), (0, 2)])  # in order: block 5 gets block 1's rows
    bs = layout.block_size
    want_k, want_v = k0.copy(), v0.copy()
    for src, dst in [(1, 4), (1, 5), (0, 2)]:
        want_k[:, dst * bs:(dst + 1) * bs] = k0[:, src * bs:(src + 1) * bs]
        want_v[:, dst * bs:(dst + 1) * bs] = v0[:, src * bs:(src + 1) * bs]
    assert np.array_equal(kv.k, want_k) and np.array_equal(kv.v, want_v)


def test_shared_blocks_are_freed_by_their_last_table():
    alloc = BlockAllocator(8, 4)
    parent: list[int] = []
    alloc.ensure(parent, 10)  # 3 blocks
    kids = [alloc.share(parent, 2) for _ in range(3)]
    for kid in kids:
        kid.append(alloc.take())  # each one's copy of the partly filled block
    assert alloc.free_blocks == 8 - 3 - 3
    alloc.release(parent)
    assert alloc.free_blocks == 8 - 2 - 3  # the shared two are still held by the children
    for kid in kids:
        alloc.release(kid)
    assert alloc.free_blocks == 8


def test_engine_fork_shares_full_blocks_and_copies_the_partial_one(tmp_path):
    """At the engine: after the fork's step every sample holds the same KV for the whole prompt
    (shared full blocks; its own copy of the last, with the last prompt token written into it)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from gpu.test_cuda_models import write_tiny_llama
    from orcd_grpc.loader import load_engine
    from orcd_grpc.sampling import SamplingParams

    eng = load_engine(write_tiny_llama(tmp_path / "tiny.gguf", "F32"), backend="cpu", max_sequences=4,
                      max_context=256)
    try:
        bs = eng.allocator.block_size
        prompt = [1] + np.random.default_rng(5).integers(3, 320, bs + 5).tolist()  # hold at bs + 5
        free = eng.free_blocks()
        seqs = [eng.new_sequence(prompt, SamplingParams(temperature=0.0)) for _ in range(3)]
        parent, kids = seqs[0], seqs[1:]
        parent.hold = len(prompt) - 1
        assert not eng.fork(parent, kids)  # nothing computed yet
        assert eng.step([parent]) == {}    # the prefill to the hold samples nothing
        assert eng.fork(parent, kids)
        assert [k.block_table[0] for k in kids] == [parent.block_table[0]] * 2  # the full block, shared
        assert len({k.block_table[1] for k in seqs}) == 3                        # the partial one, copied
        out = eng.step(seqs)
        assert len({out[s.seq_id].token_id for s in seqs}) == 1  # one distribution, greedy
        kv = eng.kv
        slots = [np.asarray([s.block_table[p // bs] * bs + p % bs for p in range(len(prompt))]) for s in seqs]
        for sl in slots[1:]:
            assert np.array_equal(kv.k[:, sl], kv.k[:, slots[0]]) and np.array_equal(kv.v[:, sl], kv.v[:, slots[0]])
        for s in seqs:
            eng.release(s)
        assert eng.free_blocks() == free
    finally:
        eng.close()
