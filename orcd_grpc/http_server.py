"""uvicorn on a daemon thread of the worker process, with its own event loop: the transport under
the HTTP front door (http_frontdoor.py). The socket is bound by the worker's constructor, so a port
in use fails the start before any model loads, as the gRPC port does."""
from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

import uvicorn

from . import logs

log = logs.get_logger("orcd.http")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port); raises OSError when it cannot be bound."""
    h = host.strip("[]") or "0.0.0.0"
    family, kind, proto, _, addr = socket.getaddrinfo(h, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """uvicorn on a daemon thread with its own event loop, over a socket bound here (so a port
    in use fails the worker's construction, before any model loads)."""

    def __init__(self, app, host: str, port: int, *, tls: tuple[str, str, str | None] | None = None,
                 limit_concurrency: int | None = None):
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        kwargs = {}
        if tls is not None:
            cert, key, ca = tls
            kwargs.update(ssl_certfile=cert, ssl_keyfile=key)
            if ca:  # mutual TLS, as on the gRPC port: no client certificate, no handshake
                kwargs.update(ssl_ca_certs=ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        # log_config=None: uvicorn must not reconfigure the process's logging (orcd's JSON lines)
        self.config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                     limit_concurrency=limit_concurrency, timeout_graceful_shutdown=30, **kwargs)
        try:
            self.config.load()  # a bad certificate fails here, not on the server thread
        except ssl.SSLError as exc:
            self.sock.close()
            raise ValueError(f"--tls-cert/--tls-key: the HTTP port cannot use them: {exc}") from None
        except Exception:
            self.sock.close()
            raise
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> None:
        self._thread = threading.Thread(target=self._run, name="orcd-http", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except Exception:
            log.exception("HTTP server stopped with an error")

    def stop(self, grace: float) -> None:
        """Stops accepting, lets open responses end for up to `grace` seconds, then cancels them."""
        if self._thread is None:
            self.sock.close()
            return
        self.config.timeout_graceful_shutdown = max(0.1, grace)
        self.server.should_exit = True
        self._thread.join(grace + 5.0)
        self.sock.close()
