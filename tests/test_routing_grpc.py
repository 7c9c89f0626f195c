"""Probe and WatchEvents (issue #18 C) through a real server on a real port (SmolLM2-135M, CPU
backend) and the real stubs. The reference for a prompt's cached tokens is what Execute itself
reports (Usage.cached_prompt_tokens); the reference for block hashes is the proto's formula,
computed here from its text (hashlib on the packed ids), not by the worker's code.
"""
from __future__ import annotations

import hashlib
import struct
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server
from orcd_grpc.tokenizer import Tokenizer
from procs import wait_for  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(smollm2_path):
    # a small KV cache (2 sequences of 128 tokens) so a few prompts evict blocks
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(smollm2_path.parent)], backend="cpu",
                       max_context=128, max_sequences=2, max_queue=8, grace_seconds=1)
    worker, port, scheduler = start_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.WorkerStub(channel)
    list(stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name), timeout=300))
    yield SimpleNamespace(worker=worker, scheduler=scheduler, channel=channel, stub=stub,
                          tok=Tokenizer.from_gguf_file(smollm2_path))
    channel.close()
    worker.stop(1)


def reference_hashes(ids, block_size):
    """The proto's BlocksStored formula, from its text."""
    out, h = [], 0
    for i in range(len(ids) // block_size):
        block = ids[i * block_size:(i + 1) * block_size]
        data = struct.pack("<Q", h) + struct.pack(f"<{block_size}I", *block)
        h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        out.append(h)
    return out


def execute(stub, ids, max_tokens=2):
    events = list(stub.Execute(pb.ExecuteRequest(tokens=pb.TokenIds(ids=ids),
                                                 sampling=pb.SamplingParams(temperature=0),
                                                 stopping=pb.StoppingCriteria(max_tokens=max_tokens)), timeout=120))
    return events[-1].finished


def prompt(srv, seed, n):
    """n token ids of ordinary text (distinct per seed)."""
    text = " ".join(f"word{seed}-{i}" for i in range(n))
    return srv.tok.encode(text, add_bos=False)[:n]


# ---- Probe ----------------------------------------------------------------------------------------------


def test_probe_reports_what_execute_then_reuses(srv):
    ids = prompt(srv, 1, 53)
    p0 = srv.stub.Probe(pb.ProbeRequest(tokens=pb.TokenIds(ids=ids)), timeout=10)
    assert p0.prompt_tokens == 53 and p0.cached_prompt_tokens == 0 and p0.model_id == "smollm2-135m-instruct"
    assert p0.block_size > 0 and p0.total_kv_blocks >= p0.free_kv_blocks > 0 and p0.max_sequences == 2
    assert p0.accepting and p0.queue_depth == 0 and p0.running == 0
    first = execute(srv.stub, ids)
    assert first.usage.cached_prompt_tokens == 0
    p1 = srv.stub.Probe(pb.ProbeRequest(tokens=pb.TokenIds(ids=ids)), timeout=10)
    bs = p1.block_size
    assert p1.cached_prompt_tokens == (53 - 1) // bs * bs > 0
    assert p1.recent_step_ms > 0
    # what Execute reports when it runs it now is what Probe said
    assert execute(srv.stub, ids).usage.cached_prompt_tokens == p1.cached_prompt_tokens
    # a prompt sharing only the first block
    other = ids[:bs] + prompt(srv, 2, 40)
    assert srv.stub.Probe(pb.ProbeRequest(tokens=pb.TokenIds(ids=other)), timeout=10).cached_prompt_tokens == bs


def test_probe_touches_nothing(srv):
    ids = prompt(srv, 3, 40)
    execute(srv.stub, ids)
    alloc = srv.scheduler.engine.allocator
    before = (list(alloc._evictable), alloc.free_blocks, alloc.hit_tokens, list(alloc._ref))
    for _ in range(5):
        assert srv.stub.Probe(pb.ProbeRequest(tokens=pb.TokenIds(ids=ids)), timeout=10).cached_prompt_tokens > 0
    assert (list(alloc._evictable), alloc.free_blocks, alloc.hit_tokens, list(alloc._ref)) == before


def test_probe_text_and_chat_like_execute(srv):
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")])
    p = srv.stub.Probe(pb.ProbeRequest(chat=msgs), timeout=10)
    started = next(iter(srv.stub.Execute(pb.ExecuteRequest(chat=msgs, stopping=pb.StoppingCriteria(max_tokens=1)),
                                         timeout=60))).started
    assert p.prompt_tokens == started.prompt_tokens > 10
    t = srv.stub.Probe(pb.ProbeRequest(text="The capital of France is"), timeout=10)
    assert t.prompt_tokens == len(srv.tok.encode("The capital of France is"))


@pytest.mark.parametrize("req,code,field", [
    (pb.ProbeRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (pb.ProbeRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (pb.ProbeRequest(tokens=pb.TokenIds(ids=[1, 10_000_000])), grpc.StatusCode.INVALID_ARGUMENT, "input.tokens"),
    (pb.ProbeRequest(text="x", model_id="nope"), grpc.StatusCode.NOT_FOUND, "model_id"),
    (pb.ProbeRequest(tokens=pb.TokenIds(ids=[1] * 128)), grpc.StatusCode.OUT_OF_RANGE, "input"),
    (pb.ProbeRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="x")])),
     grpc.StatusCode.INVALID_ARGUMENT, "input.chat.messages[0].role"),
])
def test_probe_bad_input(srv, req, code, field):
    with pytest.raises(grpc.RpcError) as ei:
        srv.stub.Probe(req, timeout=10)
    assert ei.value.code() == code and ei.value.details().startswith(field + ":"), ei.value.details()


def test_probe_sees_load(srv):
    call = srv.stub.Execute(pb.ExecuteRequest(text="Once upon a time", sampling=pb.SamplingParams(temperature=0),
                                              stopping=pb.StoppingCriteria(max_tokens=60, ignore_eos=True)),
                            timeout=120)
    next(call)
    next(call)
    try:
        p = srv.stub.Probe(pb.ProbeRequest(text="hello"), timeout=10)
        assert p.running == 1 and p.free_kv_blocks < p.total_kv_blocks
    finally:
        call.cancel()


# ---- WatchEvents ------------------------------------------------------------------------------------------


class Watcher:
    def __init__(self, stub, **kw):
        self.call = stub.WatchEvents(pb.WatchEventsRequest(**kw), timeout=120)
        self.events: list = []
        self.t = threading.Thread(target=self._pump, daemon=True)
        self.t.start()

    def _pump(self):
        try:
            for ev in self.call:
                self.events.append(ev)
        except grpc.RpcError:
            pass

    def of(self, kind):
        return [getattr(e, kind) for e in list(self.events) if e.WhichOneof("event") == kind]

    def close(self):
        self.call.cancel()
        self.t.join(10)


def test_watch_events_mirror_the_cache(srv):
    w = Watcher(srv.stub, load_interval_ms=100, prefix_cache=True, initial_snapshot=True)
    try:
        assert wait_for(lambda: w.of("load"))
        [snap] = w.of("snapshot")
        bs = snap.block_size
        mirror = {b.block_hash for b in snap.blocks}
        assert mirror == {h for h, _ in srv.scheduler.engine.allocator.cached_blocks()}
        total = srv.scheduler.engine.total_blocks()
        for seed in range(10, 12 + total // 3):  # more prompts than the cache holds: some are evicted
            ids = prompt(srv, seed, 3 * bs + 5)
            execute(srv.stub, ids, max_tokens=1)
            want = set(reference_hashes(ids, bs))
            assert len(want) == 3
            assert wait_for(lambda: want <= {h for e in w.of("blocks_stored") for h in e.block_hashes})
        assert w.of("blocks_evicted"), "the small cache evicted blocks"
        time.sleep(0.3)
        for ev in list(w.events):
            kind = ev.WhichOneof("event")
            if kind == "blocks_stored":
                mirror.update(ev.blocks_stored.block_hashes)
            elif kind == "blocks_evicted":
                mirror.difference_update(ev.blocks_evicted.block_hashes)
            assert ev.dropped == 0
        # the mirror built from the events is the worker's cache
        assert mirror == {h for h, _ in srv.scheduler.engine.allocator.cached_blocks()}
        stored = w.of("blocks_stored")
        assert all(e.model_id == "smollm2-135m-instruct" and e.block_size == bs for e in stored)
        loads = w.of("load")
        assert len(loads) >= 3 and all(ld.total_kv_blocks == total and ld.accepting for ld in loads)
    finally:
        w.close()


def test_watch_load_only_gets_no_cache_events(srv):
    w = Watcher(srv.stub, load_interval_ms=100)
    try:
        execute(srv.stub, prompt(srv, 30, 40), max_tokens=1)
        assert wait_for(lambda: len(w.of("load")) >= 3)
        assert {e.WhichOneof("event") for e in w.events} == {"load"}
        stamps = [e.unix_ms for e in w.events]
        assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 150
    finally:
        w.close()


@pytest.mark.parametrize("ms", [1, 99, 60_001])
def test_watch_interval_bounds(srv, ms):
    with pytest.raises(grpc.RpcError) as ei:
        next(srv.stub.WatchEvents(pb.WatchEventsRequest(load_interval_ms=ms), timeout=10))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith("load_interval_ms:")


def test_watch_subscribers_capped_and_freed(srv):
    hub = srv.worker.events
    # an earlier test's closed watcher may still hold its place until its stream ends on the server
    assert wait_for(lambda: hub.subscribers == 0)
    cap = hub.max_subscribers
    hub.max_subscribers = 2
    ws = [Watcher(srv.stub, load_interval_ms=100) for _ in range(2)]
    try:
        assert wait_for(lambda: hub.subscribers == 2)
        with pytest.raises(grpc.RpcError) as ei:
            next(srv.stub.WatchEvents(pb.WatchEventsRequest(), timeout=10))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ws.pop().close()
        assert wait_for(lambda: hub.subscribers == 1)  # a closed stream gives its place back
        ws.append(Watcher(srv.stub, load_interval_ms=100))
        assert wait_for(lambda: len(ws[-1].of("load")) >= 1)
    finally:
        for w in ws:
            w.close()
        hub.max_subscribers = cap
    assert wait_for(lambda: hub.subscribers == 0)


