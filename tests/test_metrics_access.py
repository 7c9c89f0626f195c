"""The metrics port under the exposure policy (issue #15): off loopback it needs TLS and a
metrics-role token, /metrics takes only metrics tokens, and unknown paths are 404. A real worker
(no model needed) on real sockets; the CLI's refusals in a subprocess."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from orcd_grpc import security
from orcd_grpc.server import ServerConfig, start_server
from procs import free_port
from test_cli_security import REPO, TOKEN, _env

ALICE = "tok-alice-0123456789abcdef"
PROM = "tok-prom-0123456789abcdefg"
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def get(url, token=None, context=None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def worker():
    made = []

    def start(sec: security.SecurityConfig, **kw):
        cfg = ServerConfig(host="127.0.0.1", port=0, grace_seconds=0, metrics_port=0, **kw)
        security.apply_to_server_config(cfg, sec)
        w, _, _ = start_server(cfg)
        made.append(w)
        return w

    yield start
    for w in made:
        w.stop(0)


def test_unknown_paths_are_404_not_the_scrape(worker):
    w = worker(security.SecurityConfig())  # loopback, no tokens: open as before
    base = f"http://127.0.0.1:{w.metrics_port}"
    status, body = get(base + "/metrics")
    assert status == 200 and "orcd_queue_depth" in body
    assert get(base + "/healthz")[0] == 503  # no model loaded
    for path in ("/", "/admin", "/metrics/x", "/favicon.ico"):
        status, body = get(base + path)
        assert status == 404 and "orcd_" not in body, path


@needs_openssl
def test_exposed_metrics_port_speaks_tls_and_takes_only_metrics_tokens(worker, tmp_path):
    from test_security import _make_ca, _make_leaf

    _make_ca(tmp_path, "ca")
    _make_leaf(tmp_path, "server", "ca", "localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    tokens = f"{ALICE}:alice,{PROM}:prom:metrics"
    sec = security.SecurityConfig(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key"),
                                  tokens=security.parse_tokens(tokens), roles=security.parse_token_roles(tokens))
    w = worker(sec, metrics_host="0.0.0.0")
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    base = f"https://localhost:{w.metrics_port}"
    assert get(base + "/metrics", context=ctx)[0] == 401          # no token
    assert get(base + "/metrics", ALICE, context=ctx)[0] == 403   # an infer token does not scrape
    status, body = get(base + "/metrics", PROM, context=ctx)
    assert status == 200 and "orcd_queue_depth" in body
    assert get(base + "/healthz", context=ctx)[0] == 503          # the probe stays open, over TLS
    assert get(base + "/nope", PROM, context=ctx)[0] == 404
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # plaintext gets nothing
        get(f"http://127.0.0.1:{w.metrics_port}/metrics", PROM)


def test_apply_refuses_an_exposed_metrics_port_without_tls_and_a_metrics_token(tmp_path):
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, metrics_host="0.0.0.0")
    with pytest.raises(security.ExposureError, match="refusing to serve metrics on 0.0.0.0"):
        security.apply_to_server_config(cfg, security.SecurityConfig())
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, metrics_host="0.0.0.0")
    security.apply_to_server_config(cfg, security.SecurityConfig(insecure=True))  # deliberate


@pytest.mark.parametrize("args,message", [
    (["--metrics-port", "0", "--metrics-host", "0.0.0.0"],
     "refusing to serve metrics on 0.0.0.0 (reachable from other machines) without TLS"),
    (["--metrics-port", "0", "--metrics-host", "0.0.0.0", "--auth-token", f"{TOKEN}:prom:metrics"],
     "refusing to serve metrics on 0.0.0.0 (reachable from other machines) without TLS (--tls-cert/--tls-key);"),
    (["--auth-token", f"{TOKEN}:ops:root"], "unknown role 'root'"),
])
def test_serve_refuses_an_exposed_metrics_port_exit_2(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orcd_grpc", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=_env(ORCD_MODEL_DIR=str(tmp_path)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # refused before any model was fetched


@needs_openssl
def test_serve_on_all_interfaces_with_tls_and_token_still_needs_a_metrics_token(tmp_path):
    from test_security import _make_ca, _make_leaf

    _make_ca(tmp_path, "ca")
    _make_leaf(tmp_path, "server", "ca", "localhost", "serverAuth", "DNS:localhost")
    proc = subprocess.run(
        [sys.executable, "-m", "orcd_grpc", "serve", "--port", str(free_port()), "--host", "0.0.0.0",
         "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
         "--auth-token", TOKEN, "--metrics-port", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=_env(ORCD_MODEL_DIR=str(tmp_path / "m")))
    assert proc.returncode == 2, proc.stderr
    assert "without a token with the metrics role" in proc.stderr, proc.stderr
