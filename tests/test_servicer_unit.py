"""Servicer unit tests through grpcio-testing, with the scheduler driving a scripted fake engine."""
from __future__ import annotations

import os
import time

from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc_testing
import pytest

from orcd_grpc.errors import ResourceExhausted
from orcd_grpc.metrics import Metrics
from orcd_grpc import wire
from orcd_grpc.grpc_loop import LoopServer
from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.scheduler import Scheduler
from orcd_grpc.servicer import WorkerServicer
from test_scheduler import EOS, VOCAB, FakeDecoder, FakeEngine

SERVICE = pb.DESCRIPTOR.services_by_name["Worker"]


def method(name):
    return SERVICE.methods_by_name[name]


class Harness:
    def __init__(self, tmp_path, engine=None, *, max_context=0, **sched_kw):
        self.engines = [engine] if engine is not None else []
        self.loaded_paths = []
        sched_kw.setdefault("decoder_factory", FakeDecoder)
        self.metrics = Metrics()
        self.scheduler = Scheduler(loader=self._load, metrics=self.metrics, **sched_kw)
        if engine is not None:
            self.scheduler.load("fake")
        self.model_dir = tmp_path / "models"
        self.model_dir.mkdir()
        self.servicer = WorkerServicer(self.scheduler, model_dirs=[str(self.model_dir)], backend="cpu",
                                       max_context=max_context, metrics=self.metrics)
        self.server = grpc_testing.server_from_dictionary({SERVICE: self.servicer}, grpc_testing.strict_real_time())
        # Execute is a coroutine on the server's event loop, which grpcio-testing cannot run: its
        # calls go to a real grpc.aio server on a local port.
        self.pool = ThreadPoolExecutor(8)
        self.live = LoopServer(self.pool)
        wire.add_worker_servicer(self.servicer, self.live)
        port = self.live.add_insecure_port("127.0.0.1:0")
        self.live.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.WorkerStub(self.channel)

    def close(self):
        self.channel.close()
        self.live.stop(0).wait()
        self.pool.shutdown(wait=False)
        self.scheduler.shutdown(0)

    def _load(self, path, *, progress=None, model_id=None, context_length=0, max_context=0, **_):
        self.loaded_paths.append((str(path), model_id, context_length, max_context))
        if progress:
            progress("opening", 0, 0)
            progress("loading", 50, 100)
            progress("loading", 100, 100)
        eng = self.engines.pop(0) if self.engines else FakeEngine(model_id=model_id or "loaded")
        return eng

    def stream(self, request, metadata=(), timeout=None) -> "LiveStream":
        return LiveStream(self.stub.Execute(request, metadata=metadata, timeout=timeout))

    def execute(self, request, metadata=(), timeout=None):
        return collect(self.stream(request, metadata, timeout))

    def unary(self, name, request):
        """(response, trailing_metadata, code, details) of a call over the socket (the caller is
        the same peer as h.stream's: Cancel reaches only its own requests)."""
        try:
            response, call = getattr(self.stub, name).with_call(request)
            return response, call.trailing_metadata(), call.code(), call.details()
        except grpc.RpcError as err:
            return None, err.trailing_metadata(), err.code(), err.details()

    def load(self, request):
        rpc = self.server.invoke_unary_stream(method("LoadModel"), (), request, None)
        return collect(rpc)


class LiveStream:
    """An Execute call over the socket, read the way grpcio-testing's RPCs are."""

    def __init__(self, call):
        self.call = call

    def take_response(self):
        try:
            return next(self.call)
        except (StopIteration, grpc.RpcError):
            raise ValueError("the stream has ended") from None

    def cancel(self):
        self.call.cancel()

    def termination(self):
        return self.call.trailing_metadata(), self.call.code(), self.call.details()


def collect(rpc):
    responses = []
    while True:
        try:
            responses.append(rpc.take_response())
        except ValueError:
            break
    trailing, code, details = rpc.termination()
    return responses, trailing, code, details


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(engine="default", **kw):
        h = Harness(tmp_path, FakeEngine() if engine == "default" else engine, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def text_req(text="hi", **kw):
    kw.setdefault("stopping", pb.StoppingCriteria(max_tokens=5))
    return pb.ExecuteRequest(text=text, **kw)


INVALID = [
    (pb.ExecuteRequest(), "input"),
    (pb.ExecuteRequest(text=""), "input"),
    (pb.ExecuteRequest(tokens=pb.TokenIds(ids=[])), "input"),
    (pb.ExecuteRequest(chat=pb.ChatMessages()), "input"),
    (pb.ExecuteRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="", content="x")])),
     "input.chat.messages[0].role"),
    (text_req(sampling=pb.SamplingParams(temperature=-0.1)), "sampling.temperature"),
    (text_req(sampling=pb.SamplingParams(temperature=101)), "sampling.temperature"),
    (text_req(sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p"),
    (text_req(sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (text_req(sampling=pb.SamplingParams(top_p=float("nan"))), "sampling.top_p"),
    (text_req(sampling=pb.SamplingParams(min_p=1.5)), "sampling.min_p"),
    (text_req(sampling=pb.SamplingParams(repetition_penalty=0.0)), "sampling.repetition_penalty"),
    (text_req(sampling=pb.SamplingParams(presence_penalty=2.5)), "sampling.presence_penalty"),
    (text_req(sampling=pb.SamplingParams(frequency_penalty=-3)), "sampling.frequency_penalty"),
    (text_req(sampling=pb.SamplingParams(top_k=VOCAB + 1)), "sampling.top_k"),
    (text_req(top_logprobs=21), "top_logprobs"),
    (text_req(stopping=pb.StoppingCriteria(stop=["x"] * 17)), "stopping.stop"),
    (text_req(stopping=pb.StoppingCriteria(stop=["ok", "é" * 129])), "stopping.stop[1]"),
    (text_req(stopping=pb.StoppingCriteria(stop=[""])), "stopping.stop[0]"),
    (text_req(stopping=pb.StoppingCriteria(stop_token_ids=list(range(65)))), "stopping.stop_token_ids"),
    (text_req(stopping=pb.StoppingCriteria(stop_token_ids=[5, VOCAB])), "stopping.stop_token_ids"),
    (pb.ExecuteRequest(tokens=pb.TokenIds(ids=[3, VOCAB + 7])), "input.tokens"),
    (text_req(request_id="x" * 129), "request_id"),
    (text_req(request_id="bad\nid"), "request_id"),
]


@pytest.mark.parametrize("request_msg,field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_argument_names_the_field(harness, request_msg, field):
    h = harness()
    responses, _, code, details = h.execute(request_msg)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(field + ":"), details
    assert responses == []
    assert h.scheduler.stats()["live"] == 0


def test_unknown_model_is_not_found(harness):
    _, _, code, details = harness().execute(text_req(model_id="other"))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("model_id:")


def test_prompt_too_long_is_out_of_range(harness):
    _, _, code, details = harness().execute(text_req("x" * 80))  # fake context is 64
    assert code == grpc.StatusCode.OUT_OF_RANGE and details.startswith("input:") and "64" in details


def test_no_model_is_failed_precondition(harness):
    _, _, code, details = harness(engine=None).execute(text_req())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no model" in details


def test_chat_without_template_is_failed_precondition(harness):
    eng = FakeEngine()
    eng.info.has_chat_template = False
    req = pb.ExecuteRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]))
    _, _, code, details = harness(eng).execute(req)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("input.chat:")


def test_event_order_and_contents(harness):
    h = harness()
    responses, _, code, _ = h.execute(text_req("hi", request_id="r-1", top_logprobs=2),
                                      metadata=(("x-correlation-id", "corr-42"),))
    assert code == grpc.StatusCode.OK
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds == ["started"] + ["token"] * 5 + ["finished"]
    st = responses[0].started
    assert (st.request_id, st.model_id, st.prompt_tokens, st.correlation_id) == ("r-1", "fake", 3, "corr-42")
    toks = [r.token for r in responses[1:-1]]
    assert [t.index for t in toks] == list(range(5))
    assert "".join(t.text for t in toks) == "hello"
    assert [(a.token_id, a.text) for a in toks[0].top_logprobs] == [(ord("h") + 2, "h"), (EOS, "</s>")]
    fin = responses[-1].finished
    assert fin.reason == pb.FINISH_REASON_LENGTH
    assert (fin.usage.prompt_tokens, fin.usage.completion_tokens) == (3, 5)
    assert fin.timings.total_ms >= fin.timings.time_to_first_token_ms > 0


def test_server_made_request_id_is_a_uuid(harness):
    responses, *_ = harness().execute(text_req())
    rid = responses[0].started.request_id
    assert len(rid) == 36 and rid.count("-") == 4
    assert responses[0].started.correlation_id  # made by the server when none was sent


def test_duplicate_running_request_id_is_already_exists(harness):
    h = harness(FakeEngine(step_delay=0.02))
    first = h.stream(text_req(
        request_id="dup", stopping=pb.StoppingCriteria(max_tokens=50)))
    assert first.take_response().WhichOneof("event") == "started"
    _, _, code, details = h.execute(text_req(request_id="dup"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and details.startswith("request_id:")
    first.cancel()


def test_queue_full_is_resource_exhausted_with_retry_after(harness):
    h = harness(FakeEngine(step_delay=0.05, max_sequences=1), max_queue=0, max_sequences=1)
    _, _, code, details = h.execute(text_req())
    # grpcio-testing drops trailing metadata on abort; the retry-after-ms key is checked over
    # the wire in the integration suite.
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details


def test_cancel_rpc(harness):
    eng = FakeEngine(step_delay=0.02)
    h = harness(eng)
    free = eng.free_blocks()
    rpc = h.stream(text_req(
        request_id="job", stopping=pb.StoppingCriteria(max_tokens=0, ignore_eos=True)))
    rpc.take_response()
    rpc.take_response()  # a token: it is running
    resp, _, code, _ = h.unary("Cancel", pb.CancelRequest(request_id="job"))
    assert code == grpc.StatusCode.OK and resp.cancelled
    responses, _, code, _ = collect(rpc)
    assert code == grpc.StatusCode.OK
    assert responses[-1].finished.reason == pb.FINISH_REASON_CANCELLED
    assert eng.free_blocks() == free
    _, _, code, details = h.unary("Cancel", pb.CancelRequest(request_id="job"))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("request_id:")
    _, _, code, details = h.unary("Cancel", pb.CancelRequest(request_id=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_id:")


def test_client_cancel_releases_kv(harness):
    eng = FakeEngine(step_delay=0.02)
    h = harness(eng)
    free = eng.free_blocks()
    rpc = h.stream(text_req(
        stopping=pb.StoppingCriteria(max_tokens=0, ignore_eos=True)))
    rpc.take_response()
    rpc.take_response()
    rpc.cancel()
    end = time.monotonic() + 5
    while h.scheduler.stats()["live"] and time.monotonic() < end:
        time.sleep(0.01)
    assert h.scheduler.stats()["live"] == 0
    assert eng.free_blocks() == free


def test_deadline_cancels(harness):
    eng = FakeEngine(step_delay=0.02)
    h = harness(eng)
    free = eng.free_blocks()
    h.execute(text_req(stopping=pb.StoppingCriteria(max_tokens=0, ignore_eos=True)), timeout=0.2)
    end = time.monotonic() + 5
    while h.scheduler.stats()["live"] and time.monotonic() < end:
        time.sleep(0.01)
    assert h.scheduler.stats()["live"] == 0 and eng.free_blocks() == free


def test_engine_failure_is_internal_after_started(harness):
    eng = FakeEngine(step_delay=0.01)
    h = harness(eng)
    rpc = h.stream(text_req(
        stopping=pb.StoppingCriteria(max_tokens=0, ignore_eos=True)))
    rpc.take_response()
    rpc.take_response()
    eng.fail_next = RuntimeError("matmul kernel launch failed")
    _, _, code, details = collect(rpc)
    assert code == grpc.StatusCode.INTERNAL and "matmul" in details
    responses, _, code, _ = h.execute(text_req())  # still serving
    assert code == grpc.StatusCode.OK and responses[-1].finished.usage.completion_tokens == 5


def test_load_model_paths(harness, tmp_path):
    h = harness(engine=None)
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    (h.model_dir / "sub").mkdir()
    (h.model_dir / "link.gguf").symlink_to(outside)
    cases = [
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        (str(outside), grpc.StatusCode.PERMISSION_DENIED),
        ("../outside.gguf", grpc.StatusCode.PERMISSION_DENIED),
        ("link.gguf", grpc.StatusCode.PERMISSION_DENIED),
        ("sub", grpc.StatusCode.INVALID_ARGUMENT),
        ("missing.gguf", grpc.StatusCode.NOT_FOUND),
    ]
    for path, want in cases:
        _, _, code, details = h.load(pb.LoadModelRequest(path=path))
        assert code == want, (path, details)
        assert details.startswith("path:"), details
    assert h.loaded_paths == []
    _, _, code, details = h.load(pb.LoadModelRequest(path=str(h.model_dir / "sub"), model_id="x" * 129))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_load_model_streams_progress_then_model(harness):
    h = harness(engine=None, max_context=4096)
    (h.model_dir / "tiny.gguf").write_bytes(b"GGUF")
    responses, _, code, details = h.load(pb.LoadModelRequest(path="tiny.gguf"))
    assert code == grpc.StatusCode.OK, details
    stages = [r.progress.stage for r in responses[:-1]]
    assert stages == ["opening", "loading", "loading", "ready"]
    model = responses[-1].model
    assert model.model_id == "tiny" and model.vocab_size == VOCAB and model.backend == "cpu"
    assert h.loaded_paths == [(os.path.realpath(h.model_dir / "tiny.gguf"), "tiny", 0, 4096)]
    listed, _, _, _ = h.unary("ListModels", pb.ListModelsRequest())
    assert [m.model_id for m in listed.models] == ["tiny"]
    _, _, code, details = h.load(pb.LoadModelRequest(path="tiny.gguf", context_length=8192))
    assert code == grpc.StatusCode.OUT_OF_RANGE and details.startswith("context_length:")


def test_load_model_stops_when_its_client_leaves(harness):
    """Over the worker's grpc.aio server a client that leaves mid-load stops the load (the next
    progress report raises), rather than a model nobody waits for being swapped in."""
    h = harness(engine=None)
    (h.model_dir / "slow.gguf").write_bytes(b"GGUF")
    reports = []

    def slow_load(path, *, progress=None, **_):
        for i in range(1000):  # 10 s unless stopped
            progress("loading", i, 1000)
            reports.append(i)
            time.sleep(0.01)
        return FakeEngine(model_id="slow")

    h.scheduler._loader = slow_load
    call = h.stub.LoadModel(pb.LoadModelRequest(path="slow.gguf"))
    assert next(call).progress.stage == "loading"
    call.cancel()
    time.sleep(0.5)  # the abort lands at the next progress report
    stopped_at = len(reports)
    time.sleep(0.5)
    assert len(reports) == stopped_at < 1000 and h.scheduler.engine is None


def test_failed_load_keeps_old_model(harness):
    h = harness()
    (h.model_dir / "big.gguf").write_bytes(b"GGUF")

    def boom(path, **_):
        raise ResourceExhausted("model needs 90 GiB, 80 GiB available", field="path")

    h.scheduler._loader = boom
    _, _, code, details = h.load(pb.LoadModelRequest(path="big.gguf"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "GiB" in details
    responses, _, code, _ = h.execute(text_req())
    assert code == grpc.StatusCode.OK and responses[0].started.model_id == "fake"


def test_unload_and_list(harness):
    h = harness()
    _, _, code, details = h.unary("UnloadModel", pb.UnloadModelRequest(model_id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("model_id:")
    _, _, code, _ = h.unary("UnloadModel", pb.UnloadModelRequest(model_id="fake"))
    assert code == grpc.StatusCode.OK
    resp, _, _, _ = h.unary("ListModels", pb.ListModelsRequest())
    assert list(resp.models) == []
    _, _, code, _ = h.execute(text_req())
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_hardware_info_cpu(harness):
    resp, _, code, _ = harness().unary("HardwareInfo", pb.HardwareInfoRequest())
    assert code == grpc.StatusCode.OK
    assert resp.backend == "cpu" and resp.cpu.cores >= 1 and resp.python_version
    assert not resp.gpu.name


def test_hardware_info_before_any_load_describes_the_gpu(harness, monkeypatch):
    """A CUDA worker with no model still reports its GPU and free VRAM (what the first load would
    use); tests/gpu/test_cuda_load_plan.py reads the real device's."""
    from orcd_grpc.backends import factory

    gpu = {"name": "Fake GPU", "compute_capability": "9.0", "vram_total": 80 << 30, "vram_free": 79 << 30,
           "driver_version": "580.1", "cuda_version": "13.0", "multiprocessors": 132}
    asked = []
    monkeypatch.setattr(factory, "idle_device", lambda kind: asked.append(kind) or ("cuda", gpu))
    h = harness(engine=None)
    h.servicer.backend = "auto"
    resp, _, code, _ = h.unary("HardwareInfo", pb.HardwareInfoRequest())
    assert code == grpc.StatusCode.OK and asked == ["auto"]
    assert resp.backend == "cuda" and resp.gpu.name == "Fake GPU" and resp.gpu.vram_free_bytes == 79 << 30
    assert resp.gpu.vram_used_by_worker_bytes == 0 and resp.gpu.multiprocessors == 132


def test_idle_device_without_a_gpu_is_the_cpu():
    from orcd_grpc.backends.cuda_context import cuda_present
    from orcd_grpc.backends.factory import idle_device

    # auto goes through the CUDA probe: on a machine without a GPU (or PyCUDA) it lands on the CPU
    for kind in ("cpu", "numpy") + (() if cuda_present() else ("auto",)):
        assert idle_device(kind) == ("cpu", None), kind


def test_request_metrics_count_codes(harness):
    h = harness()
    h.execute(text_req())
    h.execute(pb.ExecuteRequest())
    reg = h.metrics.registry
    assert reg.get_sample_value("orcd_requests_total", {"method": "Execute", "code": "OK"}) == 1
    assert reg.get_sample_value("orcd_requests_total", {"method": "Execute", "code": "INVALID_ARGUMENT"}) == 1
    assert reg.get_sample_value("orcd_generated_tokens_total") == 5


def test_execute_streams_leave_threads_for_control_calls():
    """Execute streams beyond the cap are refused at once (RESOURCE_EXHAUSTED, retry hint) so the
    handler threads kept back serve Cancel and health checks under overload."""
    import grpc

    from orcd_grpc.server import SERVICE_NAME, _CallWrapper

    class Aborted(Exception):
        pass

    class Ctx:
        def __init__(self):
            self.trailing, self.code = (), None

        def set_trailing_metadata(self, md):
            self.trailing = md

        def abort(self, code, details):
            self.code = code
            raise Aborted(details)

    class Details:
        def __init__(self, method):
            self.method, self.invocation_metadata = method, ()

    def stream(request, context):
        yield "a"
        yield "b"

    wrapper = _CallWrapper(max_streams=1)
    handler = grpc.unary_stream_rpc_method_handler(stream)
    execute = wrapper.intercept_service(lambda d: handler, Details(f"/{SERVICE_NAME}/Execute")).unary_stream
    first = execute(None, Ctx())
    assert next(first) == "a"                      # holds the only stream slot
    ctx = Ctx()
    with pytest.raises(Aborted):
        next(execute(None, ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and ("retry-after-ms", "1000") in ctx.trailing
    other = wrapper.intercept_service(lambda d: handler, Details(f"/{SERVICE_NAME}/Other")).unary_stream
    assert list(other(None, Ctx())) == ["a", "b"]  # other methods are not counted
    assert list(first) == ["b"]                    # the first stream ends: its slot is free again
    assert list(execute(None, Ctx())) == ["a", "b"]
