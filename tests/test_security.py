"""Access control over real connections: TLS, mutual TLS, bearer tokens, the exposure policy.

The tests make their own CA, server and client certificates with the openssl CLI and talk to a
real grpc server on 127.0.0.1 through real TLS channels.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from orcd_grpc import security

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")

TOKEN_A = "tok-alice-0123456789abcdef"
TOKEN_B = "tok-bob-0123456789abcdefgh"
ECHO = "/orcd.test.Echo/Who"
ECHO_STREAM = "/orcd.test.Echo/WhoStream"


# ---- certificates ------------------------------------------------------------------------------


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d, name, ca, cn, usage, san=None):
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\n" f"extendedKeyUsage={usage}\n"
                   + (f"subjectAltName={san}\n" if san else ""))
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    _make_leaf(d, "client", "ca", "client-a", "clientAuth")
    _make_leaf(d, "rogue-client", "rogue-ca", "client-a", "clientAuth")
    read = lambda n: (d / n).read_bytes()  # noqa: E731
    return {"dir": d, "ca": read("ca.pem"), "rogue_ca": read("rogue-ca.pem"),
            "client": (read("client.key"), read("client.pem")),
            "rogue_client": (read("rogue-client.key"), read("rogue-client.pem")),
            "path": lambda n: str(d / n)}


# ---- a real server with health, reflection and a method that reports who called ------------------


def _who(request: bytes, context) -> bytes:
    return security.client_identity(context).encode()


def _who_stream(request: bytes, context):
    yield security.client_identity(context).encode()
    yield b"done"


class _Echo(grpc.GenericRpcHandler):
    def service(self, details):
        if details.method == ECHO:
            return grpc.unary_unary_rpc_method_handler(_who)
        if details.method == ECHO_STREAM:
            return grpc.unary_stream_rpc_method_handler(_who_stream)
        return None


class _Server:
    def __init__(self, cfg: security.SecurityConfig):
        self.pool = concurrent.futures.ThreadPoolExecutor(4)
        self.server = grpc.server(self.pool, interceptors=security.build_interceptors(cfg))
        self.server.add_generic_rpc_handlers((_Echo(),))
        h = health.HealthServicer()
        h.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(h, self.server)
        reflection.enable_server_reflection((reflection.SERVICE_NAME, "grpc.health.v1.Health"), self.server)
        self.port = security.add_port(self.server, "127.0.0.1:0", cfg)
        assert self.port
        self.server.start()

    def stop(self):
        self.server.stop(0).wait()
        self.pool.shutdown(wait=False)


@pytest.fixture
def serve():
    servers = []

    def start(cfg):
        s = _Server(cfg)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _channel(port, *, ca=None, client=None, plaintext=False):
    target = f"localhost:{port}"
    if plaintext:
        return grpc.insecure_channel(target)
    key, cert = client if client else (None, None)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                                   certificate_chain=cert))


def _call(ch, token=None, method=ECHO, extra=()):
    md = [("authorization", f"Bearer {token}")] if token else []
    return ch.unary_unary(method)(b"", metadata=md + list(extra), timeout=10)


def _health(ch):
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _tls_cfg(pki, *, mtls=False, tokens=None):
    return security.SecurityConfig(tls_cert=pki["path"]("server.pem"), tls_key=pki["path"]("server.key"),
                                   tls_client_ca=pki["path"]("ca.pem") if mtls else None,
                                   tokens=security.parse_tokens(tokens) if tokens else {})


# ---- TLS / mTLS ----------------------------------------------------------------------------------


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(pki, serve):
    s = serve(_tls_cfg(pki))
    with _channel(s.port, ca=pki["ca"]) as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        # without tokens and without a client certificate the caller is known by address
        assert _call(ch) == b"peer:127.0.0.1"
    with _channel(s.port, plaintext=True) as ch, pytest.raises(grpc.RpcError) as err:
        _health(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with _channel(s.port, ca=pki["rogue_ca"]) as ch, pytest.raises(grpc.RpcError) as err:
        _health(ch)  # the server's certificate is not signed by the CA this client trusts
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_clients_without_a_certificate_from_the_ca(pki, serve):
    s = serve(_tls_cfg(pki, mtls=True))
    with _channel(s.port, ca=pki["ca"]) as ch, pytest.raises(grpc.RpcError) as err:
        _health(ch)  # no client certificate: the handshake fails, even health is unreachable
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with _channel(s.port, ca=pki["ca"], client=pki["rogue_client"]) as ch, pytest.raises(grpc.RpcError) as err:
        _health(ch)  # same CN, wrong issuer
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with _channel(s.port, ca=pki["ca"], client=pki["client"]) as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert _call(ch) == b"cn:client-a"  # the verified certificate names the caller


# ---- bearer tokens -------------------------------------------------------------------------------


def test_tokens_missing_wrong_and_right_over_mtls(pki, serve):
    s = serve(_tls_cfg(pki, mtls=True, tokens=f"{TOKEN_A}:alice,{TOKEN_B}"))
    with _channel(s.port, ca=pki["ca"], client=pki["client"]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _call(ch)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _call(ch, token=TOKEN_A + "x")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert TOKEN_A not in err.value.details()  # the refusal does not echo secrets
        with pytest.raises(grpc.RpcError) as err:
            _call(ch, extra=[("authorization", f"Basic {TOKEN_A}")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the token's client id outranks the certificate CN and any declared x-client-id
        assert _call(ch, token=TOKEN_A, extra=[("x-client-id", "mallory")]) == b"alice"
        assert _call(ch, token=TOKEN_B).startswith(b"token-")
        stream = ch.unary_stream(ECHO_STREAM)
        assert list(stream(b"", metadata=[("authorization", f"Bearer {TOKEN_A}")], timeout=10)) == [b"alice", b"done"]
        with pytest.raises(grpc.RpcError) as err:
            list(stream(b"", timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health and reflection stay open to callers without a token
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        names = {svc.name for svc in answers[0].list_services_response.service}
        assert "grpc.health.v1.Health" in names


def test_tokens_on_plaintext_loopback(serve):
    s = serve(security.SecurityConfig(tokens=security.parse_tokens(f"{TOKEN_A}:alice")))
    with _channel(s.port, plaintext=True) as ch:
        assert _call(ch, token=TOKEN_A) == b"alice"
        with pytest.raises(grpc.RpcError) as err:
            _call(ch, token=TOKEN_B)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_without_tokens_a_declared_client_id_is_not_an_identity(serve):
    # x-client-id is not authenticated: trusting it would let a caller rotate it past its rate
    # limit or name another caller's requests; the peer address is what the server knows.
    s = serve(security.SecurityConfig())
    with _channel(s.port, plaintext=True) as ch:
        assert _call(ch, extra=[("x-client-id", "batch-7")]) == b"peer:127.0.0.1"
        assert _call(ch) == b"peer:127.0.0.1"


def test_real_worker_over_mtls_with_token(pki):
    server = pytest.importorskip("orcd_grpc.server")
    from orcd_grpc.proto import pb, pb_grpc

    if "credentials" not in server.ServerConfig.__dataclass_fields__:
        pytest.skip("ServerConfig has no credentials hook yet")
    cfg = _tls_cfg(pki, mtls=True, tokens=f"{TOKEN_A}:alice")
    worker, port, _ = server.start_server(server.ServerConfig(
        host="127.0.0.1", port=0, credentials=security.server_credentials(cfg),
        interceptors=security.build_interceptors(cfg), grace_seconds=0))
    try:
        with _channel(port, ca=pki["ca"], client=pki["client"]) as ch:
            stub = pb_grpc.WorkerStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            resp = stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {TOKEN_A}")],
                                   timeout=10)
            assert len(resp.models) == 0
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)  # open
        with _channel(port, ca=pki["ca"]) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.WorkerStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        worker.stop(0)


def test_server_config_auth_token_is_checked_by_the_shared_interceptor():
    """ServerConfig.auth_token (a token given in code, not through the flags) is enforced by the
    same AuthInterceptor as the flags' tokens: missing, wrong and right tokens; health stays open."""
    from orcd_grpc import server
    from orcd_grpc.proto import pb, pb_grpc

    worker, port, _ = server.start_server(server.ServerConfig(host="127.0.0.1", port=0, auth_token=TOKEN_A,
                                                              grace_seconds=0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            for md, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                             ((("authorization", f"Bearer {TOKEN_B}"),), grpc.StatusCode.PERMISSION_DENIED)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10)
                assert err.value.code() == code
            ok = stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {TOKEN_A}")], timeout=10)
            assert len(ok.models) == 0
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        worker.stop(0)


# ---- configuration and exposure policy -----------------------------------------------------------


def test_parse_tokens():
    assert security.parse_tokens(f" {TOKEN_A}:alice , {TOKEN_B} ") == {
        TOKEN_A: "alice", TOKEN_B: "token-" + __import__("hashlib").sha256(TOKEN_B.encode()).hexdigest()[:8]}
    assert security.parse_tokens([f"{TOKEN_A}:alice", f"{TOKEN_B}:bob"]) == {TOKEN_A: "alice", TOKEN_B: "bob"}
    with pytest.raises(ValueError, match="at least 16"):
        security.parse_tokens("short:alice")
    with pytest.raises(ValueError, match="empty client id"):
        security.parse_tokens(f"{TOKEN_A}:")
    with pytest.raises(ValueError, match="two client ids"):
        security.parse_tokens(f"{TOKEN_A}:alice,{TOKEN_A}:bob")


def test_config_from_flags_and_environment(pki):
    p = argparse.ArgumentParser()
    security.add_arguments(p)
    cfg = security.config_from_args(p.parse_args([]), environ={
        "ORCD_TLS_CERT": pki["path"]("server.pem"), "ORCD_TLS_KEY": pki["path"]("server.key"),
        "ORCD_TLS_CLIENT_CA": pki["path"]("ca.pem"), "ORCD_AUTH_TOKENS": f"{TOKEN_A}:alice,{TOKEN_B}:bob"})
    assert cfg.mtls and cfg.tokens == {TOKEN_A: "alice", TOKEN_B: "bob"} and not cfg.insecure
    # flags win over the environment
    cfg = security.config_from_args(p.parse_args(["--auth-token", f"{TOKEN_B}:carol", "--insecure"]),
                                    environ={"ORCD_AUTH_TOKENS": f"{TOKEN_A}:alice"})
    assert cfg.tokens == {TOKEN_B: "carol"} and cfg.insecure and not cfg.tls
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        security.config_from_args(p.parse_args(["--tls-cert", pki["path"]("server.pem")]), environ={})
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        security.config_from_args(p.parse_args(["--tls-client-ca", pki["path"]("ca.pem")]), environ={})
    with pytest.raises(ValueError, match="not a readable file"):
        security.config_from_args(p.parse_args(["--tls-cert", "/nonexistent.pem", "--tls-key", "/x"]), environ={})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_may_run_without_tls_or_tokens(host):
    security.check_exposure(host, tls=False, tokens={}, insecure=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.1.2.3", "[2001:db8::1]"])
def test_exposed_listener_needs_tls_and_token_or_insecure(host):
    with pytest.raises(security.ExposureError, match=r"TLS .* and a bearer token"):
        security.check_exposure(host, tls=False, tokens={}, insecure=False)
    with pytest.raises(security.ExposureError, match="without a bearer token"):
        security.check_exposure(host, tls=True, tokens={}, insecure=False)
    with pytest.raises(security.ExposureError, match=r"without TLS \(--tls-cert/--tls-key\);"):
        security.check_exposure(host, tls=False, tokens={TOKEN_A: "a"}, insecure=False)
    security.check_exposure(host, tls=True, tokens={TOKEN_A: "a"}, insecure=False)
    security.check_exposure(host, tls=False, tokens={}, insecure=True)


def test_token_checker_finds_each_token_and_nothing_else():
    checker = security.TokenChecker({TOKEN_A: "alice", TOKEN_B: "bob"})
    assert checker.client_for(TOKEN_A) == "alice" and checker.client_for(TOKEN_B) == "bob"
    for wrong in ("", TOKEN_A[:-1], TOKEN_A + "a", TOKEN_A.upper(), TOKEN_B[1:]):
        assert checker.client_for(wrong) is None


def test_parse_token_roles():
    specs = security.parse_token_specs(f"{TOKEN_A}:alice,{TOKEN_B}:ops:admin+infer,{TOKEN_A[::-1]}::metrics")
    assert specs[TOKEN_A] == ("alice", frozenset({"infer"}))  # an existing TOKEN:CLIENT spec only infers
    assert specs[TOKEN_B] == ("ops", frozenset({"admin", "infer"}))
    assert specs[TOKEN_A[::-1]][0].startswith("token-") and specs[TOKEN_A[::-1]][1] == {"metrics"}
    with pytest.raises(ValueError, match="unknown role 'root'"):
        security.parse_token_specs(f"{TOKEN_A}:alice:infer+root")
    with pytest.raises(ValueError, match="tokens may not contain ':'"):
        security.parse_token_specs(f"to:{TOKEN_A}:alice:admin")
    with pytest.raises(ValueError, match="different roles"):
        security.parse_token_specs(f"{TOKEN_A}:alice:admin,{TOKEN_A}:alice")
    p = argparse.ArgumentParser()
    security.add_arguments(p)
    cfg = security.config_from_args(p.parse_args([]), environ={"ORCD_AUTH_TOKENS": f"{TOKEN_A}:alice:admin"})
    assert cfg.tokens == {TOKEN_A: "alice"} and cfg.roles == {TOKEN_A: frozenset({"admin"})}
    assert security.authorize("/orcd.v1.Worker/LoadModel", "alice", frozenset({"admin"})) is None
    denied = security.authorize("/orcd.v1.Worker/LoadModel", "bob", frozenset({"infer"}))
    assert "LoadModel needs the admin role" in denied and "TOKEN:CLIENT:admin+infer" in denied
