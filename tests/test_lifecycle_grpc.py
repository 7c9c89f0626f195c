"""Issue #18 C through a real server on a real port (SmolLM2-135M, CPU backend) and the real stubs:
why a cancelled request ended (Finished.cancel_reason, retry_safe, and the metric / log line where
the client is gone), Drain with health, and model swaps that let the old model's requests finish.
"""
from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orcd_grpc import logs, security
from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server
from procs import wait_for  # noqa: E402

pytestmark = pytest.mark.slow

SERVICE = "orcd.v1.Worker"
NOT, YES = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING


def serve(path, **kw):
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(path.parent)], backend="cpu",
                       max_context=kw.pop("max_context", 256), max_sequences=kw.pop("max_sequences", 4),
                       max_queue=8, grace_seconds=kw.pop("grace_seconds", 2), **kw)
    worker, port, scheduler = start_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.WorkerStub(channel)
    model = list(stub.LoadModel(pb.LoadModelRequest(path=path.name, model_id="smol-a"), timeout=300))[-1].model
    return SimpleNamespace(worker=worker, scheduler=scheduler, channel=channel, stub=stub, model=model, path=path)


def close(s, grace=1):
    s.channel.close()
    s.worker.stop(grace)


@pytest.fixture(scope="module")
def srv(smollm2_path):
    s = serve(smollm2_path)
    yield s
    close(s)


def health(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def long_request(rid="", max_tokens=200, text="Once upon a time"):
    return pb.ExecuteRequest(request_id=rid, text=text, sampling=pb.SamplingParams(temperature=0.0),
                             stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))


def cancelled(s, reason: str) -> float:
    return s.worker.metrics.registry.get_sample_value("orcd_cancelled_requests_total", {"reason": reason}) or 0.0




def idle_and_freed(s, free_before):
    eng = s.scheduler.engine
    return wait_for(lambda: s.scheduler.stats()["live"] == 0 and eng.free_blocks() == free_before)


class Captured(logging.Handler):
    """The worker's JSON log lines (logs.JsonFormatter), as dicts."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record):
        self.lines.append(json.loads(self.format(record)))

    def __enter__(self):
        root = logging.getLogger("orcd")
        self._level = root.level
        root.addHandler(self)
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger("orcd")
        root.removeHandler(self)
        root.setLevel(self._level)

    def finished(self, request_id):
        return [ln for ln in self.lines if ln.get("msg") == "request finished" and ln.get("request_id") == request_id]


# ---- cancel reasons ----------------------------------------------------------------------------------


def test_cancel_rpc_reason_and_not_retry_safe(srv):
    free = srv.scheduler.engine.free_blocks()
    before = cancelled(srv, "client_cancel")
    call = srv.stub.Execute(long_request("life-cancel"), timeout=120)
    next(call)
    assert next(call).WhichOneof("event") == "token"
    assert srv.stub.Cancel(pb.CancelRequest(request_id="life-cancel"), timeout=5).cancelled
    fin = list(call)[-1].finished
    assert fin.reason == pb.FINISH_REASON_CANCELLED
    assert fin.cancel_reason == pb.CANCEL_REASON_CLIENT_CANCEL and not fin.retry_safe
    assert cancelled(srv, "client_cancel") == before + 1
    assert idle_and_freed(srv, free)


def test_finished_normally_has_no_cancel_reason(srv):
    fin = list(srv.stub.Execute(long_request(max_tokens=2), timeout=60))[-1].finished
    assert fin.reason == pb.FINISH_REASON_LENGTH
    assert fin.cancel_reason == pb.CANCEL_REASON_UNSPECIFIED and not fin.retry_safe


def test_deadline_reason_in_metric_and_log(srv):
    free = srv.scheduler.engine.free_blocks()
    before = cancelled(srv, "deadline_exceeded"), cancelled(srv, "client_disconnect")
    with Captured() as cap:
        # The client's deadline usually fires first (DEADLINE_EXCEEDED); when the worker's copy
        # fires a moment earlier, the stream ends with a Finished event that says so (as in
        # test_server_integration.test_deadline_frees_kv). Either way the metric and the log say why.
        try:
            events = list(srv.stub.Execute(long_request("life-deadline"), timeout=1.5))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            assert events[-1].finished.cancel_reason == pb.CANCEL_REASON_DEADLINE_EXCEEDED, events[-1]
        assert wait_for(lambda: cancelled(srv, "deadline_exceeded") == before[0] + 1)
        assert idle_and_freed(srv, free)
    assert cancelled(srv, "client_disconnect") == before[1]
    [line] = cap.finished("life-deadline")
    assert line["reason"] == "cancelled" and line["cancel_reason"] == "deadline_exceeded"


def test_client_disconnect_reason_in_metric_and_log(srv):
    free = srv.scheduler.engine.free_blocks()
    before = cancelled(srv, "client_disconnect")
    with Captured() as cap:
        call = srv.stub.Execute(long_request("life-gone"), timeout=120)
        next(call)
        next(call)
        call.cancel()
        assert wait_for(lambda: cancelled(srv, "client_disconnect") == before + 1)
        assert idle_and_freed(srv, free)
    [line] = cap.finished("life-gone")
    assert line["cancel_reason"] == "client_disconnect"


def test_unload_while_streaming_and_queued(smollm2_path):
    s = serve(smollm2_path, max_sequences=1)
    try:
        running = s.stub.Execute(long_request("run"), timeout=120)
        assert next(running).started.request_id == "run"
        next(running)  # a token was streamed: a retry elsewhere would repeat it
        queued = s.stub.Execute(long_request("wait"), timeout=3600)  # behind a long request: never refused for its deadline
        assert next(queued).started.request_id == "wait"
        assert wait_for(lambda: s.scheduler.stats()["waiting"] == 1)
        s.stub.UnloadModel(pb.UnloadModelRequest(model_id="smol-a"), timeout=30)
        fin_run, fin_wait = list(running)[-1].finished, list(queued)[-1].finished
        assert fin_run.cancel_reason == fin_wait.cancel_reason == pb.CANCEL_REASON_MODEL_UNLOADED
        assert fin_run.usage.completion_tokens > 0 and not fin_run.retry_safe
        assert fin_wait.usage.completion_tokens == 0 and fin_wait.retry_safe
        assert s.scheduler.stats()["live"] == 0 and cancelled(s, "model_unloaded") == 2
    finally:
        close(s)


def test_shutdown_with_grace_reason(smollm2_path):
    s = serve(smollm2_path, max_sequences=1)
    try:
        running = s.stub.Execute(long_request("run", max_tokens=400), timeout=120)
        next(running)
        next(running)
        queued = s.stub.Execute(long_request("wait"), timeout=3600)  # behind a long request: never refused for its deadline
        next(queued)
        free = s.scheduler.engine.free_blocks()
        t0 = time.monotonic()
        s.worker.stop(0.5)  # grace too short for 400 tokens on the CPU
        fin_run, fin_wait = list(running)[-1].finished, list(queued)[-1].finished
        assert time.monotonic() - t0 < 15
        assert fin_run.cancel_reason == fin_wait.cancel_reason == pb.CANCEL_REASON_SERVER_SHUTDOWN
        assert not fin_run.retry_safe and fin_wait.retry_safe
        assert cancelled(s, "server_shutdown") == 2
        assert s.scheduler.engine is None and s.scheduler.stats()["live"] == 0
        assert free >= 0
    finally:
        s.channel.close()


# ---- Drain --------------------------------------------------------------------------------------------


def test_drain_stops_admission_lets_running_finish_and_flips_health(smollm2_path):
    s = serve(smollm2_path)
    try:
        assert (health(s.channel), health(s.channel, SERVICE)) == (YES, YES)
        call = s.stub.Execute(long_request("drained", max_tokens=12), timeout=120)
        next(call)
        next(call)
        resp = s.stub.Drain(pb.DrainRequest(), timeout=10)
        assert (resp.running, resp.queued, resp.draining, resp.idle) == (1, 0, True, False)
        assert (health(s.channel), health(s.channel, SERVICE)) == (NOT, NOT)
        with pytest.raises(grpc.RpcError) as ei:
            list(s.stub.Execute(long_request(max_tokens=2), timeout=10))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in ei.value.details()
        # the running request runs to its end
        fin = list(call)[-1].finished
        assert fin.reason == pb.FINISH_REASON_LENGTH and fin.usage.completion_tokens == 12
        waited = s.stub.Drain(pb.DrainRequest(wait=True, wait_timeout_ms=30_000), timeout=40)
        assert waited.idle and waited.running == 0 and waited.draining
        resumed = s.stub.Drain(pb.DrainRequest(resume=True), timeout=10)
        assert not resumed.draining and health(s.channel) == YES
        assert list(s.stub.Execute(long_request(max_tokens=2), timeout=60))[-1].finished.reason == \
            pb.FINISH_REASON_LENGTH
    finally:
        close(s)


def test_drain_wait_times_out_with_requests_running(srv):
    call = srv.stub.Execute(long_request("slow", max_tokens=60), timeout=120)
    next(call)
    next(call)  # a token: it runs
    try:
        t0 = time.monotonic()
        resp = srv.stub.Drain(pb.DrainRequest(wait=True, wait_timeout_ms=300), timeout=10)
        assert not resp.idle and resp.running == 1 and 250 <= resp.waited_ms < 5000
        assert time.monotonic() - t0 < 5
    finally:
        srv.stub.Drain(pb.DrainRequest(resume=True), timeout=10)
        srv.stub.Cancel(pb.CancelRequest(request_id="slow"), timeout=5)
        list(call)


@pytest.mark.parametrize("req,code,field", [
    (pb.DrainRequest(wait=True, wait_timeout_ms=600_001), grpc.StatusCode.OUT_OF_RANGE, "wait_timeout_ms"),
    (pb.DrainRequest(wait_timeout_ms=10), grpc.StatusCode.INVALID_ARGUMENT, "wait_timeout_ms"),
    (pb.DrainRequest(resume=True, wait=True), grpc.StatusCode.INVALID_ARGUMENT, "resume"),
])
def test_drain_bad_arguments(srv, req, code, field):
    with pytest.raises(grpc.RpcError) as ei:
        srv.stub.Drain(req, timeout=10)
    assert ei.value.code() == code and ei.value.details().startswith(field + ":"), ei.value.details()
    assert health(srv.channel) == YES  # nothing was drained


def test_drain_needs_admin(smollm2_path):
    tokens = {"app": "app", "ops": "ops"}
    roles = {"app": frozenset({"infer"}), "ops": frozenset({"admin"})}
    # LoadModel itself needs admin on a worker with tokens, so this worker starts without a model
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(smollm2_path.parent)], backend="cpu",
                       interceptors=[security.AuthInterceptor(tokens, roles=roles)])
    worker, port, _ = start_server(cfg)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            with pytest.raises(grpc.RpcError) as ei:
                stub.Drain(pb.DrainRequest(), metadata=[("authorization", "Bearer app")], timeout=5)
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in ei.value.details()
            assert stub.Drain(pb.DrainRequest(), metadata=[("authorization", "Bearer ops")], timeout=5).draining
            with pytest.raises(grpc.RpcError) as ei:
                next(stub.WatchEvents(pb.WatchEventsRequest(), metadata=[("authorization", "Bearer app")],
                                      timeout=5))
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        worker.stop(0)


# ---- model swaps ----------------------------------------------------------------------------------------


def test_swap_lets_old_requests_finish_then_frees_the_old_model(smollm2_path):
    s = serve(smollm2_path)
    try:
        old_engine = s.scheduler.engine
        call = s.stub.Execute(long_request("on-old", max_tokens=16), timeout=120)
        assert next(call).started.model_id == "smol-a"
        next(call)
        list(s.stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name, model_id="smol-b"), timeout=300))
        assert [m.model_id for m in s.stub.ListModels(pb.ListModelsRequest(), timeout=5).models] == ["smol-b"]
        new = list(s.stub.Execute(long_request(max_tokens=3), timeout=60))
        assert new[0].started.model_id == "smol-b" and new[-1].finished.reason == pb.FINISH_REASON_LENGTH
        fin = list(call)[-1].finished
        assert fin.reason == pb.FINISH_REASON_LENGTH and fin.usage.completion_tokens == 16
        assert wait_for(lambda: len(s.scheduler.retiring) == 0)
        assert old_engine.kv is None  # closed: its memory is freed
        with pytest.raises(grpc.RpcError) as ei:
            s.stub.UnloadModel(pb.UnloadModelRequest(model_id="smol-a"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        close(s)


def test_unload_of_the_old_model_during_a_swap_cancels_as_swapped(smollm2_path):
    s = serve(smollm2_path)
    try:
        call = s.stub.Execute(long_request("on-old"), timeout=120)
        next(call)
        next(call)
        list(s.stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name, model_id="smol-b"), timeout=300))
        s.stub.UnloadModel(pb.UnloadModelRequest(model_id="smol-a"), timeout=30)
        fin = list(call)[-1].finished
        assert fin.cancel_reason == pb.CANCEL_REASON_MODEL_SWAPPED and not fin.retry_safe
        assert cancelled(s, "model_swapped") == 1
        assert len(s.scheduler.retiring) == 0 and s.scheduler.engine.info.model_id == "smol-b"
    finally:
        close(s)


def test_swap_refused_when_memory_does_not_hold_both(smollm2_path):
    probe = serve(smollm2_path)
    need = probe.scheduler.engine.info.vram_bytes
    close(probe)
    s = serve(smollm2_path, max_ram=int(need * 1.5))  # one model fits, two do not
    try:
        call = s.stub.Execute(long_request("keeps", max_tokens=10), timeout=120)
        next(call)
        with pytest.raises(grpc.RpcError) as ei:
            list(s.stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name, model_id="smol-b"), timeout=300))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value.details()
        fin = list(call)[-1].finished  # the old model kept serving its request
        assert fin.reason == pb.FINISH_REASON_LENGTH and fin.usage.completion_tokens == 10
        # Unload first, then load: a request caught by the unload says so.
        call = s.stub.Execute(long_request("caught"), timeout=120)
        next(call)
        s.stub.UnloadModel(pb.UnloadModelRequest(model_id="smol-a"), timeout=30)
        assert list(call)[-1].finished.cancel_reason == pb.CANCEL_REASON_MODEL_UNLOADED
        model = list(s.stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name, model_id="smol-b"),
                                      timeout=300))[-1].model
        assert model.model_id == "smol-b"
    finally:
        close(s)


def test_cli_drain_and_resume(srv):
    """`orcd drain --wait`, the Kubernetes preStop hook's command, against the real worker."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCD_")}
    addr = f"127.0.0.1:{srv.worker.port}"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "orcd_grpc.cli", "drain", "--address", addr, *args],
                              capture_output=True, text=True, timeout=60, env=env)

    try:
        out = cli("--wait", "20")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("draining: 0 running, 0 queued; idle"), out.stdout
        assert health(srv.channel) == NOT
    finally:
        back = cli("--resume")
    assert back.returncode == 0 and back.stdout.startswith("admitting"), back.stdout + back.stderr
    assert health(srv.channel) == YES
