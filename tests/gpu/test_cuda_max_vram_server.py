"""The real server on the CUDA backend under --max-vram: a model bigger than the limit is refused
with RESOURCE_EXHAUSTED while the loaded one keeps serving (also a stream running during the
failed load). Skipped without a GPU (tests/conftest.py); a few seconds once kernels are cached."""
from __future__ import annotations

import threading

import grpc
import pytest

from orcd_grpc.proto import pb, pb_grpc

from .test_cuda_models import write_tiny_llama

pytestmark = pytest.mark.gpu

MiB = 1 << 20
MAX_VRAM = 128 * MiB  # workspace 64 MiB + the small model (~2 MB of Q8_0 weights, its KV cache)


def _execute(stub, max_tokens=4, **kw):
    return list(stub.Execute(pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 5, 6, 7]),
                                               sampling=pb.SamplingParams(temperature=0),
                                               stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
                                               **kw), timeout=60))


def test_model_over_max_vram_refused_while_loaded_one_serves(tmp_path):
    from orcd_grpc.server import ServerConfig, start_server

    small = write_tiny_llama(tmp_path / "small.gguf", "Q8_0")
    # F32, d=768, 4 layers, vocab 4000: ~160 MB of weights, more than MAX_VRAM on its own.
    big = write_tiny_llama(tmp_path / "big.gguf", "F32", vocab=4000, d=768, n_layers=4, n_heads=8, n_kv=2,
                           d_ff=3072)
    assert big.stat().st_size > MAX_VRAM
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(tmp_path)], model_path=str(small),
                       model_id="small", backend="cuda", max_vram=MAX_VRAM, max_sequences=4, max_context=512,
                       grace_seconds=1)
    worker, port, scheduler = start_server(cfg)
    try:
        assert worker.wait_loaded(120), f"the small model did not load under max_vram: {worker.load_error}"
        assert scheduler.model_info.backend == "cuda"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            before = _execute(stub)
            assert before[-1].finished.reason == pb.FINISH_REASON_LENGTH

            # A stream that runs while the big model is tried: a failed load must not cancel it.
            long_events = []
            runner = threading.Thread(target=lambda: long_events.extend(_execute(stub, max_tokens=200)))
            runner.start()
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.LoadModel(pb.LoadModelRequest(path=big.name, model_id="big"), timeout=60))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert "GiB" in refused.value.details() or "MiB" in refused.value.details()
            runner.join(60)
            assert long_events and long_events[-1].finished.reason == pb.FINISH_REASON_LENGTH
            assert long_events[-1].finished.usage.completion_tokens == 200

            models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            assert [m.model_id for m in models] == ["small"]
            after = _execute(stub)
            assert after[-1].finished.reason == pb.FINISH_REASON_LENGTH
            # Greedy: the model that kept serving is the same one, bit for bit.
            assert [e.token.token_id for e in after[1:-1]] == [e.token.token_id for e in before[1:-1]]
            hw = stub.HardwareInfo(pb.HardwareInfoRequest(), timeout=30)
            assert hw.gpu.vram_limit_bytes == MAX_VRAM and 0 < hw.gpu.vram_used_by_worker_bytes <= MAX_VRAM
    finally:
        worker.stop(1)
