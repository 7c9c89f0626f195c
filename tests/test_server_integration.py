"""The real server on a real port, serving the real SmolLM2-135M on the CPU backend, driven by a
real gRPC client."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from orcd_grpc import logs
from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server

pytestmark = pytest.mark.slow

SERVICE = "orcd.v1.Worker"
CONTEXT = 256


def health_status(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def srv(smollm2_path):
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(smollm2_path.parent)], backend="cpu",
                       max_context=CONTEXT, max_sequences=8, max_queue=16, grace_seconds=2)
    worker, port, scheduler = start_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.WorkerStub(channel)
    before = (health_status(channel), health_status(channel, SERVICE))
    with pytest.raises(grpc.RpcError) as no_model:
        list(stub.Execute(pb.ExecuteRequest(text="hi"), timeout=10))
    load_events = list(stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name), timeout=300))
    after = (health_status(channel), health_status(channel, SERVICE))
    yield SimpleNamespace(worker=worker, port=port, scheduler=scheduler, channel=channel, stub=stub,
                          before=before, after=after, load_events=load_events, no_model=no_model.value,
                          path=smollm2_path)
    channel.close()
    worker.stop(1)


def run(stub, text="The capital of France is", *, max_tokens=4, temperature=0.0, metadata=None, **kw):
    sampling = kw.pop("sampling", pb.SamplingParams(temperature=temperature))
    stopping = kw.pop("stopping", pb.StoppingCriteria(max_tokens=max_tokens))
    events = list(stub.Execute(pb.ExecuteRequest(text=text, sampling=sampling, stopping=stopping, **kw),
                               metadata=metadata, timeout=120))
    started = events[0].started
    tokens = [e.token for e in events[1:-1]]
    finished = events[-1].finished
    assert [e.WhichOneof("event") for e in events] == ["started"] + ["token"] * len(tokens) + ["finished"]
    return SimpleNamespace(started=started, tokens=tokens, finished=finished,
                           ids=[t.token_id for t in tokens], text="".join(t.text for t in tokens))


def wait_idle(srv, free_before, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if srv.scheduler.stats()["live"] == 0 and srv.scheduler.engine.free_blocks() == free_before:
            return True
        time.sleep(0.02)
    return False


def long_request(request_id=""):
    return pb.ExecuteRequest(request_id=request_id, text="Once upon a time",
                             sampling=pb.SamplingParams(temperature=0.0),
                             stopping=pb.StoppingCriteria(max_tokens=200, ignore_eos=True))


# ---------------------------------------------------------------------------------------------


def test_health_flips_to_serving_after_load(srv):
    NOT, YES = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
    assert srv.before == (NOT, NOT)
    assert srv.after == (YES, YES)
    assert srv.no_model.code() == grpc.StatusCode.FAILED_PRECONDITION
    stages = [e.progress.stage for e in srv.load_events if e.WhichOneof("event") == "progress"]
    assert stages[0] == "opening" and stages[-1] == "ready" and "loading" in stages
    model = srv.load_events[-1].model
    assert model.model_id == "smollm2-135m-instruct" and model.backend == "cpu"
    assert model.context_length == CONTEXT and model.vocab_size > 40_000 and model.has_chat_template
    listed = srv.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert [m.model_id for m in listed.models] == [model.model_id]


def test_greedy_paris(srv):
    r = run(srv.stub, max_tokens=3)
    assert r.text.startswith(" Paris"), r.text
    assert r.finished.reason == pb.FINISH_REASON_LENGTH
    assert r.finished.usage.completion_tokens == 3
    assert r.finished.usage.prompt_tokens == r.started.prompt_tokens > 0
    t = r.finished.timings
    assert t.total_ms >= t.time_to_first_token_ms >= t.queue_ms >= 0 and t.decode_tokens_per_second > 0


def test_same_seed_same_output(srv):
    outs = set()
    for _ in range(10):
        r = run(srv.stub, "Write a word:", max_tokens=12,
                sampling=pb.SamplingParams(temperature=0.8, seed=1234),
                stopping=pb.StoppingCriteria(max_tokens=12, ignore_eos=True))
        assert len(r.ids) == 12
        outs.add(tuple(r.ids))
    assert len(outs) == 1


def test_cancel_ends_within_one_step_and_frees_kv(srv):
    free = srv.scheduler.engine.free_blocks()
    call = srv.stub.Execute(long_request("cancel-me"), timeout=120)
    assert next(call).started.request_id == "cancel-me"
    assert next(call).WhichOneof("event") == "token"
    assert srv.stub.Cancel(pb.CancelRequest(request_id="cancel-me"), timeout=5).cancelled
    rest = list(call)
    assert rest[-1].finished.reason == pb.FINISH_REASON_CANCELLED
    # Tokens already queued when Cancel landed, plus at most the step then running.
    assert len(rest) - 1 <= 2
    assert wait_idle(srv, free)
    with pytest.raises(grpc.RpcError) as ei:
        srv.stub.Cancel(pb.CancelRequest(request_id="cancel-me"), timeout=5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "request_id" in ei.value.details()


def test_client_disconnect_frees_kv(srv):
    free = srv.scheduler.engine.free_blocks()
    call = srv.stub.Execute(long_request(), timeout=120)
    next(call)
    next(call)
    assert srv.scheduler.stats()["live"] == 1
    call.cancel()
    assert wait_idle(srv, free)


def test_deadline_frees_kv(srv):
    """The call's deadline ends the request: the client sees DEADLINE_EXCEEDED, or, when the
    worker's copy of the deadline fires first (a loaded machine), a last Finished event that says
    so. Either way its KV blocks come back."""
    free = srv.scheduler.engine.free_blocks()
    try:
        events = list(srv.stub.Execute(long_request(), timeout=1.0))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        fin = events[-1].finished
        assert fin.reason == pb.FINISH_REASON_CANCELLED, events[-1]
        assert fin.cancel_reason == pb.CANCEL_REASON_DEADLINE_EXCEEDED, events[-1]
    assert wait_idle(srv, free)


BAD = [
    (pb.ExecuteRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (pb.ExecuteRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (pb.ExecuteRequest(text="x", sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature"),
    (pb.ExecuteRequest(text="x", sampling=pb.SamplingParams(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.top_p"),
    (pb.ExecuteRequest(text="x", sampling=pb.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.top_p"),
    (pb.ExecuteRequest(text="x", stopping=pb.StoppingCriteria(stop_token_ids=[10_000_000])),
     grpc.StatusCode.INVALID_ARGUMENT, "stopping.stop_token_ids"),
    (pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 10_000_000])), grpc.StatusCode.INVALID_ARGUMENT, "input.tokens"),
    (pb.ExecuteRequest(text="x", top_logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
    (pb.ExecuteRequest(text="x", stopping=pb.StoppingCriteria(stop=["s"] * 17)), grpc.StatusCode.INVALID_ARGUMENT,
     "stopping.stop"),
    (pb.ExecuteRequest(text="x", stopping=pb.StoppingCriteria(stop=["s" * 257])), grpc.StatusCode.INVALID_ARGUMENT,
     "stopping.stop[0]"),
    (pb.ExecuteRequest(text="x", request_id="é"), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    (pb.ExecuteRequest(text="x", model_id="nope"), grpc.StatusCode.NOT_FOUND, "model_id"),
    (pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1] * CONTEXT)), grpc.StatusCode.OUT_OF_RANGE, "input"),
]


@pytest.mark.parametrize("req,code,field", BAD, ids=[f"{c.name}-{f}" for _, c, f in BAD])
def test_errors_over_the_wire(srv, req, code, field):
    with pytest.raises(grpc.RpcError) as ei:
        list(srv.stub.Execute(req, timeout=10))
    assert ei.value.code() == code
    assert ei.value.details().startswith(field + ":"), ei.value.details()


def test_duplicate_request_id_and_full_queue(srv):
    free = srv.scheduler.engine.free_blocks()
    call = srv.stub.Execute(long_request("dup"), timeout=120)
    next(call)
    with pytest.raises(grpc.RpcError) as ei:
        list(srv.stub.Execute(long_request("dup"), timeout=10))
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS and ei.value.details().startswith("request_id:")
    saved, srv.scheduler.max_queue = srv.scheduler.max_queue, 0
    try:
        with pytest.raises(grpc.RpcError) as ei:
            list(srv.stub.Execute(long_request(), timeout=10))
    finally:
        srv.scheduler.max_queue = saved
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(ei.value.trailing_metadata())["retry-after-ms"]) >= 100
    call.cancel()
    assert wait_idle(srv, free)


def test_load_model_outside_model_dirs_is_refused(srv):
    for path, code in [("../../etc/passwd", grpc.StatusCode.PERMISSION_DENIED),
                       ("/etc/hostname", grpc.StatusCode.PERMISSION_DENIED),
                       ("no-such.gguf", grpc.StatusCode.NOT_FOUND)]:
        with pytest.raises(grpc.RpcError) as ei:
            list(srv.stub.LoadModel(pb.LoadModelRequest(path=path), timeout=10))
        assert ei.value.code() == code and ei.value.details().startswith("path:")
    # The served model is untouched.
    assert srv.scheduler.model_info.model_id == "smollm2-135m-instruct"


def test_reflection_lists_worker(srv):
    db = ProtoReflectionDescriptorDatabase(srv.channel)
    services = db.get_services()
    assert SERVICE in services and "grpc.health.v1.Health" in services
    fd = db.FindFileContainingSymbol(SERVICE)
    assert fd.package == "orcd.v1" and any(s.name == "Worker" for s in fd.service)


def test_hardware_info_cpu(srv):
    hw = srv.stub.HardwareInfo(pb.HardwareInfoRequest(), timeout=10)
    assert hw.backend == "cpu" and hw.cpu.cores >= 1 and hw.ram_total_bytes > 0
    assert hw.library_versions["grpcio"] == grpc.__version__


def test_stop_string_spanning_tokens(srv):
    base = run(srv.stub, max_tokens=8)
    texts = [t.text for t in base.tokens]
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(1, len(texts) - 1) if len(texts[i]) >= 2 and len(texts[i + 1]) >= 2)
    stop = texts[k][-2:] + texts[k + 1][:2]
    expected = base.text[: base.text.index(stop)]
    r = run(srv.stub, stopping=pb.StoppingCriteria(max_tokens=8, stop=[stop]))
    assert r.finished.reason == pb.FINISH_REASON_STOP_STRING and r.finished.matched_stop == stop
    assert r.text == expected
    assert stop not in r.text


def test_top_logprobs(srv):
    r = run(srv.stub, max_tokens=3, top_logprobs=5)
    for t in r.tokens:
        alts = list(t.top_logprobs)
        assert len(alts) == 5
        lps = [a.logprob for a in alts]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert alts[0].token_id == t.token_id  # greedy picks the most likely
        assert abs(alts[0].logprob - t.logprob) < 1e-4
    assert r.tokens[0].top_logprobs[0].text.startswith(" Par")


def test_concurrent_streams_match_solo_runs(srv):
    prompts = ["The capital of France is", "One, two, three,", "def add(a, b):", "The sky is"]
    solo = [run(srv.stub, p, max_tokens=5).ids for p in prompts]
    results: list = [None] * len(prompts)
    errors = []

    def go(i):
        try:
            results[i] = run(srv.stub, prompts[i], max_tokens=5).ids
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == solo
    assert srv.worker.metrics.registry.get_sample_value("orcd_running_sequences") == 0


def test_chat_input(srv):
    req = pb.ExecuteRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi")]),
                            sampling=pb.SamplingParams(temperature=0), stopping=pb.StoppingCriteria(max_tokens=2))
    events = list(srv.stub.Execute(req, timeout=60))
    assert events[-1].finished.usage.completion_tokens >= 1
    assert events[0].started.prompt_tokens > 5


def test_correlation_id_in_started_and_logs(srv):
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger("orcd")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        r = run(srv.stub, max_tokens=1, request_id="corr-req", metadata=(("x-correlation-id", "corr-abc"),))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert r.started.correlation_id == "corr-abc"
    lines = [json.loads(line) for line in records.getvalue().splitlines()]
    mine = [ln for ln in lines if ln["request_id"] == "corr-req"]
    assert mine and all(ln["correlation_id"] == "corr-abc" for ln in mine)
    assert any(ln["msg"] == "request finished" for ln in mine)
    assert all({"ts", "level", "msg"} <= set(ln) for ln in lines)


def test_sigterm_drains_and_exits(tmp_path):
    code = ("import sys; from orcd_grpc.server import ServerConfig, serve; "
            "sys.exit(serve(ServerConfig(host='127.0.0.1', port=0, grace_seconds=1)))")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if '"listening"' in line:
                break
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        lines += proc.stderr.read().splitlines()
        assert rc == 0, "\n".join(line.rstrip() for line in lines)  # a rare failure under load: say why
    finally:
        if proc.poll() is None:
            proc.kill()
    msgs = [json.loads(line)["msg"] for line in lines if line.strip().startswith("{")]
    assert "signal received" in msgs and "stopped" in msgs
