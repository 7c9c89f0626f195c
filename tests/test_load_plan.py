"""LoadModel dry_run through a real server with the real SmolLM2 and Gemma 3 files (CPU backend):
the plan's bytes are the ones the load then reports, and a plan that does not fit loads nothing."""
from __future__ import annotations

import ctypes
import gc
import os

import grpc
import pytest

from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server

MiB = 1 << 20


def _rss() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Worker:
    """A real server over model_dir (the CPU backend unless cfg says otherwise) and its stub."""

    def __init__(self, model_dir, **cfg):
        config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "model_dirs": [str(model_dir)], "backend": "cpu",
                                 "max_context": 256, "max_sequences": 8, "max_queue": 8, "grace_seconds": 1, **cfg})
        self.worker, port, self.scheduler = start_server(config)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.WorkerStub(self.channel)

    def plan(self, name, **kw) -> pb.LoadPlan:
        events = list(self.stub.LoadModel(pb.LoadModelRequest(path=name, dry_run=True, **kw), timeout=120))
        assert len(events) == 1 and events[0].WhichOneof("event") == "plan", events
        return events[0].plan

    def load(self, name, **kw) -> pb.ModelDescription:
        return list(self.stub.LoadModel(pb.LoadModelRequest(path=name, **kw), timeout=600))[-1].model

    def listed(self) -> list[str]:
        return [m.model_id for m in self.stub.ListModels(pb.ListModelsRequest(), timeout=10).models]

    def used(self) -> int:
        """VRAM the worker says it holds (the CUDA backend; tests/gpu/test_cuda_load_plan.py)."""
        return self.stub.HardwareInfo(pb.HardwareInfoRequest(), timeout=30).gpu.vram_used_by_worker_bytes

    def free(self) -> int:
        return self.stub.HardwareInfo(pb.HardwareInfoRequest(), timeout=30).gpu.vram_free_bytes

    def close(self):
        self.channel.close()
        self.worker.stop(0.5)


def _same_as_loaded(plan: pb.LoadPlan, model: pb.ModelDescription) -> None:
    # Exact: the plan runs the load's own sizing; with --max-context 256 and 8 sequences the KV
    # cache is capped by max_sequences * context, not by the memory available, so nothing moves.
    assert plan.fits and not plan.reason
    assert (plan.weights_bytes, plan.kv_cache_bytes, plan.workspace_bytes) == \
        (model.weights_bytes, model.kv_cache_bytes, model.workspace_bytes)
    assert (plan.context_length, plan.max_sequences, plan.backend) == \
        (model.context_length, model.max_sequences, model.backend)
    assert plan.total_bytes == plan.weights_bytes + plan.kv_cache_bytes + plan.step_bytes
    assert plan.has_limit and plan.available_bytes >= plan.total_bytes


def test_plan_predicts_what_the_load_reports(smollm2_path, gemma3_path):
    assert smollm2_path.parent == gemma3_path.parent
    w = Worker(smollm2_path.parent)
    try:
        import orcd_grpc.backends.cpu_backend  # noqa: F401  (numba and LLVM: libraries, not weights)

        before = _rss()
        plan = w.plan(smollm2_path.name)
        assert w.listed() == []  # planned, not loaded
        assert _rss() - before < smollm2_path.stat().st_size // 2
        # the CPU backend holds the file's tensor bytes (less the header and tokenizer metadata)
        assert 0.9 * smollm2_path.stat().st_size < plan.weights_bytes <= smollm2_path.stat().st_size
        _same_as_loaded(plan, w.load(smollm2_path.name))

        # beside the served model: the memory it holds is not the newcomer's
        plan = w.plan(gemma3_path.name, context_length=128)
        assert w.listed() == [smollm2_path.stem]
        _same_as_loaded(plan, w.load(gemma3_path.name, context_length=128))
    finally:
        w.close()


def test_plan_over_max_ram_does_not_fit_and_loads_nothing(smollm2_path):
    w = Worker(smollm2_path.parent, max_ram=64 * MiB)
    try:
        before = _rss()
        plan = w.plan(smollm2_path.name)
        assert not plan.fits
        assert "--max-ram" in plan.reason and "GiB allowed" in plan.reason, plan.reason
        assert plan.has_limit and plan.available_bytes == 64 * MiB
        assert plan.total_bytes > plan.available_bytes and plan.weights_bytes > 0 and plan.kv_cache_bytes > 0
        assert w.listed() == []
        assert _rss() - before < smollm2_path.stat().st_size // 2  # the header, not the weights
        # the load itself is refused with the reason the plan gave
        with pytest.raises(grpc.RpcError) as err:
            w.load(smollm2_path.name)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert plan.reason in err.value.details()
        assert w.listed() == []
    finally:
        w.close()


def test_plan_refuses_what_the_load_refuses(smollm2_path):
    w = Worker(smollm2_path.parent)
    try:
        with pytest.raises(grpc.RpcError) as err:
            w.plan(smollm2_path.name, context_length=100_000)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "context_length" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            w.plan("../../etc/passwd")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert w.listed() == []
    finally:
        w.close()


def test_kv_cache_type_per_load(smollm2_path):
    """LoadModelRequest.kv_cache_type: the plan and the load agree on the type and its bytes (Q8_0:
    34 bytes per 32 values, 17/32 of F16's for the same blocks); the Q8_0 model serves; an
    unknown value and a type the backend does not store are INVALID_ARGUMENT naming the field,
    and leave the served model in place."""
    w = Worker(smollm2_path.parent)
    try:
        f16 = w.plan(smollm2_path.name)
        q8 = w.plan(smollm2_path.name, kv_cache_type=pb.KV_CACHE_TYPE_Q8_0)
        assert (f16.kv_cache_type, q8.kv_cache_type) == (pb.KV_CACHE_TYPE_F16, pb.KV_CACHE_TYPE_Q8_0)
        assert q8.kv_cache_bytes * 32 == f16.kv_cache_bytes * 17 and q8.weights_bytes == f16.weights_bytes
        model = w.load(smollm2_path.name, kv_cache_type=pb.KV_CACHE_TYPE_Q8_0)
        assert model.kv_cache_type == pb.KV_CACHE_TYPE_Q8_0 and model.kv_cache_bytes == q8.kv_cache_bytes
        listed = w.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert [m.kv_cache_type for m in listed] == [pb.KV_CACHE_TYPE_Q8_0]
        events = list(w.stub.Execute(pb.ExecuteRequest(
            text="The capital of France is", sampling=pb.SamplingParams(temperature=0.0),
            stopping=pb.StoppingCriteria(max_tokens=8, ignore_eos=True)), timeout=60))
        tokens = [e.token for e in events if e.WhichOneof("event") == "token"]
        assert len(tokens) == 8 and "".join(t.text for t in tokens).strip(), tokens
        assert events[-1].finished.reason == pb.FINISH_REASON_LENGTH
        for kw, words in (({"kv_cache_type": 7}, "unknown KV cache type 7"),):
            with pytest.raises(grpc.RpcError) as err:
                w.load(smollm2_path.name, **kw)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "kv_cache_type" in err.value.details() and words in err.value.details()
        assert [m.kv_cache_type for m in w.stub.ListModels(pb.ListModelsRequest(), timeout=10).models] == \
            [pb.KV_CACHE_TYPE_Q8_0]
    finally:
        w.close()
    w = Worker(smollm2_path.parent, backend="numpy")
    try:
        for call in (w.plan, w.load):
            with pytest.raises(grpc.RpcError) as err:
                call(smollm2_path.name, kv_cache_type=pb.KV_CACHE_TYPE_Q8_0)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "kv_cache_type" in err.value.details() and "the numpy backend stores (it stores f32)" in err.value.details()
        assert w.listed() == []
    finally:
        w.close()


def _growing(limit: int):
    """The real NumPy backend posing as a device one for load sizing: a reserved step workspace
    that a model's sequences may need grown (the CUDA backend's workspace_for / fit_workspace),
    and a fixed budget beside it."""
    from orcd_grpc.backends.numpy_backend import NumpyBackend

    class Growing(NumpyBackend):
        host_memory = False

        def __init__(self):
            super().__init__(max_ram=limit)
            self.workspace_bytes, self.fits = MiB, []

        def workspace_for(self, vocab_size, max_sequences):
            return MiB + 8 * vocab_size * max_sequences

        def fit_workspace(self, nbytes):
            self.fits.append(nbytes)
            self.workspace_bytes = nbytes

        def step_bytes(self, *a, **k):
            return 0

    return Growing()


def test_workspace_growth_is_planned_without_allocating_and_made_after_admission(tmp_path):
    """loader._size reports the workspace a model's sequences need and takes its growth out of
    what weights and KV may use, allocating nothing (a dry run); the load grows the workspace only
    once its admission check passed, and a growth that leaves no room refuses the load."""
    import sys

    from orcd_grpc.admission import check_fits
    from orcd_grpc.errors import ResourceExhausted
    from orcd_grpc.loader import load_engine, plan_load

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))
    from test_cuda_models import write_tiny_llama

    path = write_tiny_llama(tmp_path / "t.gguf", "Q8_0", vocab=4000)
    seqs = 64
    want = MiB + 8 * 4000 * seqs
    be = _growing(256 * MiB)
    size = plan_load(path, backend=be, max_sequences=seqs, max_context=256)
    assert size.workspace_bytes == want and be.fits == [] and be.workspace_bytes == MiB
    assert size.available == 256 * MiB - (want - MiB)
    eng = load_engine(path, backend=be, max_sequences=seqs, max_context=256)
    try:
        assert be.fits == [want] and eng.info.workspace_bytes == want
    finally:
        eng.close()

    small = _growing(want - MiB + 64 * 1024)  # the growth leaves 64 KiB: no weights fit
    size = plan_load(path, backend=small, max_sequences=seqs, max_context=256)
    assert size.available == 64 * 1024 and small.fits == []
    with pytest.raises(ResourceExhausted):
        check_fits(size.needed, size.available, size.memory_name)
    with pytest.raises(ResourceExhausted):
        load_engine(path, backend=small, max_sequences=seqs, max_context=256)
    assert small.fits == []  # refused before anything grew
