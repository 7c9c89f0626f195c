"""ExecuteRequest.coalesce_tokens through a real server on a real port (CPU backend, a tiny random
llama): tokens that are ready together arrive as TokenBatch events, and the stream carries exactly
what one Token event per token carries (ids, indices, texts, logprobs, top logprobs, samples), in
order, with Finished after the last; without the flag no TokenBatch is ever sent."""
from __future__ import annotations

import pathlib
import sys
import threading
import time

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_numerics_status import VOCAB, write_model  # noqa: E402

from orcd_grpc.client import SamplesBuilder  # noqa: E402
from orcd_grpc.proto import pb, pb_grpc  # noqa: E402
from orcd_grpc.server import ServerConfig, start_server  # noqa: E402


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    path = write_model(models / "tiny.gguf", seed=5)
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(models)], backend="cpu", model_path=str(path),
                       max_sequences=4, max_queue=8, grace_seconds=1)
    worker, port, _ = start_server(cfg)
    assert worker.wait_loaded(120), worker.load_error
    # A small receive window (no bandwidth probing to grow it): while the reader sleeps, the worker's
    # sends block after a few messages and the decoded tokens wait in its queue, whatever the speeds.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0),
                                                                   ("grpc.http2.lookahead_bytes", 1024)])
    yield pb_grpc.WorkerStub(channel)
    channel.close()
    worker.stop(1)


def _request(prompt, n_tokens, coalesce, **sampling):
    return pb.ExecuteRequest(tokens=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(**sampling),
                             stopping=pb.StoppingCriteria(max_tokens=n_tokens, ignore_eos=True), top_logprobs=20,
                             coalesce_tokens=coalesce)


def _events(stub, req, pause_s=0.0):
    """All events of the stream; with pause_s, the reader stops after Started so tokens pile up."""
    out = []
    for ev in stub.Execute(req, timeout=120):
        out.append(ev)
        if pause_s and ev.WhichOneof("event") == "started":
            time.sleep(pause_s)
    return out


def _flat(events):
    """(kind, payload) per token as one Token event each would carry it, and the rest in order."""
    out = []
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "token_batch":
            out += [("token", t.SerializeToString(deterministic=True)) for t in ev.token_batch.tokens]
        elif kind == "token":
            out.append(("token", ev.token.SerializeToString(deterministic=True)))
        elif kind == "finished":
            f = ev.finished
            out.append(("finished", (f.sample_index, f.reason, f.usage.completion_tokens)))
        else:
            out.append((kind, None))
    return out


def test_a_slow_reader_gets_batches_with_the_same_tokens(stub):
    prompt = np.random.default_rng().integers(3, VOCAB, 6).tolist()
    plain = _events(stub, _request(prompt, 200, False, temperature=0.0))
    batched = _events(stub, _request(prompt, 200, True, temperature=0.0), pause_s=1.5)
    kinds = [e.WhichOneof("event") for e in batched]
    assert "token_batch" not in [e.WhichOneof("event") for e in plain]
    assert "token_batch" in kinds, kinds  # tokens decoded while the reader slept
    assert all(len(e.token_batch.tokens) >= 2 for e in batched if e.WhichOneof("event") == "token_batch")
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert _flat(batched) == _flat(plain)
    indices = [t.index for e in batched if e.WhichOneof("event") == "token_batch" for t in e.token_batch.tokens]
    assert indices == sorted(indices)
    assert len(batched) < len(plain)


def test_samples_keep_their_order_and_the_client_splits_them(stub):
    """n = 3 sampled streams, seeded: each sample's tokens match a run without coalescing, and the
    Python client's SamplesBuilder gives the same completions from either stream."""
    prompt = np.random.default_rng().integers(3, VOCAB, 6).tolist()
    req = _request(prompt, 60, False, temperature=1.0, seed=1234)
    req.n = 3
    plain = _events(stub, req)
    req.coalesce_tokens = True
    batched = _events(stub, req, pause_s=1.5)
    assert any(e.WhichOneof("event") == "token_batch" for e in batched)

    def per_sample(events):
        got: dict[int, list] = {}
        for kind, payload in _flat(events):
            if kind == "token":
                t = pb.Token.FromString(payload)
                got.setdefault(t.sample_index, []).append(payload)
        return got

    assert per_sample(batched) == per_sample(plain)
    builders = []
    for events in (plain, batched):
        b = SamplesBuilder()
        for ev in events:
            b.add(ev)
        builders.append([(c.text, list(c.token_ids), c.usage.completion_tokens) for c in b.result(3)])
    assert builders[0] == builders[1] and all(n == 60 for _, _, n in builders[0])


def test_a_prompt_reader_gets_every_token_once(stub):
    """With the flag and a reader that does not pause, the stream still carries each token exactly
    once between Started and Finished, whatever mix of Token and TokenBatch events the timing gives
    (that a lone token is a Token event is checked above: every batch holds two or more)."""
    prompt = np.random.default_rng().integers(3, VOCAB, 6).tolist()
    events = _events(stub, _request(prompt, 8, True, temperature=0.0))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert sum(1 if k == "token" else len(e.token_batch.tokens) if k == "token_batch" else 0
               for k, e in zip(kinds, events)) == 8


def test_cancel_mid_batch_ends_the_stream(stub):
    """A coalesced stream that is cancelled (the client goes away) frees the request like any other:
    the worker serves the next request at once."""
    prompt = np.random.default_rng().integers(3, VOCAB, 6).tolist()
    call = stub.Execute(_request(prompt, 10_000, True, temperature=0.0), timeout=120)
    seen = threading.Event()

    def read():
        try:
            for ev in call:
                if ev.WhichOneof("event") in ("token", "token_batch"):
                    seen.set()
        except grpc.RpcError:
            pass

    t = threading.Thread(target=read, daemon=True)
    t.start()
    assert seen.wait(60)
    call.cancel()
    t.join(10)
    assert not t.is_alive()
    done = _events(stub, _request(prompt, 4, True, temperature=0.0))
    assert done[-1].WhichOneof("event") == "finished" and done[-1].finished.usage.completion_tokens == 4
