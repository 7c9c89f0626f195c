"""Several clients on one worker (issue #15): request ids scoped per client, roles for model
control, and the generated-token limit under a concurrent burst.

Each test runs a real worker (start_server, a real gRPC server on a loopback port) whose engine
is test_scheduler's scripted FakeEngine with a per-step delay, so requests stay running long
enough to be seen, duplicated and cancelled by another client.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest

from orcd_grpc import security
from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.ratelimit import RateLimits
from orcd_grpc.server import ServerConfig, start_server
from test_scheduler import FakeDecoder, FakeEngine

ALICE = "tok-alice-0123456789abcdef"
BOB = "tok-bob-0123456789abcdefgh"
OPS = "tok-ops-0123456789abcdefgh"
PROM = "tok-prom-0123456789abcdefg"
TOKENS = f"{ALICE}:alice,{BOB}:bob,{OPS}:ops:admin+infer,{PROM}:prom:metrics"


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def req(text="hi", *, request_id="", max_tokens=8, **sampling):
    return pb.ExecuteRequest(request_id=request_id, text=text,
                             sampling=pb.SamplingParams(temperature=0, **sampling),
                             stopping=pb.StoppingCriteria(max_tokens=max_tokens))


@pytest.fixture
def start(tmp_path):
    """start(tokens, limits, step_delay) -> (worker, stub); the worker serves a FakeEngine."""
    from fuzz.fuzz_gguf import _tiny_llama

    _tiny_llama(str(tmp_path / "tiny.gguf"))  # a real GGUF for LoadModel's path checks
    made = []

    def run(tokens=None, limits=None, step_delay=0.02):
        cfg = ServerConfig(host="127.0.0.1", port=0, grace_seconds=0, backend="cpu", model_dirs=[str(tmp_path)])
        sec = security.SecurityConfig(tokens=security.parse_tokens(tokens), roles=security.parse_token_roles(tokens))
        security.apply_to_server_config(cfg, sec, limits)
        worker, port, sched = start_server(cfg)
        sched._loader = lambda path, **kw: FakeEngine(step_delay=step_delay, context_length=256,
                                                      model_id=kw.get("model_id") or "fake")
        sched._decoder_factory = FakeDecoder
        sched.load("fake", model_id="fake")
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        made.append((worker, ch))
        return worker, pb_grpc.WorkerStub(ch)

    yield run
    for worker, ch in made:
        ch.close()
        worker.stop(0)


def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


# ---- request ids belong to their client ------------------------------------------------------------


def test_request_ids_are_per_client_and_cancel_reaches_only_the_callers_own(start):
    _, stub = start(TOKENS, step_delay=0.03)
    alice = stub.Execute(req(request_id="job-1", max_tokens=60), metadata=bearer(ALICE), timeout=60)
    assert next(alice).started.request_id == "job-1"
    # Bob may use the same id: ids are scoped per client, and ALREADY_EXISTS does not tell him
    # that alice has a job-1.
    bob = stub.Execute(req(request_id="job-1", max_tokens=60), metadata=bearer(BOB), timeout=60)
    assert next(bob).started.request_id == "job-1"
    # Alice's own duplicate is still refused.
    code, _ = _code(lambda: list(stub.Execute(req(request_id="job-1"), metadata=bearer(ALICE), timeout=10)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    # Bob's Cancel reaches his job-1 only.
    assert stub.Cancel(pb.CancelRequest(request_id="job-1"), metadata=bearer(BOB), timeout=10).cancelled
    assert list(bob)[-1].finished.reason == pb.FINISH_REASON_CANCELLED
    # Now only alice has a job-1: to bob it is exactly an id that does not exist.
    code, msg = _code(lambda: stub.Cancel(pb.CancelRequest(request_id="job-1"), metadata=bearer(BOB), timeout=10))
    code2, msg2 = _code(lambda: stub.Cancel(pb.CancelRequest(request_id="job-9"), metadata=bearer(BOB), timeout=10))
    assert code == code2 == grpc.StatusCode.NOT_FOUND
    assert msg == msg2.replace("job-9", "job-1")
    rest = list(alice)
    assert rest[-1].finished.reason == pb.FINISH_REASON_LENGTH  # untouched by bob's Cancel
    assert rest[-1].finished.usage.completion_tokens == 60


# ---- roles -----------------------------------------------------------------------------------------


def test_model_control_needs_the_admin_role(start):
    _, stub = start(TOKENS)
    load = pb.LoadModelRequest(path="tiny.gguf", model_id="other")
    for token in (ALICE, PROM):  # a token without roles is infer; metrics only scrapes
        code, msg = _code(lambda: list(stub.LoadModel(load, metadata=bearer(token), timeout=30)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "LoadModel needs the admin role" in msg
        code, msg = _code(lambda: stub.UnloadModel(pb.UnloadModelRequest(model_id="fake"), metadata=bearer(token),
                                                   timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "UnloadModel needs the admin role" in msg
    assert "alice" in _code(lambda: list(stub.LoadModel(load, metadata=bearer(ALICE), timeout=30)))[1]
    # infer may generate and look; metrics may not even generate
    assert list(stub.Execute(req(), metadata=bearer(ALICE), timeout=30))[-1].finished.usage.completion_tokens == 8
    assert [m.model_id for m in stub.ListModels(pb.ListModelsRequest(), metadata=bearer(ALICE), timeout=10).models] \
        == ["fake"]
    code, msg = _code(lambda: list(stub.Execute(req(), metadata=bearer(PROM), timeout=30)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "Execute needs the infer role" in msg
    # admin loads and unloads
    events = list(stub.LoadModel(load, metadata=bearer(OPS), timeout=30))
    assert events[-1].model.model_id == "other"
    stub.UnloadModel(pb.UnloadModelRequest(model_id="other"), metadata=bearer(OPS), timeout=10)
    assert stub.ListModels(pb.ListModelsRequest(), metadata=bearer(OPS), timeout=10).models == []


def test_without_tokens_everything_stays_allowed(start):
    _, stub = start(None)
    assert list(stub.LoadModel(pb.LoadModelRequest(path="tiny.gguf", model_id="dev"), timeout=30))[-1].model.model_id \
        == "dev"
    stub.UnloadModel(pb.UnloadModelRequest(model_id="dev"), timeout=10)


# ---- the generated-token limit under a concurrent burst ------------------------------------------


def test_token_limit_holds_under_a_concurrent_burst_without_a_lockout(start):
    rate, burst, per_request, clients = 5.0, 20, 10, 20
    worker, stub = start(f"{ALICE}:alice", RateLimits(tokens_per_s=rate, token_burst=burst), step_delay=0.01)
    gate = threading.Barrier(clients)

    def one(_):
        gate.wait()
        try:
            events = list(stub.Execute(req(max_tokens=per_request), metadata=bearer(ALICE), timeout=60))
            return "ok", events[-1].finished.usage.completion_tokens, 0
        except grpc.RpcError as e:
            return e.code().name, 0, int(dict(e.trailing_metadata() or ()).get("retry-after-ms", 0))

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    elapsed = time.monotonic() - t0
    generated = sum(n for _, n, _ in results)
    # Allowance: the burst plus the refill while the burst ran; tolerance: one request's worth
    # for the refill between the last admission and the clock read here.
    assert generated <= burst + rate * elapsed + per_request, (generated, elapsed, results)
    assert generated >= per_request  # and the burst itself was served
    refused = [r for r in results if r[0] != "ok"]
    assert refused and {r[0] for r in refused} == {"RESOURCE_EXHAUSTED"}
    # A refusal never asks for more than the time to refill one reservation.
    assert max(r[2] for r in refused) <= 1000 * per_request / rate + 1
    assert worker.metrics.registry.get_sample_value("orcd_client_generated_tokens_total",
                                                    {"client": "alice"}) == generated
    # No lockout: within a reservation's refill time the client is served again.
    deadline = time.monotonic() + per_request / rate + 1.0
    while True:
        try:
            list(stub.Execute(req(max_tokens=per_request), metadata=bearer(ALICE), timeout=30))
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the client is still locked out"
            time.sleep(0.1)


def test_refused_and_cancelled_requests_leave_no_reservation_behind(start):
    _, stub = start(f"{ALICE}:alice", RateLimits(tokens_per_s=0.2, token_burst=40), step_delay=0.05)
    md = bearer(ALICE)
    # Refused by validation after its reservation was taken: all of it comes back.
    for _ in range(3):
        code, _ = _code(lambda: list(stub.Execute(req(max_tokens=40, top_p=1.5), metadata=md, timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    # Cancelled after a few tokens: what it did not generate comes back.
    stream = stub.Execute(req(request_id="long", max_tokens=40), metadata=md, timeout=60)
    assert next(stream).WhichOneof("event") == "started"
    next(stream)
    stub.Cancel(pb.CancelRequest(request_id="long"), metadata=md, timeout=10)
    rest = list(stream)
    used = rest[-1].finished.usage.completion_tokens
    assert rest[-1].finished.reason == pb.FINISH_REASON_CANCELLED and used < 30
    # Without the refunds the bucket would hold about 1 token now (0.2/s for a few seconds).
    events = list(stub.Execute(req(max_tokens=40 - used), metadata=md, timeout=60))
    assert events[-1].finished.usage.completion_tokens == 40 - used
    # max_tokens 0 is capped to the burst; more than the burst is refused outright
    code, msg = _code(lambda: list(stub.Execute(req(max_tokens=41), metadata=md, timeout=10)))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "at most 40" in msg
