"""A model swap on the CUDA backend (issue #18 C): while streams decode on model A, LoadModel brings
in model B (the same file under another id). A's streams, running and queued, run to their end on
A, stepped by the engine thread beside B's batch (two CUDA runners, each with its own overlap
loop), each to its full length; A is freed after its last request, and B run alone gives A's
greedy tokens. Skipped without a GPU (tests/conftest.py)."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from orcd_grpc.proto import pb, pb_grpc

from .test_cuda_models import write_tiny_llama

pytestmark = pytest.mark.gpu

STREAMS_ON_A = 16  # four rounds of four: A is still busy when B comes in, and its tail runs beside B


def _execute(stub, out=None, max_tokens=0):
    # max_tokens 0: until the context (512) is full
    events = list(stub.Execute(pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 5, 6, 7]),
                                                 sampling=pb.SamplingParams(temperature=0),
                                                 stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True)),
                               timeout=300))
    if out is not None:
        out.append(events)
    return events


def _ids(events):
    return [e.token.token_id for e in events if e.WhichOneof("event") == "token"]


def test_swap_on_cuda_lets_the_old_models_streams_finish(tmp_path):
    from orcd_grpc.server import ServerConfig, start_server

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(tmp_path)], model_path=str(path), model_id="a",
                       backend="cuda", max_sequences=4, max_queue=32, max_context=512, grace_seconds=1)
    worker, port, scheduler = start_server(cfg)
    try:
        assert worker.wait_loaded(120), worker.load_error
        old = scheduler.engine
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            solo = _ids(_execute(stub))
            on_a: list = []
            threads = [threading.Thread(target=_execute, args=(stub, on_a)) for _ in range(STREAMS_ON_A)]
            for t in threads:
                t.start()
            end = time.monotonic() + 60
            while scheduler.stats()["live"] < STREAMS_ON_A and time.monotonic() < end:
                time.sleep(0.005)
            list(stub.LoadModel(pb.LoadModelRequest(path=path.name, model_id="b"), timeout=120))
            assert any(t.is_alive() for t in threads), "A's streams ended before the swap; add more"
            on_b = _execute(stub, max_tokens=50)
            assert on_b[0].started.model_id == "b" and on_b[-1].finished.reason == pb.FINISH_REASON_LENGTH
            for t in threads:
                t.join(300)
            assert len(on_a) == STREAMS_ON_A
            for events in on_a:
                assert events[0].started.model_id == "a"
                fin = events[-1].finished
                assert fin.reason == pb.FINISH_REASON_LENGTH and fin.cancel_reason == pb.CANCEL_REASON_UNSPECIFIED
                # every token up to the full context (batched greedy may differ from solo in a
                # near-tie of this random model, so the tokens themselves are compared solo below)
                assert fin.usage.completion_tokens == len(_ids(events)) == len(solo)
            for _ in range(200):  # A is freed at the engine loop's next turn
                if len(scheduler.retiring) == 0:
                    break
                time.sleep(0.01)
            assert len(scheduler.retiring) == 0 and old.kv is None
            assert _ids(_execute(stub)) == solo  # B, the same weights run alone, agrees with A alone
    finally:
        worker.stop(1)
