"""The TypeScript and Go clients, built and tested against one live worker.

Each test runs `clients/ci.sh ts|go` (generate, build, the example, then the client's own test
suite: node --test / go test) with ORCD_ADDRESS pointing at a worker this module starts once, so
the model loads once for both languages. Nothing is installed from here: `bash clients/ci.sh
install` (or a full `bash clients/ci.sh`) does that; a missing toolchain is a skip that says so.
"""
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

REPO = pathlib.Path(__file__).resolve().parents[1]
CI = REPO / "clients" / "ci.sh"


@pytest.fixture(scope="module")
def worker_address(smollm2_path, tmp_path_factory):
    """A real worker (CPU backend, SmolLM2-135M) on a free loopback port, for the module."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orcd_grpc.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--model", str(smollm2_path), "--backend", "cpu"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as ch:
            wait_serving(ch, proc, timeout=300)
    except AssertionError as e:
        proc.kill()
        proc.wait()
        pytest.fail(f"{e}\n--- worker log ---\n{log_path.read_text()[-4000:]}")
    yield address
    stop(proc)


def _run_ci(which: str, address: str) -> None:
    env = dict(os.environ, ORCD_ADDRESS=address, ORCD_CLIENTS_NO_INSTALL="1", ORCD_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(CI), which], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    print(out)  # pytest shows it for failures (and with -s)
    assert proc.returncode == 0, f"clients/ci.sh {which} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_typescript_client(worker_address):
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found; install Node.js >= 18")
    if not (REPO / "clients" / "ts" / "node_modules" / ".bin" / "buf").exists():
        pytest.skip("clients/ts/node_modules missing; run `bash clients/ci.sh install` (npm ci)")
    out = _run_ci("ts", worker_address)
    # node --test's TAP summary: every test ran and passed (a skipped/empty suite would not do).
    assert "# fail 0" in out and "# pass 8" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_go_client(worker_address):
    for tool in ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found; run `bash clients/ci.sh install` (Debian packages)")
    out = _run_ci("go", worker_address)
    for name in ("TestExecuteStreamsGreedyCompletion", "TestCancelAfterFirstToken", "TestHardwareInfoCPU",
                 "TestTokenizeMatchesThePrompt", "TestScoreGivesOneLogprobPerPositionAfterTheFirst",
                 "TestRegexConstraintOutputFullmatches"):
        assert f"--- PASS: {name}" in out, out[-3000:]


def test_grpcurl_examples_in_docs_match_the_contract():
    """Each `grpcurl -d '{...}' ... orcd.v1.Worker/Method` in docs/clients.md parses, with
    protobuf's JSON mapping (as grpcurl does), into that method's request type."""
    import re

    from google.protobuf import json_format

    from orcd_grpc.proto import pb

    text = (REPO / "docs" / "clients.md").read_text().replace("\\\n", " ")
    calls = re.findall(r"grpcurl[^\n]*?-d '(\{.*?\})'\s+\S+\s+orcd\.v1\.Worker/(\w+)", text)
    assert {m for _, m in calls} >= {"Execute", "Cancel"}, calls
    service = pb.DESCRIPTOR.services_by_name["Worker"]
    for body, method in calls:
        request_type = service.methods_by_name[method].input_type.full_name.split(".")[-1]
        msg = json_format.Parse(body, getattr(pb, request_type)())  # raises on an unknown field
        assert msg.ByteSize() > 0, (method, body)
