"""`orcd serve` with its security and rate-limit flags: a real worker in a subprocess, serving a
tiny model, reached over real (TLS) connections; bad flag combinations exit with status 2."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from procs import free_port, stop, wait_serving  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orcd_grpc.proto import pb, pb_grpc

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKEN = "cli-token-0123456789abcdef"
SECURITY_ENV = ("ORCD_AUTH_TOKEN", "ORCD_AUTH_TOKENS", "ORCD_TLS_CERT", "ORCD_TLS_KEY", "ORCD_TLS_CLIENT_CA",
                "ORCD_INSECURE", "ORCD_RATE_LIMIT_RPS", "ORCD_RATE_LIMIT_BURST", "ORCD_RATE_LIMIT_TOKENS",
                "ORCD_RATE_LIMIT_TOKEN_BURST")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    from fuzz.fuzz_gguf import _tiny_llama

    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    _tiny_llama(str(path))
    return path


class Serve:
    """`orcd serve ARGS` on a free port; stopped with SIGTERM."""

    def __init__(self, model: pathlib.Path, *args: str, log: pathlib.Path, env: dict | None = None):
        self.port = free_port()
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orcd_grpc", "serve", "--model", str(model), "--model-dir", str(model.parent),
                 "--backend", "cpu", "--port", str(self.port), "--grace-seconds", "2", "--log-level", "warning",
                 *args], cwd=REPO, stdout=err, stderr=subprocess.STDOUT, env=env or _env())

    def wait_serving(self, channel, timeout=60.0) -> None:
        wait_serving(channel, self.proc, timeout, log=self.log)

    def stop(self) -> int:
        if self.proc.poll() is None:
            stop(self.proc, timeout=30)
        return self.proc.returncode


def _execute(stub, metadata=None):
    return list(stub.Execute(pb.ExecuteRequest(text="ab cd", sampling=pb.SamplingParams(temperature=0),
                                               stopping=pb.StoppingCriteria(max_tokens=3, ignore_eos=True)),
                             metadata=metadata, timeout=30))


def _bearer(token):
    return [("authorization", f"Bearer {token}")]


def test_serve_with_token_refuses_unauthenticated_and_serves_authenticated(tiny_model, tmp_path):
    srv = Serve(tiny_model, "--auth-token", f"{TOKEN}:tester", log=tmp_path / "serve.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            srv.wait_serving(ch)  # health stays open without a token
            stub = pb_grpc.WorkerStub(ch)
            with pytest.raises(grpc.RpcError) as missing:
                _execute(stub)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as wrong:
                _execute(stub, _bearer("not-the-token-0123456789"))
            assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
            events = _execute(stub, _bearer(TOKEN))
            assert events[-1].finished.reason == pb.FINISH_REASON_LENGTH
            assert events[-1].finished.usage.completion_tokens == 3
    finally:
        assert srv.stop() == 0
    assert TOKEN not in srv.log.read_text()  # the secret never reaches the logs


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_serve_with_tls_token_and_rate_limit(tiny_model, tmp_path):
    from test_security import _make_ca, _make_leaf

    pki = tmp_path / "pki"
    pki.mkdir()
    _make_ca(pki, "ca")
    _make_leaf(pki, "server", "ca", "localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    # TLS from the environment, the token and rate limits from flags: both routes reach the server.
    env = _env(ORCD_TLS_CERT=str(pki / "server.pem"), ORCD_TLS_KEY=str(pki / "server.key"))
    srv = Serve(tiny_model, "--auth-token", TOKEN, "--rate-limit-rps", "0.01", "--rate-limit-burst", "2",
                log=tmp_path / "serve.log", env=env)
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    try:
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as ch:
            srv.wait_serving(ch)
            stub = pb_grpc.WorkerStub(ch)
            with pytest.raises(grpc.RpcError) as missing:
                _execute(stub)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert _execute(stub, _bearer(TOKEN))[-1].finished.reason == pb.FINISH_REASON_LENGTH
            stub.ListModels(pb.ListModelsRequest(), metadata=_bearer(TOKEN), timeout=10)  # the burst's second call
            with pytest.raises(grpc.RpcError) as limited:
                _execute(stub, _bearer(TOKEN))
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit" in limited.value.details()
            assert int(dict(limited.value.trailing_metadata())["retry-after-ms"]) > 0
        # Plaintext against the TLS port gets no answer at all.
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as plain:
            with pytest.raises(grpc.RpcError) as plain_err:
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert plain_err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("args,env,message", [
    (["--host", "0.0.0.0"], {}, "refusing to listen on 0.0.0.0"),
    (["--host", "0.0.0.0", "--auth-token", TOKEN], {}, "without TLS (--tls-cert/--tls-key)"),
    (["--tls-cert", "/nonexistent/cert.pem"], {}, "--tls-cert and --tls-key must be given together"),
    (["--tls-client-ca", "/nonexistent/ca.pem"], {}, "--tls-client-ca needs --tls-cert"),
    (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], {}, "is not a readable file"),
    (["--auth-token", "short"], {}, "at least 16 characters"),
    ([], {"ORCD_AUTH_TOKENS": "short"}, "at least 16 characters"),
    (["--rate-limit-rps", "-1"], {}, "must be a finite number >= 0"),
    ([], {"ORCD_RATE_LIMIT_TOKENS": "lots"}, "is not a number"),
])
def test_bad_security_flags_exit_2(args, env, message, tmp_path):
    # Checked before the model is fetched, so no model is needed (the default one is never pulled).
    proc = subprocess.run([sys.executable, "-m", "orcd_grpc", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=_env(ORCD_MODEL_DIR=str(tmp_path), **env))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was downloaded


def test_insecure_allows_an_exposed_plaintext_listener(tmp_path, monkeypatch):
    from orcd_grpc import cli, cli_serve, ratelimit

    for var in SECURITY_ENV:
        monkeypatch.delenv(var, raising=False)

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    args = cli.build_parser().parse_args(["serve", "--host", "0.0.0.0", "--insecure", "--model", str(model)])
    cfg = cli_serve.server_config(args)
    assert cfg.host == "0.0.0.0" and cfg.credentials is None
    assert [type(i) for i in cfg.interceptors] == [ratelimit.RateLimitInterceptor]  # usage counted, no auth
