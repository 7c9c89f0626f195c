"""Front-end processes (ServerConfig.frontends): calls that reach the worker through a real front-end
process on a real port behave as calls on the worker's own port. The front ends listen on a port
of their own here (frontend_port), so every call below crosses one; tokens, request-id ownership,
errors naming their field, deadlines, client disconnects (the KV blocks come back), health and
reflection, and the relay socket refusing a caller without the worker's key."""
from __future__ import annotations

import copy
import pathlib
import socket
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from procs import free_port  # noqa: E402
from test_numerics_status import write_model  # noqa: E402

from orcd_grpc import relay_frames as rf  # noqa: E402
from orcd_grpc.proto import pb, pb_grpc  # noqa: E402
from orcd_grpc.security import AuthInterceptor  # noqa: E402
from orcd_grpc.server import ServerConfig, start_server  # noqa: E402

TOKEN_A = "tok-alice-0123456789abcdef"
TOKEN_B = "tok-bob-0123456789abcdefgh"


def _auth(token):
    return (("authorization", f"Bearer {token}"),)


# a request that runs for hundreds of steps unless cancelled
LONG = pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 5, 9]), stopping=pb.StoppingCriteria(max_tokens=4000,
                                                                                         ignore_eos=True))


def _until_first_token(call):
    for ev in call:
        if ev.WhichOneof("event") == "token":
            return
    raise AssertionError("the stream ended before its first token")


def _until_idle(w, timeout=20.0):
    """Waits for the worker to hold no request (a cancelled one is reaped at the next step)."""
    deadline = time.monotonic() + timeout
    while w.scheduler.stats()["live"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.scheduler.stats()["live"] == 0


def _until_answers(call, timeout=60.0):
    """call() once it stops raising grpc.RpcError (a front end still starting), within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    path = write_model(models / "tiny.gguf", seed=7)
    fport = free_port()
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(models)], backend="cpu", model_path=str(path),
                       max_sequences=4, max_queue=8, grace_seconds=1, frontends=1, frontend_port=fport,
                       interceptors=[AuthInterceptor({TOKEN_A: "alice", TOKEN_B: "bob"})])
    w, port, _ = start_server(cfg)
    assert w.wait_loaded(120), w.load_error
    direct = grpc.insecure_channel(f"127.0.0.1:{port}")
    front = grpc.insecure_channel(f"127.0.0.1:{fport}")
    grpc.channel_ready_future(front).result(timeout=60)
    # the front end is up once its relay stream is: health answers through it
    _until_answers(lambda: health_pb2_grpc.HealthStub(front).Check(health_pb2.HealthCheckRequest(), timeout=5))
    yield w, pb_grpc.WorkerStub(direct), pb_grpc.WorkerStub(front), front
    direct.close()
    front.close()
    w.stop(1)


def _execute(stub, n=12, token=TOKEN_A, **kw):
    req = pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 5, 9, 13, 17]), sampling=pb.SamplingParams(temperature=0),
                            stopping=pb.StoppingCriteria(max_tokens=n, ignore_eos=True), top_logprobs=3, **kw)
    return list(stub.Execute(req, metadata=_auth(token), timeout=60))


def _tokens(events):
    return [(e.token.token_id, e.token.text, round(e.token.logprob, 5), [t.token_id for t in e.token.top_logprobs])
            for e in events if e.WhichOneof("event") == "token"]


def test_execute_through_a_front_end_streams_what_the_worker_streams(worker):
    _, direct, front, _ = worker
    a, b = _execute(direct), _execute(front)
    assert len(_tokens(b)) == 12 and _tokens(a) == _tokens(b)
    assert b[0].WhichOneof("event") == "started" and b[-1].finished.reason == pb.FINISH_REASON_LENGTH
    assert b[-1].finished.usage.completion_tokens == 12


def test_unary_calls_and_errors_cross_with_their_status(worker):
    _, direct, front, _ = worker
    req = pb.TokenizeRequest(text="hello world")
    assert front.Tokenize(req, metadata=_auth(TOKEN_A), timeout=30) == direct.Tokenize(req, metadata=_auth(TOKEN_A),
                                                                                       timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        list(front.Execute(pb.ExecuteRequest(text=""), metadata=_auth(TOKEN_A), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        front.Tokenize(req, timeout=30)  # no token
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_one_client_cannot_cancel_another_clients_request_through_a_front_end(worker):
    _, _, front, _ = worker
    req = pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 5, 9]), request_id="mine",
                            stopping=pb.StoppingCriteria(max_tokens=400, ignore_eos=True))
    call = front.Execute(req, metadata=_auth(TOKEN_A), timeout=60)
    assert next(call).WhichOneof("event") == "started"
    with pytest.raises(grpc.RpcError) as e:
        front.Cancel(pb.CancelRequest(request_id="mine"), metadata=_auth(TOKEN_B), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    front.Cancel(pb.CancelRequest(request_id="mine"), metadata=_auth(TOKEN_A), timeout=30)
    last = list(call)[-1]
    assert last.finished.reason == pb.FINISH_REASON_CANCELLED


def test_a_client_that_leaves_frees_its_request_and_blocks(worker):
    w, _, front, _ = worker
    engine = w.scheduler.engine
    free0 = engine.free_blocks() + len(engine.allocator._evictable)
    call = front.Execute(LONG, metadata=_auth(TOKEN_A), timeout=60)
    _until_first_token(call)
    assert w.scheduler.stats()["running"] == 1
    call.cancel()
    deadline = time.monotonic() + 20
    while (w.scheduler.stats()["live"] or engine.free_blocks() + len(engine.allocator._evictable) < free0) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.scheduler.stats() == {"waiting": 0, "running": 0, "live": 0}
    assert engine.free_blocks() + len(engine.allocator._evictable) >= free0


def test_the_deadline_crosses(worker, monkeypatch):
    """The client's deadline reaches the worker's request (its scheduler cancels at it)."""
    w, _, front, _ = worker
    # LONG runs to the tiny model's 512-token context in a fraction of a second on a fast host:
    # 5 ms a step keeps it running well past the short deadline below
    # (the scheduler's step-time estimate learns these steps on a copy, put back after the test)
    launch = w.scheduler.engine.launch
    monkeypatch.setattr(w.scheduler.engine, "launch", lambda *a, **kw: (time.sleep(0.005), launch(*a, **kw))[1])
    monkeypatch.setattr(w.scheduler, "_estimator", copy.deepcopy(w.scheduler._estimator))
    call = front.Execute(LONG, metadata=_auth(TOKEN_A), timeout=30)
    _until_first_token(call)
    (running,) = list(w.scheduler._running)
    assert 25 < running.deadline - time.monotonic() <= 31  # grpc rounds the timeout it encodes up
    call.cancel()
    t0 = time.monotonic()
    try:
        events = list(front.Execute(LONG, metadata=_auth(TOKEN_A), timeout=0.5))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        # the worker's scheduler holds the same deadline (relayed as the seconds left): on a loaded
        # host its cancel can reach the client before the client's own timer fires
        assert events[-1].finished.reason == pb.FINISH_REASON_CANCELLED
    assert time.monotonic() - t0 < 2.0  # ended at the deadline, not by running to the context's end


def test_a_full_queue_answers_with_its_retry_hint_through_a_front_end(worker):
    """RESOURCE_EXHAUSTED crosses with its trailing metadata (retry-after-ms): 16 streams opened at
    once on a worker that runs 4 and queues 8 (each would run for hundreds of steps)."""
    w, _, front, _ = worker
    calls = [front.Execute(LONG, metadata=_auth(TOKEN_A), timeout=60) for _ in range(16)]
    refused = []
    try:
        for call in calls:
            try:
                next(call)
            except grpc.RpcError as e:
                refused.append(e)
        assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), refused
        assert "queue is full" in refused[0].details()
        assert int(dict(refused[0].trailing_metadata() or ())["retry-after-ms"]) > 0
    finally:
        for c in calls:
            c.cancel()
    _until_idle(w)


def test_health_and_reflection_answer_on_a_front_end(worker):
    _, _, _, channel = worker
    got = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="orcd.v1.Worker"),
                                                    timeout=10)
    assert got.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"orcd.v1.Worker", "grpc.health.v1.Health"} <= names


def test_the_relay_socket_refuses_a_caller_without_the_key(worker):
    w, _, _, _ = worker
    with grpc.insecure_channel(w.frontends.address) as ch:
        call = ch.stream_stream(rf.METHOD)(iter([rf.frame(rf.OPEN, 1, rf.open_payload(
            "/orcd.v1.Worker/Tokenize", (), "ipv4:10.0.0.1:1", None, None, b""))]), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_front_ends_take_every_connection_on_the_workers_port_and_stop_with_it(tmp_path):
    """frontends=2 on the worker's own port: the worker only holds the port, so every connection
    lands on a front end and every call is relayed (none is served by the worker's own loop);
    its own gRPC stays reachable on a loopback port; a front end that dies is replaced; stopping
    the worker ends its front ends and frees the port."""
    path = write_model(tmp_path / "tiny.gguf", seed=8)
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(tmp_path)], backend="cpu", model_path=str(path),
                       max_sequences=4, max_queue=64, grace_seconds=1, frontends=2)
    w, port, _ = start_server(cfg)
    try:
        assert w.frontends.target.streams == 2  # start() returned with both listening
        assert w.direct_port not in (None, port)
        assert w.wait_loaded(120), w.load_error
        want = None
        for i in range(8):  # fresh connections: the kernel spreads them over the listeners
            before = w.frontends.target.calls
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                got = _tokens(_execute(pb_grpc.WorkerStub(ch), n=6))
            want = want or got
            assert got == want
            assert w.frontends.target.calls == before + 1, f"connection {i} was served by the worker itself"
        with grpc.insecure_channel(f"127.0.0.1:{w.direct_port}") as ch:
            before = w.frontends.target.calls
            assert _tokens(_execute(pb_grpc.WorkerStub(ch), n=6)) == want
            assert w.frontends.target.calls == before
        old = w.frontends._procs[0]
        old.kill()
        deadline = time.monotonic() + 30
        while w.frontends._procs[0] is old or w.frontends._procs[0].poll() is not None:
            assert time.monotonic() < deadline, "the front end was not replaced"
            time.sleep(0.1)
        procs = list(w.frontends._procs)
    finally:
        w.stop(1)
    assert all(p.poll() is not None for p in procs)
    with socket.socket() as s:  # nothing holds the port any more
        s.bind(("127.0.0.1", port))


def test_relay_connection_statuses_cap_and_cancel():
    """The worker's side of one front end's stream, driven by frames: an unknown method ends
    UNIMPLEMENTED, abort's code, details and trailing metadata cross in END, calls past the cap end
    RESOURCE_EXHAUSTED, a malformed OPEN ends INTERNAL, and CANCEL runs the call's done callbacks
    as cancelled (how a request is abandoned) without sending it anything more."""
    import asyncio

    from orcd_grpc.relay import RelayTarget, _Connection

    async def scenario():
        release, seen = asyncio.Event(), []

        async def held(request, context):
            context.add_done_callback(lambda ctx: seen.append(("done", ctx.cancelled())))
            yield b"first:" + request
            await release.wait()
            yield b"second"

        async def refused(request, context):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now", (("retry-after-ms", "7"),))

        handlers = {"/t/Held": grpc.unary_stream_rpc_method_handler(held),
                    "/t/Refused": grpc.unary_unary_rpc_method_handler(refused)}
        conn = _Connection(RelayTarget(handlers, max_calls=2))
        inbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while True:
                m = await inbox.get()
                if m is None:
                    return
                yield m

        reader = asyncio.ensure_future(conn.read(requests()))

        def opened(cid, method, body=b"x"):
            return rf.frame(rf.OPEN, cid, rf.open_payload(method, (("k", "v"),), "ipv4:10.1.2.3:4", None, 30.0, body))

        got: dict = {}

        async def take(n):
            while sum(len(v) for v in got.values()) < n:
                for kind, cid, payload in rf.frames(await asyncio.wait_for(conn.out.get(), 5)):
                    got.setdefault(cid, []).append((kind, payload))

        inbox.put_nowait(opened(1, "/t/Held", b"a") + opened(2, "/t/Nope") + opened(3, "/t/Refused"))
        await take(3)  # 1: DATA; 2: END; 3: END
        assert got[1] == [(rf.DATA, b"first:a")]
        assert rf.parse_end(got[2][0][1])[0] == grpc.StatusCode.UNIMPLEMENTED.value[0]
        assert rf.parse_end(got[3][0][1]) == (grpc.StatusCode.FAILED_PRECONDITION.value[0], "not now",
                                              (("retry-after-ms", "7"),))
        inbox.put_nowait(opened(4, "/t/Held", b"b") + opened(5, "/t/Held", b"c"))  # 1 and 4 open: 5 is refused
        await take(5)
        assert got[4] == [(rf.DATA, b"first:b")]
        code, details, trailing = rf.parse_end(got[5][0][1])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "2 calls open" in details
        inbox.put_nowait(rf.frame(rf.OPEN, 6, b"\x00\x00"))  # malformed
        await take(6)
        assert rf.parse_end(got[6][0][1])[0] == grpc.StatusCode.INTERNAL.value[0]
        inbox.put_nowait(rf.frame(rf.CANCEL, 1))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if seen:
                break
        assert seen == [("done", True)] and len(got[1]) == 1
        release.set()  # call 4 runs to its end
        await take(8)
        assert got[4][1] == (rf.DATA, b"second") and rf.parse_end(got[4][2][1])[0] == 0
        assert seen == [("done", True), ("done", False)] and conn.target.open == 0
        inbox.put_nowait(None)
        await reader

    asyncio.run(scenario())


@pytest.mark.parametrize("shared", [False, True], ids=["own-port", "workers-port"])
def test_mutual_tls_identity_crosses_a_front_end(tmp_path, shared):
    """A TLS worker's front end terminates mutual TLS with the worker's files; the client
    certificate's name reaches the worker as the caller's identity: a request started through the
    front end is the same client's on the worker's own gRPC (so it may cancel it there), and a
    certificate from another CA is refused at the front end. With the front end on the worker's
    port, the worker's own gRPC is its loopback port, TLS too."""
    if __import__("shutil").which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    from test_security import _make_ca, _make_leaf

    from orcd_grpc import security

    d = tmp_path
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    _make_leaf(d, "client", "ca", "client-a", "clientAuth")
    _make_leaf(d, "rogue", "rogue-ca", "client-a", "clientAuth")
    path = write_model(tmp_path / "tiny.gguf", seed=9)
    fport = None if shared else free_port()
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(tmp_path)], backend="cpu", model_path=str(path),
                       max_sequences=4, max_queue=8, grace_seconds=1, frontends=1, frontend_port=fport)
    cfg = security.apply_to_server_config(cfg, security.SecurityConfig(
        tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"), tls_client_ca=str(d / "ca.pem")))
    w, port, _ = start_server(cfg)
    if shared:
        fport, port = port, w.direct_port

    def channel(p, who):
        creds = grpc.ssl_channel_credentials((d / "ca.pem").read_bytes(), (d / f"{who}.key").read_bytes(),
                                             (d / f"{who}.pem").read_bytes())
        return grpc.secure_channel(f"localhost:{p}", creds)

    try:
        assert w.wait_loaded(120), w.load_error
        with channel(fport, "client") as front_ch, channel(port, "client") as direct_ch:
            front, direct = pb_grpc.WorkerStub(front_ch), pb_grpc.WorkerStub(direct_ch)
            _until_answers(lambda: health_pb2_grpc.HealthStub(front_ch).Check(health_pb2.HealthCheckRequest(),
                                                                              timeout=5))
            req = pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 5, 9]), request_id="tls-1",
                                    stopping=pb.StoppingCriteria(max_tokens=4000, ignore_eos=True))
            relayed = w.frontends.target.calls
            call = front.Execute(req, timeout=60)
            assert next(call).WhichOneof("event") == "started"
            assert w.frontends.target.calls == relayed + 1  # it came through the front end
            direct.Cancel(pb.CancelRequest(request_id="tls-1"), timeout=30)  # the same client: cn:client-a
            assert list(call)[-1].finished.reason == pb.FINISH_REASON_CANCELLED
        with channel(fport, "rogue") as rogue_ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.WorkerStub(rogue_ch).Tokenize(pb.TokenizeRequest(text="hi"), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        w.stop(1)


def test_a_front_end_that_dies_mid_stream_leaves_nothing_behind(worker):
    """Killing the front end under an open stream: the client's call fails, the worker abandons
    the request (its relay stream closed), and the replacement front end serves the next call."""
    w, _, front, _ = worker
    call = front.Execute(LONG, metadata=_auth(TOKEN_A), timeout=60)
    _until_first_token(call)
    assert w.scheduler.stats()["live"] == 1
    w.frontends._procs[0].kill()
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    _until_idle(w)
    # the replacement (started after a second) takes the port
    assert len(_tokens(_until_answers(lambda: _execute(front, n=3), timeout=30))) == 3


def test_front_ends_on_a_tls_port_without_its_files_are_refused_before_anything_is_held(tmp_path):
    """Front ends load the port's certificate files themselves: TLS credentials without tls_files
    are a configuration error, raised before the worker holds its port."""
    port = free_port()
    cfg = ServerConfig(host="127.0.0.1", port=port, model_dirs=[str(tmp_path)], backend="cpu", frontends=1,
                       credentials=grpc.ssl_server_credentials([(b"key", b"cert")]))
    with pytest.raises(ValueError, match="tls_files"):
        start_server(cfg)
    with socket.socket() as s:  # nothing kept the port
        s.bind(("127.0.0.1", port))
