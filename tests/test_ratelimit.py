"""Per-client rate limits and usage accounting: buckets on a fake clock, and the interceptor on a
real loopback grpc server (refusal status, retry-after-ms trailer, per-client counters)."""
from __future__ import annotations

import argparse
import concurrent.futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from orcd_grpc import ratelimit, security
from orcd_grpc.proto import pb
from orcd_grpc.ratelimit import RateLimiter, RateLimits, TokenBucket

TOKEN_A = "tok-alice-0123456789abcdef"
TOKEN_B = "tok-bob-0123456789abcdefgh"


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# ---- buckets and the limiter ---------------------------------------------------------------------


def test_bucket_burst_then_refill_at_rate():
    b = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [b.take(1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(1, 0.0) == pytest.approx(0.5)     # one token at 2/s
    assert b.take(1, 0.25) == pytest.approx(0.25)   # half-way there; nothing taken
    assert b.take(1, 0.5) == 0.0
    b.refill(100.0)
    assert b.level == 3.0                            # never above the burst


def test_bucket_clock_stepping_back_mints_nothing():
    b = TokenBucket(rate=1.0, burst=1.0, now=10.0)
    assert b.take(1, 10.0) == 0.0
    assert b.take(1, 5.0) == pytest.approx(1.0)
    assert b.take(1, 10.5) == pytest.approx(0.5)


def test_request_limit_is_per_client_and_reports_the_wait():
    clock = FakeClock()
    lim = RateLimiter(RateLimits(requests_per_s=1, request_burst=2), clock=clock)
    assert lim.admit("a") is None and lim.admit("a") is None
    r = lim.admit("a")
    assert r is not None and r.limit == "requests" and r.retry_after_ms == 1000
    assert "client a exceeded 1 requests/s (burst 2)" in r.message(lim.limits)
    assert lim.admit("b") is None                    # another client has its own bucket
    clock.advance(0.4)
    assert lim.admit("a").retry_after_ms == 600
    clock.advance(0.6)
    assert lim.admit("a") is None


def test_generated_tokens_go_into_debt_and_block_until_repaid():
    clock = FakeClock()
    lim = RateLimiter(RateLimits(tokens_per_s=10, token_burst=20), clock=clock)
    assert lim.admit("a") is None
    lim.charge_tokens("a", 50)                       # the stream produced more than the burst
    r = lim.admit("a")
    assert r.limit == "tokens" and r.retry_after_ms == 3001  # 30 tokens of debt at 10/s
    clock.advance(2.0)
    assert lim.admit("a").retry_after_ms == 1001
    clock.advance(1.01)
    assert lim.admit("a") is None
    assert lim.admit("b") is None


def test_token_debt_refusal_does_not_spend_a_request_token():
    clock = FakeClock()
    lim = RateLimiter(RateLimits(requests_per_s=1, request_burst=1, tokens_per_s=1, token_burst=1), clock=clock)
    lim.charge_tokens("a", 3)                        # 2 tokens of debt: 2 s
    for _ in range(5):
        assert lim.admit("a").limit == "tokens"
    clock.advance(2.01)
    assert lim.admit("a") is None                    # the request bucket is still full


def test_overrides_and_client_cap():
    clock = FakeClock()
    lim = RateLimiter(RateLimits(requests_per_s=1, request_burst=1), clock=clock, max_clients=3,
                      overrides={"vip": RateLimits(requests_per_s=100, request_burst=100)})
    assert all(lim.admit("vip") is None for _ in range(50))
    for c in ("c1", "c2", "c3", "c4"):
        lim.admit(c)
    assert lim.clients() == 3


def test_limits_validation_and_defaults():
    assert RateLimits(requests_per_s=5).request_burst == 5
    assert RateLimits(requests_per_s=0.2).request_burst == 1
    assert RateLimits(tokens_per_s=50).token_burst == 500
    assert not RateLimits().enabled
    with pytest.raises(ValueError, match="tokens_per_s"):
        RateLimits(tokens_per_s=-1)
    with pytest.raises(ValueError, match="requests_per_s"):
        RateLimits(requests_per_s=float("nan"))


def test_limits_from_flags_and_environment():
    p = argparse.ArgumentParser()
    ratelimit.add_arguments(p)
    lim = ratelimit.limits_from_args(p.parse_args(["--rate-limit-rps", "3"]),
                                     environ={"ORCD_RATE_LIMIT_RPS": "9", "ORCD_RATE_LIMIT_TOKENS": "40"})
    assert (lim.requests_per_s, lim.request_burst, lim.tokens_per_s, lim.token_burst) == (3, 3, 40, 400)
    with pytest.raises(ValueError, match="ORCD_RATE_LIMIT_TOKENS"):
        ratelimit.limits_from_args(p.parse_args([]), environ={"ORCD_RATE_LIMIT_TOKENS": "lots"})


# ---- the interceptor on a real server ------------------------------------------------------------

PING = "/orcd.test.Ping/Ping"


def _execute(request, context):
    # generates 3 tokens, or fewer when max_tokens says so (as the scheduler would)
    n = min(3, request.stopping.max_tokens or 3)
    yield pb.ExecuteResponse(started=pb.Started(request_id="r", prompt_tokens=5))
    for i in range(n):
        yield pb.ExecuteResponse(token=pb.Token(text="x", token_id=i, index=i))
    yield pb.ExecuteResponse(finished=pb.Finished())


class _Handlers(grpc.GenericRpcHandler):
    def service(self, details):
        if details.method == PING:
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"pong")
        if details.method == ratelimit.EXECUTE_METHOD:
            return grpc.unary_stream_rpc_method_handler(_execute, request_deserializer=pb.ExecuteRequest.FromString,
                                                        response_serializer=pb.ExecuteResponse.SerializeToString)
        return None


@pytest.fixture
def limited_server():
    started = []

    def start(limits, tokens=None):
        clock = FakeClock()
        registry = CollectorRegistry()
        icp = ratelimit.build_interceptor(limits, registry, clock=clock)
        interceptors = [security.AuthInterceptor(tokens)] if tokens else []
        pool = concurrent.futures.ThreadPoolExecutor(4)
        server = grpc.server(pool, interceptors=interceptors + [icp])
        server.add_generic_rpc_handlers((_Handlers(),))
        h = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(h, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, pool))
        return grpc.insecure_channel(f"127.0.0.1:{port}"), clock, registry

    yield start
    for server, pool in started:
        server.stop(0).wait()
        pool.shutdown(wait=False)


def _ping(ch, client=None, token=None):
    md = ([("x-client-id", client)] if client else []) + ([("authorization", f"Bearer {token}")] if token else [])
    return ch.unary_unary(PING).with_call(b"", metadata=md, timeout=10)


def test_interceptor_refuses_with_resource_exhausted_and_retry_after(limited_server):
    ch, clock, registry = limited_server(RateLimits(requests_per_s=2, request_burst=2),
                                         tokens={TOKEN_A: "a", TOKEN_B: "b"})
    assert _ping(ch, token=TOKEN_A)[0] == b"pong" and _ping(ch, token=TOKEN_A)[0] == b"pong"
    with pytest.raises(grpc.RpcError) as err:
        _ping(ch, token=TOKEN_A)
    e = err.value
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "client a exceeded 2 requests/s" in e.details()
    assert dict(e.trailing_metadata())["retry-after-ms"] == "500"
    assert _ping(ch, token=TOKEN_B)[0] == b"pong"    # another client is unaffected
    clock.advance(0.5)
    assert _ping(ch, token=TOKEN_A)[0] == b"pong"
    # probes are never limited
    for _ in range(10):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    get = registry.get_sample_value
    assert get("orcd_client_requests_total", {"client": "a"}) == 3
    assert get("orcd_client_requests_total", {"client": "b"}) == 1
    assert get("orcd_client_rate_limited_total", {"client": "a", "limit": "requests"}) == 1


def test_rotating_x_client_id_does_not_escape_the_request_limit(limited_server):
    """Without tokens the declared x-client-id is not trusted: every call from this address draws
    from one bucket, whatever id it names."""
    ch, _, registry = limited_server(RateLimits(requests_per_s=0.01, request_burst=2))
    assert _ping(ch, "a")[0] == b"pong" and _ping(ch, "b")[0] == b"pong"
    with pytest.raises(grpc.RpcError) as err:
        _ping(ch, "c")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "client peer:127.0.0.1 exceeded" in err.value.details()
    assert registry.get_sample_value("orcd_client_requests_total", {"client": "peer:127.0.0.1"}) == 2


def test_interceptor_reserves_max_tokens_and_refunds_what_was_not_generated(limited_server):
    ch, clock, registry = limited_server(RateLimits(tokens_per_s=1, token_burst=4), tokens={TOKEN_A: "alice"})
    md = [("authorization", f"Bearer {TOKEN_A}"), ("x-client-id", "spoof")]
    execute = ch.unary_stream(ratelimit.EXECUTE_METHOD, request_serializer=pb.ExecuteRequest.SerializeToString,
                              response_deserializer=pb.ExecuteResponse.FromString)

    def req(max_tokens):
        return pb.ExecuteRequest(text="x", stopping=pb.StoppingCriteria(max_tokens=max_tokens))

    # max_tokens 0 reserves the whole burst (4) and generates 3: 1 token is refunded
    events = [r.WhichOneof("event") for r in execute(req(0), metadata=md, timeout=10)]
    assert events == ["started", "token", "token", "token", "finished"]
    get = registry.get_sample_value
    assert get("orcd_client_generated_tokens_total", {"client": "alice"}) == 3
    assert get("orcd_client_prompt_tokens_total", {"client": "alice"}) == 5
    assert get("orcd_client_generated_tokens_total", {"client": "id:spoof"}) is None
    # level 1 cannot cover a reservation of 2: refused before anything runs, and told how long
    with pytest.raises(grpc.RpcError) as err:
        list(execute(req(2), metadata=md, timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "client alice exceeded 1 generated tokens/s" in err.value.details()
    assert dict(err.value.trailing_metadata())["retry-after-ms"] == "1001"
    assert len(list(execute(req(1), metadata=md, timeout=10))) == 3  # but 1 fits
    # more than the burst could never be served: OUT_OF_RANGE, nothing reserved or counted
    with pytest.raises(grpc.RpcError) as err:
        list(execute(req(5), metadata=md, timeout=10))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "at most 4" in err.value.details()
    clock.advance(2.0)  # the refill, not a lockout: 2 s at 1 token/s
    assert len(list(execute(req(2), metadata=md, timeout=10))) == 4
    assert get("orcd_client_rate_limited_total", {"client": "alice", "limit": "tokens"}) == 1
    assert get("orcd_client_generated_tokens_total", {"client": "alice"}) == 6


def test_limiter_reservations_cannot_be_overdrawn_by_a_burst():
    clock = FakeClock()
    rl = RateLimiter(RateLimits(tokens_per_s=1, token_burst=10), clock=clock)
    admitted = [rl.reserve("a", 3) is None for _ in range(20)]
    assert admitted.count(True) == 3      # 3 x 3 of 10; the rest are refused, nothing in debt
    refusal = rl.reserve("a", 3)
    assert refusal.limit == "tokens" and refusal.retry_after_s == pytest.approx(2.001)
    for _ in range(3):
        rl.settle("a", 3, 1)              # each generated 1: 2 refunded each
    assert rl.reserve("a", 7) is None     # 1 + 6 refunded = 7
    rl.settle("a", 7, 7)
    rl.settle("a", 0, 0)
    assert rl.reserve("a", 1) is not None  # nothing minted by settling twice


def test_usage_is_counted_without_limits_and_labels_are_capped():
    registry = CollectorRegistry()
    usage = ratelimit.UsageMetrics(registry, max_label_clients=2)
    assert [usage.label(c) for c in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
    icp = ratelimit.build_interceptor(RateLimits())
    assert icp.limiter is None and icp.usage is None
    icp.bind_registry(registry := CollectorRegistry())
    assert icp.usage is not None and icp.usage.registry is registry


def test_real_worker_wired_through_apply_to_server_config():
    """security.apply_to_server_config fills the server's hooks; the worker binds the usage
    counters to its own registry, so they appear in its /metrics scrape."""
    server = pytest.importorskip("orcd_grpc.server")
    from orcd_grpc.proto import pb_grpc

    cfg = server.ServerConfig(host="127.0.0.1", port=0, grace_seconds=0, auth_token=TOKEN_A)
    security.apply_to_server_config(cfg, security.SecurityConfig(),
                                    RateLimits(requests_per_s=0.001, request_burst=2))
    assert cfg.auth_token is None  # the interceptor took the CLI's token over
    worker, port, _ = server.start_server(cfg)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            md = [("authorization", f"Bearer {TOKEN_A}")]
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10)
            stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 900_000
        scrape = worker.metrics.render().decode()
        assert 'orcd_client_requests_total{client="default"} 2.0' in scrape
        assert 'orcd_client_rate_limited_total{client="default",limit="requests"} 1.0' in scrape
    finally:
        worker.stop(0)


def test_apply_refuses_an_exposed_plaintext_listener():
    server = pytest.importorskip("orcd_grpc.server")
    cfg = server.ServerConfig(host="0.0.0.0", port=0)
    with pytest.raises(security.ExposureError, match="refusing to listen on 0.0.0.0"):
        security.apply_to_server_config(cfg, security.SecurityConfig())
    security.apply_to_server_config(cfg, security.SecurityConfig(insecure=True))
    assert cfg.credentials is None and len(cfg.interceptors) == 1


def test_parallel_samples_reserve_n_times_max_tokens(limited_server):
    ch, _, registry = limited_server(RateLimits(tokens_per_s=0.001, token_burst=8), tokens={TOKEN_A: "alice"})
    md = [("authorization", f"Bearer {TOKEN_A}")]
    execute = ch.unary_stream(ratelimit.EXECUTE_METHOD, request_serializer=pb.ExecuteRequest.SerializeToString,
                              response_deserializer=pb.ExecuteResponse.FromString)

    def req(n, max_tokens):
        return pb.ExecuteRequest(text="x", n=n, stopping=pb.StoppingCriteria(max_tokens=max_tokens))

    # 4 samples x 3 tokens could never fit a burst of 8: OUT_OF_RANGE naming both, nothing reserved
    with pytest.raises(grpc.RpcError) as err:
        list(execute(req(4, 3), metadata=md, timeout=10))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "x n 4 = 12" in err.value.details() and "at most 2" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(execute(req(9, 1), metadata=md, timeout=10))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and err.value.details().startswith("n: 9 samples")
    # max_tokens 0 is capped to burst / n = 2 (the handler generates min(3, max_tokens)); 4 x 2
    # reserved takes the whole burst, of which the 2 generated are kept and 6 refunded
    events = [r.WhichOneof("event") for r in execute(req(4, 0), metadata=md, timeout=10)]
    assert events == ["started", "token", "token", "finished"]
    # 6 left: 3 samples x 2 fit, 4 x 2 do not
    with pytest.raises(grpc.RpcError) as err:
        list(execute(req(4, 2), metadata=md, timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(list(execute(req(3, 2), metadata=md, timeout=10))) == 4
