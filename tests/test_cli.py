"""The `orcd` command: argument parsing, local commands, and a real worker in a subprocess."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from procs import free_port, stop  # noqa: E402

import orcd_grpc
from orcd_grpc import cli, cli_client, cli_serve, model_store
from orcd_grpc.proto import pb

REPO = pathlib.Path(__file__).resolve().parents[1]


def orcd(*args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Runs `python -m orcd_grpc ARGS` the way a user runs `orcd ARGS`."""
    return subprocess.run([sys.executable, "-m", "orcd_grpc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}, **kw)


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("24GB", 24 * 10**9), ("24G", 24 * 10**9), ("20GiB", 20 * 2**30), ("512MiB", 512 * 2**20),
    ("1.5GiB", int(1.5 * 2**30)), ("1000", 1000), ("64kb", 64000), ("2 TiB", 2 * 2**40),
])
def test_parse_size(text, expected):
    assert cli_serve.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "24XB", "-1GB", "24iB", "lots"])
def test_parse_size_rejects(text):
    with pytest.raises(Exception, match="not a size"):
        cli_serve.parse_size(text)


def test_serve_flags():
    args = cli.build_parser().parse_args([
        "serve", "--model", "gemma-3-270m", "--host", "0.0.0.0", "--port", "6000", "--backend", "cpu",
        "--model-dir", "/a", "--model-dir", "/b", "--max-vram", "24GB", "--context-length", "4096",
        "--max-queue", "32", "--metrics-port", "9100", "--grace-seconds", "5", "--log-level", "debug"])
    assert (args.model, args.host, args.port, args.backend) == ("gemma-3-270m", "0.0.0.0", 6000, "cpu")
    assert args.model_dir == ["/a", "/b"] and args.max_vram == 24 * 10**9
    assert (args.context_length, args.max_queue, args.metrics_port, args.grace_seconds) == (4096, 32, 9100, 5.0)
    assert args.log_level == "debug"


def test_serve_defaults():
    args = cli.build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.backend, args.max_vram) == (None, "127.0.0.1", 50051, "auto", 0)


def test_server_config_from_flags(tmp_path, monkeypatch):
    pytest.importorskip("orcd_grpc.server")
    from orcd_grpc.server import ServerConfig

    for var in ("ORCD_AUTH_TOKEN", "ORCD_AUTH_TOKENS", "ORCD_TLS_CERT", "ORCD_TLS_KEY", "ORCD_TLS_CLIENT_CA"):
        monkeypatch.delenv(var, raising=False)
    model = tmp_path / "elsewhere" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    args = cli.build_parser().parse_args([
        "serve", "--model", str(model), "--model-dir", str(tmp_path / "dir"), "--port", "6001",
        "--max-vram", "2GiB", "--max-queue", "7", "--auth-token", "s3cret-0123456789abcdef", "--model-id", "mine",
        "--token-budget", "512"])
    cfg = cli_serve.server_config(args)
    assert cfg.token_budget == 512
    assert cfg.model_path == str(model.resolve()) and cfg.model_id == "mine"
    # The model's own directory is allowed in addition to the named ones.
    assert cfg.model_dirs == [str(tmp_path / "dir"), str(model.parent.resolve())]
    assert (cfg.port, cfg.max_vram, cfg.max_queue) == (6001, 2 << 30, 7)
    # The token is checked by security's interceptor (the legacy single-token check stays off).
    from orcd_grpc import ratelimit, security

    assert cfg.auth_token is None and cfg.credentials is None
    assert [type(i) for i in cfg.interceptors] == [security.AuthInterceptor, ratelimit.RateLimitInterceptor]
    assert cfg.host == "127.0.0.1"
    # Flags not given keep the server's defaults.
    defaults = ServerConfig()
    assert (cfg.grace_seconds, cfg.max_sequences, cfg.metrics_port) == (
        defaults.grace_seconds, defaults.max_sequences, defaults.metrics_port)
    with pytest.raises(SystemExit):  # a budget must be a positive count
        cli.build_parser().parse_args(["serve", "--token-budget", "0"])


def test_server_config_relative_model_in_model_dir(tmp_path):
    pytest.importorskip("orcd_grpc.server")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    args = cli.build_parser().parse_args(["serve", "--model-dir", str(tmp_path), "--model", "m.gguf"])
    cfg = cli_serve.server_config(args)
    assert cfg.model_path == str((tmp_path / "m.gguf").resolve()) and cfg.model_dirs == [str(tmp_path)]


def test_generate_request_from_flags():
    args = cli.build_parser().parse_args([
        "generate", "Hello", "--temperature", "0", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.05",
        "--seed", "7", "--max-tokens", "8", "--stop", "\n", "--stop", "END"])
    req = cli.generate_request(args)
    assert req.text == "Hello"
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert (req.sampling.top_k, req.sampling.seed) == (40, 7)
    assert req.sampling.top_p == pytest.approx(0.9) and req.sampling.min_p == pytest.approx(0.05)
    assert req.stopping.max_tokens == 8 and list(req.stopping.stop) == ["\n", "END"]
    assert args.address == os.environ.get("ORCD_ADDRESS", cli_client.DEFAULT_ADDRESS)


def test_generate_request_defaults_leave_fields_unset():
    req = cli.generate_request(cli.build_parser().parse_args(["generate", "Hi"]))
    assert not req.HasField("sampling") and not req.HasField("stopping")


def test_generate_chat_request():
    args = cli.build_parser().parse_args(["generate", "Hi there", "--chat", "--system", "Be brief."])
    req = cli.generate_request(args)
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "Be brief."), ("user", "Hi there")]


def test_bad_flags_exit_2():
    proc = orcd("serve", "--backend", "tpu")
    assert proc.returncode == 2 and "--backend" in proc.stderr
    proc = orcd("serve", "--port", "70000")
    assert proc.returncode == 2 and "not a port number" in proc.stderr


def test_version():
    proc = orcd("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"orcd {orcd_grpc.__version__}"


# --- local commands --------------------------------------------------------------------------


def test_models_list(tmp_path):
    store = tmp_path / "models"
    store.mkdir()
    (store / "gemma-3-270m.gguf").write_bytes(b"GGUF partial")
    proc = orcd("models", "list", env={model_store.ENV_MODEL_DIR: str(store)})
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line and not line[0].isspace()}
    assert f"{store}" in lines["model"]
    assert "not cached" in lines["smollm2-135m-instruct"]
    assert str(store / "smollm2-135m-instruct.gguf") in lines["smollm2-135m-instruct"]
    assert "partial/corrupt" in lines["gemma-3-270m"]


def test_models_list_shows_cached(smollm2_path):
    proc = orcd("models", "list", env={model_store.ENV_MODEL_DIR: str(smollm2_path.parent)})
    line = next(l for l in proc.stdout.splitlines() if l.startswith("smollm2-135m-instruct"))
    assert " cached " in line and "93.8 MiB" in line


def test_models_pull_unknown_name():
    proc = orcd("models", "pull", "llama-9000")
    assert proc.returncode == 2 and "smollm2-135m-instruct" in proc.stderr


def test_info_local():
    proc = orcd("info", "--local")
    assert proc.returncode == 0, proc.stderr
    assert "backend:      cpu" in proc.stdout
    assert f"python:       {sys.version.split()[0]}" in proc.stdout
    proc = orcd("info", "--local", "--json")
    info = json.loads(proc.stdout)
    assert info["backend"] == "cpu" and info["cpu"]["cores"] > 0
    assert info["build"]["version"] == orcd_grpc.__version__


def test_unreachable_worker_reports_grpc_code():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    proc = orcd("generate", "hi", "--address", f"127.0.0.1:{port}", "--timeout", "5")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: UNAVAILABLE: ") or proc.stderr.startswith("error: DEADLINE_EXCEEDED: ")


def test_serve_unknown_model_reports_known_names():
    proc = orcd("serve", "--model", "llama-9000")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: NOT_FOUND: model: ") and "smollm2-135m-instruct" in proc.stderr


def test_load_progress_off_a_terminal_is_plain_lines():
    # Was a \r-redrawn bar whatever the stream; a file or pipe now gets one line per stage
    # (tests/test_cli_client.py covers the terminal's tqdm bar).
    import io

    buf = io.StringIO()
    bar = cli.LoadProgress(buf)
    bar.update("loading", 0, 200 * 2**20)
    bar.update("loading", 100 * 2**20, 200 * 2**20)
    bar.update("ready", 200 * 2**20, 200 * 2**20)
    bar.finish()
    assert buf.getvalue() == "loading 200.0 MiB\nready 200.0 MiB\n"


# --- against a real worker -------------------------------------------------------------------


def _server_available() -> bool:
    try:
        from orcd_grpc.server import ServerConfig, serve  # noqa: F401
    except ImportError:
        return False
    return True


needs_server = pytest.mark.skipif(not _server_available(), reason="orcd_grpc.server not there yet")


@pytest.fixture(scope="module")
def worker(smollm2_path, tmp_path_factory):
    """`orcd serve` in a subprocess on a free port, serving SmolLM2 on the CPU."""
    from orcd_grpc.client import OrcdClient

    port = free_port()
    log = tmp_path_factory.mktemp("worker") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "orcd_grpc", "serve", "--model", str(smollm2_path),
                                 "--port", str(port), "--backend", "cpu",
                                 "--model-dir", str(smollm2_path.parent)],
                                cwd=REPO, stdout=err, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        with OrcdClient(address) as client:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, f"worker exited: {log.read_text()[-3000:]}"
                try:
                    client.wait_ready(timeout=1)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, f"worker not ready: {log.read_text()[-3000:]}"
        yield address, proc
    finally:
        if proc.poll() is None:
            stop(proc, timeout=60)


@needs_server
@pytest.mark.slow
def test_generate_streams_paris(worker):
    address, _ = worker
    proc = orcd("generate", "--address", address, "--temperature", "0", "--max-tokens", "8",
                "The capital of France is")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("[length;") and "8 generated tokens" in summary and "tok/s" in summary


@needs_server
@pytest.mark.slow
def test_generate_server_error_is_reported(worker):
    address, _ = worker
    proc = orcd("generate", "--address", address, "--top-p", "1.5", "hi")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: INVALID_ARGUMENT: ") and "top_p" in proc.stderr


@needs_server
@pytest.mark.slow
def test_info_and_list_from_worker(worker):
    address, _ = worker
    proc = orcd("info", "--address", address, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["backend"] == "cpu" and info["build"]["version"] == orcd_grpc.__version__
    proc = orcd("list", "--address", address)
    assert proc.returncode == 0 and "llama" in proc.stdout


@needs_server
@pytest.mark.slow
def test_python_client_against_worker(worker):
    import grpc

    from orcd_grpc.client import OrcdClient

    address, _ = worker
    with OrcdClient(address, timeout=120) as client:
        assert client.health() == "SERVING"
        assert client.health("orcd.v1.Worker") == "SERVING"
        models = client.list_models()
        assert [m.architecture for m in models] == ["llama"]
        done = client.generate_text("The capital of France is", temperature=0, max_tokens=8,
                                    request_id="cli-test-1")
        assert "Paris" in done.text and done.finish_reason == "LENGTH"
        assert done.request_id == "cli-test-1" and len(done.token_ids) == done.usage.completion_tokens == 8
        assert done.model_id == models[0].model_id
        with pytest.raises(grpc.RpcError) as exc:
            client.cancel("no-such-request")
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        # Cancel a running request from the side: its stream ends with CANCELLED.
        events = client.stream_text("Count to one thousand:", max_tokens=4000, ignore_eos=True,
                                    request_id="cli-test-2")
        assert next(events).WhichOneof("event") == "started"
        assert client.cancel("cli-test-2") is True
        last = list(events)[-1]
        assert last.finished.reason == pb.FINISH_REASON_CANCELLED


@needs_server
@pytest.mark.slow
def test_load_shows_progress(worker, smollm2_path):
    # A load replaces the served model and the unload leaves none, so this runs after the other
    # tests that use the worker.
    address, _ = worker
    proc = orcd("load", str(smollm2_path), "--model-id", "smol-again", "--context-length", "512",
                "--address", address)
    assert proc.returncode == 0, proc.stderr
    # stderr is a pipe here: plain lines, one per stage, no redraws.
    assert "\r" not in proc.stderr and proc.stderr.splitlines()[-1].startswith("ready "), proc.stderr
    assert any(line.startswith("loading ") and line.endswith(" MiB") for line in proc.stderr.splitlines())
    assert proc.stdout.startswith("smol-again: llama")
    proc = orcd("unload", "smol-again", "--address", address)
    assert proc.returncode == 0, proc.stderr


@needs_server
@pytest.mark.slow
def test_load_missing_file_reports_code(worker, smollm2_path):
    address, _ = worker
    proc = orcd("load", str(smollm2_path.parent / "no-such-model.gguf"), "--address", address)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: NOT_FOUND: ") or proc.stderr.startswith("error: INVALID_ARGUMENT: ")


@needs_server
@pytest.mark.slow
def test_demo(smollm2_path):
    proc = orcd("demo", "--backend", "cpu", "--max-tokens", "8",
                env={model_store.ENV_MODEL_DIR: str(smollm2_path.parent)}, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(cli.DEMO_PROMPT) and "Paris" in proc.stdout



def test_serve_max_prompt_bytes_flag(tmp_path):
    from orcd_grpc.server import ServerConfig

    assert cli.build_parser().parse_args(["serve"]).max_prompt_bytes is None  # the server's default
    assert ServerConfig().max_prompt_bytes == 2 * 1024 * 1024
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    for flag, want in (("4MiB", 4 * 2**20), ("0", 0)):
        args = cli.build_parser().parse_args(["serve", "--model", str(model), "--max-prompt-bytes", flag])
        assert cli_serve.server_config(args).max_prompt_bytes == want
