"""A model swap on the CUDA backend (issue #18 C): while a stream decodes on model A, LoadModel
brings in model B (the same file under another id); A's stream runs to its end on A, stepped by
the engine thread beside B's batch (two CUDA runners, each with its own overlap loop), and its
greedy tokens equal those of the same request run alone. A is freed after its last request.
Skipped without a GPU (tests/conftest.py)."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from orcd_grpc.proto import pb, pb_grpc

from .test_cuda_models import write_tiny_llama

pytestmark = pytest.mark.gpu


def _execute(stub, max_tokens, out=None):
    events = list(stub.Execute(pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 5, 6, 7]),
                                                 sampling=pb.SamplingParams(temperature=0),
                                                 stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True)),
                               timeout=120))
    if out is not None:
        out.extend(events)
    return events


def test_swap_on_cuda_lets_the_old_models_stream_finish(tmp_path):
    from orcd_grpc.server import ServerConfig, start_server

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(tmp_path)], model_path=str(path), model_id="a",
                       backend="cuda", max_sequences=4, max_context=512, grace_seconds=1)
    worker, port, scheduler = start_server(cfg)
    try:
        assert worker.wait_loaded(120), worker.load_error
        old = scheduler.engine
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            solo = [e.token.token_id for e in _execute(stub, 500) if e.WhichOneof("event") == "token"]
            events: list = []
            t = threading.Thread(target=_execute, args=(stub, 500, events))
            t.start()
            list(stub.LoadModel(pb.LoadModelRequest(path=path.name, model_id="b"), timeout=120))
            on_b = _execute(stub, 50)
            assert on_b[0].started.model_id == "b" and on_b[-1].finished.reason == pb.FINISH_REASON_LENGTH
            t.join(120)
            assert events[0].started.model_id == "a"
            fin = events[-1].finished
            assert fin.reason == pb.FINISH_REASON_LENGTH and fin.cancel_reason == pb.CANCEL_REASON_UNSPECIFIED
            assert [e.token.token_id for e in events if e.WhichOneof("event") == "token"] == solo
            for _ in range(200):  # A is freed at the engine loop's next turn
                if len(scheduler.retiring) == 0:
                    break
                time.sleep(0.01)
            assert len(scheduler.retiring) == 0 and old.kv is None
    finally:
        worker.stop(1)
