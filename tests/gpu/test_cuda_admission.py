"""The test step before a swap on the CUDA backend: a model whose logits overflow is refused with
FAILED_PRECONDITION while the served one keeps answering, and its VRAM is given back. Skipped
without a GPU (tests/conftest.py)."""
from __future__ import annotations

import pathlib
import sys

import grpc
import pytest

from orcd_grpc.proto import pb, pb_grpc

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
from bad_models import write_model  # noqa: E402

pytestmark = pytest.mark.gpu


def _execute(stub):
    events = list(stub.Execute(pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 5, 6]),
                                                 sampling=pb.SamplingParams(temperature=0),
                                                 stopping=pb.StoppingCriteria(max_tokens=4, ignore_eos=True)),
                               timeout=60))
    assert events[-1].finished.usage.completion_tokens == 4
    return events[0].started.model_id


def test_cuda_test_step_refuses_non_finite_logits_and_frees_vram(tmp_path):
    from orcd_grpc.server import ServerConfig, start_server

    write_model(tmp_path / "good.gguf", d=256, ff=512, vocab=320)
    write_model(tmp_path / "huge.gguf", d=256, ff=512, vocab=320, fill={"blk.0.ffn_down.weight": 3e38})
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(tmp_path)], model_path=str(tmp_path / "good.gguf"),
                       model_id="good", backend="cuda", max_sequences=4, max_context=64, grace_seconds=1)
    worker, port, scheduler = start_server(cfg)
    try:
        assert worker.wait_loaded(300), worker.load_error
        stub = pb_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert _execute(stub) == "good"
        be = scheduler.engine.backend
        # the backend's own query makes its context current on this (the test's) thread
        free0 = be.gpu_info()["vram_free"]
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.LoadModel(pb.LoadModelRequest(path="huge.gguf"), timeout=300))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            assert "non-finite logits on a test step" in err.value.details()
        assert scheduler.engine.backend is be and _execute(stub) == "good"
        import gc
        gc.collect()
        # the refused engines' weights, KV cache and workspace were freed (allow the driver's slack)
        assert be.gpu_info()["vram_free"] >= free0 - 64 * (1 << 20)
    finally:
        worker.stop(1)
