"""The operator's side of the CLI: client commands over TLS and mutual TLS, the plaintext-token
refusal, `serve` on a port in use, and `orcd load` progress written to a pipe. Each test runs the
real CLI in a subprocess against a real worker on a real socket."""
from __future__ import annotations

import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

from orcd_grpc import cli_client, security

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKEN = "cli-client-token-0123456789"
_UNSET = (*cli_client.CLIENT_ENV, security.ENV_TOKEN, security.ENV_TOKENS, security.ENV_CERT, security.ENV_KEY,
          security.ENV_CLIENT_CA, security.ENV_INSECURE)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def orcd(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m orcd_grpc ARGS` with this checkout's package and no ORCD_* security settings
    inherited from the shell."""
    base = {k: v for k, v in os.environ.items() if k not in _UNSET}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "orcd_grpc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**base, **(env or {})})


def assert_clean_error(proc: subprocess.CompletedProcess, rc: int, *fragments: str) -> None:
    assert proc.returncode == rc, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


# ---- a CA, server certificates (one named only orcd.internal) and a client certificate ---------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from test_security import _make_ca, _make_leaf

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_leaf(d, "server", "ca", "localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    _make_leaf(d, "named", "ca", "orcd.internal", "serverAuth", "DNS:orcd.internal")
    _make_leaf(d, "client", "ca", "client-a", "clientAuth")
    (d / "not-a-cert.pem").write_text("hello\n")
    return d


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    from fuzz.fuzz_gguf import _tiny_llama

    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    _tiny_llama(str(path))
    return path


def start_worker(model: pathlib.Path, *, pki=None, cert="server", mtls=False, tokens=None, host="127.0.0.1"):
    """A real worker (in this process, CPU backend) serving `model`; returns (worker, port)."""
    from orcd_grpc.server import ServerConfig, start_server

    sec = security.SecurityConfig(tls_cert=str(pki / f"{cert}.pem") if pki else None,
                                  tls_key=str(pki / f"{cert}.key") if pki else None,
                                  tls_client_ca=str(pki / "ca.pem") if mtls else None,
                                  tokens=security.parse_tokens(tokens) if tokens else {})
    worker, port, _ = start_server(ServerConfig(
        host=host, port=0, model_path=str(model), model_dirs=[str(model.parent)], backend="cpu",
        grace_seconds=0, credentials=security.server_credentials(sec),
        interceptors=security.build_interceptors(sec)))
    assert worker.wait_loaded(60), worker.load_error
    return worker, port


@pytest.fixture
def worker_at():
    started = []

    def start(*args, **kw):
        w, port = start_worker(*args, **kw)
        started.append(w)
        return port

    yield start
    for w in started:
        w.stop(0)


GEN = ("generate", "ab cd", "--temperature", "0", "--max-tokens", "3", "--ignore-eos", "--timeout", "30")


# ---- TLS -------------------------------------------------------------------------------------


@needs_openssl
def test_client_commands_speak_tls_with_tls_ca(pki, tiny_model, worker_at):
    port = worker_at(tiny_model, pki=pki)
    address = f"127.0.0.1:{port}"
    proc = orcd(*GEN, "--address", address, "--tls-ca", str(pki / "ca.pem"))
    assert proc.returncode == 0, proc.stderr
    assert "3 generated tokens" in proc.stderr
    proc = orcd("list", "--address", address, "--tls-ca", str(pki / "ca.pem"))
    assert proc.returncode == 0 and "tiny: llama" in proc.stdout, proc.stderr
    # The CA from the environment works as the flag does.
    proc = orcd("info", "--address", address, env={"ORCD_TLS_CA": str(pki / "ca.pem")})
    assert proc.returncode == 0, proc.stderr
    # Plaintext to the TLS port gets no answer.
    proc = orcd("list", "--address", address, "--timeout", "5")
    assert_clean_error(proc, 1)
    assert proc.stderr.startswith(("error: UNAVAILABLE: ", "error: DEADLINE_EXCEEDED: ")), proc.stderr


@needs_openssl
def test_client_commands_speak_mutual_tls(pki, tiny_model, worker_at):
    port = worker_at(tiny_model, pki=pki, mtls=True, tokens=f"{TOKEN}:ops")
    address = f"127.0.0.1:{port}"
    ca, cert, key = (str(pki / n) for n in ("ca.pem", "client.pem", "client.key"))
    proc = orcd(*GEN, "--address", address, "--tls-ca", ca, "--tls-client-cert", cert, "--tls-client-key", key,
                "--auth-token", TOKEN)
    assert proc.returncode == 0, proc.stderr
    proc = orcd("list", "--address", address, "--auth-token", TOKEN,
                env={"ORCD_TLS_CA": ca, "ORCD_TLS_CLIENT_CERT": cert, "ORCD_TLS_CLIENT_KEY": key})
    assert proc.returncode == 0 and "tiny: llama" in proc.stdout, proc.stderr
    # Without a client certificate the handshake fails.
    proc = orcd("list", "--address", address, "--tls-ca", ca, "--auth-token", TOKEN, "--timeout", "5")
    assert_clean_error(proc, 1, "UNAVAILABLE")


@needs_openssl
def test_tls_server_name_overrides_the_expected_name(pki, tiny_model, worker_at):
    port = worker_at(tiny_model, pki=pki, cert="named")
    address = f"127.0.0.1:{port}"
    proc = orcd("list", "--address", address, "--tls-ca", str(pki / "ca.pem"), "--timeout", "5")
    assert_clean_error(proc, 1, "UNAVAILABLE")  # the certificate is not 127.0.0.1's
    proc = orcd("list", "--address", address, "--tls-ca", str(pki / "ca.pem"), "--tls-server-name", "orcd.internal")
    assert proc.returncode == 0 and "tiny: llama" in proc.stdout, proc.stderr


@needs_openssl
@pytest.mark.parametrize("flags,message", [
    (["--tls-client-cert", "client.pem"], "must be given together"),
    (["--tls-client-key", "client.key"], "must be given together"),
    (["--tls-ca", "missing.pem"], "tls_ca (--tls-ca): cannot read"),
    (["--tls-ca", "not-a-cert.pem"], "not a PEM certificate file"),
    (["--tls-ca", "ca.pem", "--tls-client-cert", "client.pem", "--tls-client-key", "client.pem"],
     "not a PEM private key file"),
    (["--tls-server-name", "orcd.internal"], "needs TLS"),
])
def test_bad_client_tls_flags_exit_2(pki, flags, message):
    flags = [str(pki / f) if f.endswith((".pem", ".key")) else f for f in flags]
    assert_clean_error(orcd("list", "--address", "127.0.0.1:1", *flags), 2, message)


# ---- a bearer token never travels in plaintext to another machine unless --insecure says so ------


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: picks the outgoing interface, sends nothing
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_token_in_plaintext_to_a_non_loopback_address_is_refused(tiny_model, worker_at):
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    port = worker_at(tiny_model, tokens=f"{TOKEN}:ops", host="0.0.0.0")
    proc = orcd("list", "--address", f"{ip}:{port}", "--auth-token", TOKEN)
    assert_clean_error(proc, 2, "refusing to send a bearer token in plaintext", "--insecure")
    assert TOKEN not in proc.stderr
    proc = orcd("list", "--address", f"{ip}:{port}", "--auth-token", TOKEN, "--insecure")
    assert proc.returncode == 0 and "tiny: llama" in proc.stdout, proc.stderr
    proc = orcd("list", "--address", f"127.0.0.1:{port}", env={"ORCD_AUTH_TOKEN": TOKEN})  # loopback: fine
    assert proc.returncode == 0 and "tiny: llama" in proc.stdout, proc.stderr


# ---- serve on a port in use ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_serve_on_a_port_in_use_is_a_clean_error(tmp_path, which):
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        ports = {"--port": free.getsockname()[1], "--metrics-port": free.getsockname()[1]}
        ports[which] = taken.getsockname()[1]
        free.close()
        proc = orcd("serve", "--host", "127.0.0.1", "--port", str(ports["--port"]),
                    *(["--metrics-port", str(ports["--metrics-port"])] if which == "--metrics-port" else []),
                    env={"ORCD_MODEL_DIR": str(tmp_path)})
    assert_clean_error(proc, 2, f"{which}: cannot listen on 127.0.0.1:{ports[which]}: the port is in use")
    assert not list(tmp_path.iterdir())  # refused before any model was fetched


def test_worker_bind_failure_is_a_typed_error():
    from orcd_grpc.server import BindError, ServerConfig, Worker

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BindError, match="cannot listen on 127.0.0.1:"):
            Worker(ServerConfig(host="127.0.0.1", port=taken.getsockname()[1]))


# ---- load progress -------------------------------------------------------------------------------


def test_load_progress_into_a_pipe_is_a_few_plain_lines(tiny_model, worker_at):
    port = worker_at(tiny_model)
    proc = orcd("load", str(tiny_model), "--model-id", "again", "--address", f"127.0.0.1:{port}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("again: llama")
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert 2 <= len(lines) <= 6 and len(proc.stderr) < 400, proc.stderr
    assert lines[-1] == "ready 0.0 MiB" or lines[-1].startswith("ready "), proc.stderr
    assert any(line.startswith("loading ") and line.endswith(" MiB") for line in lines), proc.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_load_progress_on_a_terminal_is_a_tqdm_bar_redrawn_in_place():
    from orcd_grpc.progress import LoadProgress

    out = _Terminal()
    bar = LoadProgress(out)
    bar.update("opening", 0, 0)
    for done in range(0, 200 * 2**20 + 1, 2**20):
        bar.update("loading", done, 200 * 2**20)
    bar.update("ready", 200 * 2**20, 200 * 2**20)
    bar.finish()
    text = out.getvalue()
    assert text.count("\r") >= 2 and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("ready") and "100%" in last and "200M/200M" in last and "iB/s" in last, last


def test_load_progress_off_a_terminal_writes_one_line_per_stage():
    from orcd_grpc.progress import LoadProgress

    out = io.StringIO()
    bar = LoadProgress(out)
    bar.update("opening", 0, 0)
    for done in range(0, 101):
        bar.update("loading", done * 2**20, 100 * 2**20)
    bar.update("ready", 100 * 2**20, 100 * 2**20)
    bar.finish()
    assert out.getvalue() == "opening\nloading 100.0 MiB\nready 100.0 MiB\n"
