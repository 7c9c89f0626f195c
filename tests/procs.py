"""Helpers for tests that run a worker or a client as a separate process."""
from __future__ import annotations

import pathlib
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_serving(channel, proc: subprocess.Popen, timeout: float = 60.0, log=None) -> None:
    """Returns once the worker behind `channel` answers the standard health check with SERVING;
    fails, with the tail of the worker's `log` file, if the process exits first or `timeout`
    seconds pass."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + timeout
    last = "no answer"

    def tail() -> str:
        return pathlib.Path(log).read_text(errors="replace")[-3000:] if log else ""

    while True:
        assert proc.poll() is None, f"worker exited ({proc.returncode}) while starting\n{tail()}"
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            last = exc.code().name
        assert time.monotonic() < end, f"worker not SERVING after {timeout:.0f} s (last health: {last})\n{tail()}"
        time.sleep(0.2)


def wait_for(pred, timeout: float = 20.0) -> bool:
    """Polls pred() until it is true (True) or `timeout` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False
