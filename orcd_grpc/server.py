"""The gRPC server: service wiring, health, reflection, metrics, correlation ids and shutdown."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import events, lifecycle, logs, wire
from .metrics import Metrics
from .pool_metrics import PoolMetricsCollector
from .proto import pb
from .scheduler import Scheduler
from .call_hooks import Hooks, Policy
from .grpc_loop import LoopServer
from .security import ALL_ROLES, AuthInterceptor
from .servicer import WorkerServicer
from .tuning import Tuning

log = logs.get_logger("orcd.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name  # "orcd.v1.Worker"
CORRELATION_KEY = "x-correlation-id"


@dataclasses.dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051  # 0: pick a free port
    model_dirs: list[str] = dataclasses.field(default_factory=list)
    # Loaded at startup when set (must lie inside model_dirs).
    model_path: str | None = None
    model_id: str | None = None
    backend: str = "auto"          # "auto", "cpu" or "cuda"
    context_length: int = 0        # for the startup model; 0: trained length, capped by max_context
    max_context: int = 0           # cap on any model's context length; 0: none
    max_sequences: int = 64
    max_queue: int = 256
    max_samples: int = 16          # most parallel samples (ExecuteRequest.n) one request may ask for
    token_budget: int = 2048       # tokens per engine step (chunked prefill)
    max_vram: int = 0              # bytes; 0: no limit
    max_ram: int = 0               # bytes the CPU backend may use; 0: the machine's available memory less a margin
    grace_seconds: float = 30.0
    metrics_port: int | None = None  # None: no metrics endpoint; 0: pick a free port
    metrics_host: str | None = None  # None: the gRPC host (a loopback worker keeps its metrics local)
    metrics_tls: tuple[str, str] | None = None  # (cert, key) PEM paths: the metrics port speaks HTTPS
    metrics_auth: Any = None       # security.TokenChecker of the scrape tokens; None: /metrics is open
    # The OpenAI-compatible HTTP front door (http_frontdoor.py) on this port of `host`; None: off,
    # 0: pick a free port. http_tls = (cert, key, client CA or None) PEM paths: HTTPS (mutual TLS
    # with a CA); http_metrics_auth: security.TokenChecker its /metrics needs (None: open).
    http_port: int | None = None
    http_tls: tuple[str, str, str | None] | None = None
    http_metrics_auth: Any = None
    max_message_bytes: int = 64 * 1024 * 1024
    max_prompt_bytes: int = 2 * 1024 * 1024  # prompt text refused beyond this, before tokenizing; 0: no cap
    tool_formats: dict = dataclasses.field(default_factory=dict)  # model id ("" for all) -> tool-call format
    speculation: Any = None        # speculation.Speculation of requests that choose none; None: off
    draft_model_path: str | None = None  # the startup model's draft model (draft-model speculation)
    kv_cache_type: str = ""        # f16, q8_0 or f32 for loads that name none; "": the backend's default
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    max_workers: int = 0           # gRPC handler threads; 0: enough for every queued and running request
    auth_token: str | None = None  # when set, calls need "authorization: Bearer <token>"
    log_level: str = "info"
    # Extra call policy (call_hooks.Policy, e.g. orcd_grpc.security's and ratelimit's): run after the
    # correlation-id/auth wrapper; credentials switch the port to TLS.
    interceptors: list = dataclasses.field(default_factory=list)
    credentials: Any = None
    # Front-end processes (frontend.py) that carry clients' connections and relay their calls here;
    # they share the worker's port (SO_REUSEPORT) unless frontend_port names one of their own.
    frontends: int = 0
    frontend_port: int | None = None
    tls_files: tuple[str, str, str | None] | None = None  # (cert, key, client CA) behind credentials


class BindError(RuntimeError):
    """The worker's port could not be bound: in use, or an address this machine does not have."""


FRONTENDS_READY_S = 30.0  # start() waits this long for front ends holding the worker's port to listen
CONTROL_THREADS = 16  # RPC slots (and pool threads) Execute streams may not take (Cancel, health, LoadModel...)


class _CallWrapper(Policy):
    """Binds the call's correlation id for its log lines and caps the open Execute streams.

    Context variables set in the interceptor itself would not reach the handler (it runs on a
    pool thread, or as a task on the server's event loop), so they are bound in the call's `begin`
    (call_hooks.wrap_handler), where the handler runs. Bearer tokens are checked by
    security.AuthInterceptor, after this one.
    """

    def __init__(self, max_streams: int = 0):
        # Open Execute streams each hold a request's queue and its place in the scheduler; the cap
        # refuses new ones early with a retry hint instead of letting them pile up without bound.
        self._streams = threading.BoundedSemaphore(max_streams) if max_streams > 0 else None
        self._max_streams = max_streams

    def begin_for(self, handler_call_details):
        md = dict(handler_call_details.invocation_metadata or ())
        cid = str(md.get(CORRELATION_KEY) or "")[:128] or logs.new_correlation_id()
        limited = self._streams if handler_call_details.method == f"/{SERVICE_NAME}/Execute" else None

        def begin(request, context) -> Hooks:
            ids = logs.bound(correlation=cid, request="")
            ids.__enter__()
            if limited is not None and not limited.acquire(blocking=False):
                ids.__exit__(None, None, None)
                context.set_trailing_metadata((("retry-after-ms", "1000"),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the worker has {self._max_streams} open Execute streams; retry later")
            return _Bound(ids, limited)

        return begin


class _Bound(Hooks):
    """A call's correlation id, unbound at its end, and its place among the open streams."""

    def __init__(self, ids, streams: threading.BoundedSemaphore | None):
        self.ids, self.streams = ids, streams

    def end(self) -> None:
        if self.streams is not None:
            self.streams.release()
        self.ids.__exit__(None, None, None)


class Worker:
    """A running server and what it owns; `stop()` shuts it all down in order."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(False)
        self.events = events.EventHub()
        self.scheduler = Scheduler(max_queue=config.max_queue, max_sequences=config.max_sequences,
                                   token_budget=config.token_budget, metrics=self.metrics,
                                   on_model_change=self._model_changed, speculation=config.speculation)
        self.scheduler.on_engine_closed = self.events.detach
        self.lifecycle = lifecycle.Lifecycle(self.scheduler, on_change=self._refresh_health)
        # WatchEvents streams step on a pool thread each, beside the Execute submissions and the short calls
        watchers = self.events.max_subscribers
        workers = config.max_workers or (config.max_queue + config.max_sequences + CONTROL_THREADS + watchers)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="orcd-rpc")
        self.servicer = WorkerServicer(self.scheduler, model_dirs=config.model_dirs, backend=config.backend,
                                       max_context=config.max_context, max_vram=config.max_vram,
                                       metrics=self.metrics, max_ram=config.max_ram,
                                       max_prompt_bytes=config.max_prompt_bytes, max_samples=config.max_samples,
                                       tool_formats=config.tool_formats, life=self.lifecycle, hub=self.events,
                                       kv_cache_type=config.kv_cache_type, executor=self._pool)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.keepalive_time_ms", config.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),  # a second worker on this port is refused
        ]
        for icp in config.interceptors:  # policy interceptors (orcd_grpc.ratelimit) count into this worker's registry
            if hasattr(icp, "bind_registry"):
                icp.bind_registry(self.metrics.registry)
        reserve = min(CONTROL_THREADS, max(1, workers // 4))
        streams = workers - reserve - (0 if config.max_workers else watchers)  # the watchers' threads stay theirs
        interceptors = [_CallWrapper(max_streams=max(1, streams)), *config.interceptors]
        if config.auth_token:  # a single token given directly (security.py's flags fold theirs in)
            # one shared secret given in code: it cannot separate duties, so it has every role
            interceptors.insert(1, AuthInterceptor({config.auth_token: "default"},
                                                   roles={config.auth_token: ALL_ROLES}))
        self._max_rpcs = workers
        self.server = LoopServer(self._pool, interceptors=interceptors, options=options,
                                 maximum_concurrent_rpcs=workers)
        # malformed requests: INVALID_ARGUMENT; the same handlers serve calls relayed by front ends
        self._handlers = wire.add_worker_servicer(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(  # the asyncio reflection service, on the loop
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server.server)
        address = f"{_host(config.host)}:{config.port}"
        # Front ends on the worker's port take all of its connections: the worker only holds the
        # port (bound, never listening, so the kernel gives them no connection) and serves its own
        # gRPC on a loopback port (direct_port), which operators and tests may still reach.
        self._port_hold = None
        self.direct_port: int | None = None
        if config.frontends and config.credentials is not None and config.tls_files is None:
            self._abandon()  # security.apply_to_server_config fills tls_files beside the credentials
            raise ValueError("frontends on a TLS port need its certificate files (tls_files)")
        shared = bool(config.frontends) and config.frontend_port is None
        if shared:
            try:
                self._port_hold = hold_port(config.host, config.port)
            except OSError as exc:
                self._abandon()
                raise BindError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        bind = "127.0.0.1:0" if shared else address
        try:
            self.port = (self.server.add_secure_port(bind, config.credentials) if config.credentials is not None
                         else self.server.add_insecure_port(bind))
        except RuntimeError:  # grpc raises a bare RuntimeError when no address could be bound
            self.port = 0
        if self.port == 0:
            self._abandon()
            raise BindError(f"cannot listen on {address}: the port is in use or the address is not this machine's")
        if shared:
            self.direct_port, self.port = self.port, self._port_hold.getsockname()[1]
        self.metrics_port: int | None = None
        self.metrics.registry.register(PoolMetricsCollector(self.scheduler))
        self.http = None
        self.http_port: int | None = None
        if config.http_port is not None:
            if config.credentials is not None and config.http_tls is None:
                # security.apply_to_server_config fills both; a TLS gRPC port beside a plaintext
                # HTTP one would undo what the operator configured
                self._abandon()
                raise ValueError("http_port with gRPC TLS credentials needs http_tls (cert, key, client CA)")
            try:
                self.http = self._http_server(config, interceptors, workers)
            except (OSError, ValueError) as exc:
                self._abandon()
                if isinstance(exc, ValueError):  # a certificate the HTTP port cannot load
                    raise
                raise BindError(f"cannot listen for HTTP on {_host(config.host)}:{config.http_port}: "
                                f"{exc.strerror or exc}") from None
            self.http_port = self.http.port
        self.frontends = self._frontends(config) if config.frontends else None
        self._stopped = threading.Event()
        self._load_thread: threading.Thread | None = None
        self.load_error: BaseException | None = None

    def _abandon(self) -> None:
        """A worker that fails to start lets go of what it has taken: its server, pool and held port."""
        self.server.stop(0).wait()
        self._pool.shutdown(wait=False)
        if self._port_hold is not None:
            self._port_hold.close()

    def _frontends(self, config: ServerConfig):
        """The front-end processes' relay socket (started with the worker): every Worker and health
        method, through this server's policies (on a TLS port they load its files, tls_files)."""
        from .grpc_loop import on_pool
        from .relay import FrontEnds, RelayTarget

        handlers = {f"/{SERVICE_NAME}/{n}": h for n, h in self._handlers.items()}
        hs = "/" + health_pb2.DESCRIPTOR.services_by_name["Health"].full_name + "/"
        io = dict(request_deserializer=health_pb2.HealthCheckRequest.FromString,
                  response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
        handlers[hs + "Check"] = grpc.unary_unary_rpc_method_handler(on_pool(self.health.Check, self._pool, False), **io)
        handlers[hs + "Watch"] = grpc.unary_stream_rpc_method_handler(on_pool(self.health.Watch, self._pool, True), **io)
        return FrontEnds(self.server, RelayTarget(handlers, self.server.on_loop, max_calls=self._max_rpcs),
                         count=config.frontends,
                         listen=f"{_host(config.host)}:{config.frontend_port or self.port}",
                         tls=config.tls_files if config.credentials is not None else None,
                         max_message_bytes=config.max_message_bytes, grace=config.grace_seconds)

    def _model_changed(self, info) -> None:
        if info is not None:
            self.events.attach(self.scheduler.engine)  # called on the engine thread, right after the swap
        self._set_health(info is not None)

    def _refresh_health(self) -> None:
        self._set_health(self.scheduler.engine is not None)
    def _http_server(self, config: ServerConfig, interceptors: list, workers: int):
        """The HTTP front door over this worker's scheduler, with the tokens, roles, rate limits and
        usage counters of its gRPC interceptors."""
        from .http_frontdoor import FrontDoor
        from .http_server import HttpServer
        from .ratelimit import RateLimitInterceptor

        checker = next((i.checker for i in interceptors if isinstance(i, AuthInterceptor)), None)
        limits = next((i for i in interceptors if isinstance(i, RateLimitInterceptor)), None)
        door = FrontDoor(self.scheduler, metrics=self.metrics, max_prompt_bytes=config.max_prompt_bytes,
                         checker=checker, limiter=limits.limiter if limits else None,
                         usage=limits.usage if limits else None, metrics_auth=config.http_metrics_auth,
                         health=self._serving, max_body_bytes=config.max_message_bytes,
                         max_samples=config.max_samples, tool_formats=config.tool_formats)
        return HttpServer(door.app, config.host, config.http_port, tls=config.http_tls, limit_concurrency=workers)

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        draining = getattr(self, "lifecycle", None) is not None and self.lifecycle.draining
        if self._stopped_flag() or draining:  # a readiness probe takes a draining worker out of rotation
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)
        self._serving_now = status == health_pb2.HealthCheckResponse.SERVING

    def _serving(self) -> bool:
        """What the standard health service says for service "" (also served as HTTP /healthz)."""
        return self._serving_now

    def _stopped_flag(self) -> bool:
        ev = getattr(self, "_stopped", None)
        return ev is not None and ev.is_set()

    def start(self, *, load_async: bool = True) -> None:
        self.server.start()
        if self.frontends is not None:
            self.frontends.start()
            if self._port_hold is not None and not self.frontends.wait_ready(FRONTENDS_READY_S):
                # nothing listens on the port until a front end does: connections are refused till then
                log.warning("front ends not all up yet; the port answers once one is",
                            extra={"fields": {"up": self.frontends.target.streams, "of": self.frontends.count}})
        if self.config.metrics_port is not None:
            host = self.config.metrics_host if self.config.metrics_host is not None else self.config.host
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port, host.strip("[]") or "0.0.0.0",
                                                        health=self._serving, tls=self.config.metrics_tls,
                                                        auth=self.config.metrics_auth)
        if self.http is not None:
            self.http.start()
        log.info("listening", extra={"fields": {"port": self.port, "metrics_port": self.metrics_port,
                                                "http_port": self.http_port, "direct_port": self.direct_port}})
        if self.config.model_path:
            self._load_thread = threading.Thread(target=self._initial_load, name="orcd-initial-load", daemon=True)
            self._load_thread.start()
            if not load_async:
                self._load_thread.join()

    def _initial_load(self) -> None:
        from . import request_validation as rv

        try:
            path = rv.resolve_model_path(self.config.model_path, self.config.model_dirs)
            ctx = self.config.context_length
            rv.check_context_length(ctx, self.config.max_context)

            def progress(stage, done, total):
                log.debug("load progress", extra={"fields": {"stage": stage, "done": done, "total": total}})

            self.scheduler.load(path, model_id=self.config.model_id or rv.default_model_id(path),
                                context_length=ctx, max_context=self.config.max_context,
                                backend=self.config.backend,
                                max_vram=self.config.max_vram, max_ram=self.config.max_ram,
                                progress=progress, kv_cache_type=self.config.kv_cache_type,
                                draft_path=rv.resolve_draft_path(self.config.draft_model_path, self.config.model_dirs)
                                if self.config.draft_model_path else None)
        except Exception as exc:
            self.load_error = exc
            log.error("startup model load failed", extra={"fields": {"error": str(exc),
                                                                      "path": self.config.model_path}})

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Waits for the startup load; True when a model is being served."""
        if self._load_thread is not None:
            self._load_thread.join(timeout)
        return self.scheduler.engine is not None

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_seconds if grace is None else grace
        self._set_health(False)  # /healthz too; the gRPC statuses then stay NOT_SERVING
        self.health.enter_graceful_shutdown()
        log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
        if self.frontends is not None:  # no new connections there; their calls end as ours do
            self.frontends.stop_accepting()
        t0 = time.monotonic()
        self.events.close()  # WatchEvents streams end now; they would only hold the stop up
        self.scheduler.shutdown(grace)
        # Streams now hold their final events; give them a moment to reach the clients.
        left = max(1.0, grace - (time.monotonic() - t0))
        if self.frontends is not None:  # their last events relayed, the front ends exit
            self.frontends.close(timeout=left)
        if self._port_hold is not None:
            self._port_hold.close()
        stopping = self.server.stop(left)
        if self.http is not None:
            self.http.stop(left)
        stopping.wait()
        self.metrics.close()
        self._pool.shutdown(wait=False)
        log.info("stopped")


def hold_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free port) with SO_REUSEPORT but not listening: it
    keeps the port for this worker's front ends, which bind it the same way and listen, and is
    given none of the connections, which the kernel spreads over listening sockets only."""
    bare = host.strip("[]")
    family, kind, proto, _, addr = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and bare in ("", "::"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as grpc binds "[::]"
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def start_server(config: ServerConfig) -> tuple[Any, int, Scheduler]:
    """Starts a worker without blocking; returns (worker, port, scheduler).

    The first element is the `Worker` (call `.stop(grace)` on it; `.server` is the grpc server).
    A startup model (config.model_path) loads in the background; health says SERVING once it is in.
    """
    worker = Worker(config)
    worker.start(load_async=True)
    return worker, worker.port, worker.scheduler


# On SIGTERM the process is gone by grace_seconds + this, whatever its threads are doing.
EXIT_MARGIN_S = 3.0


def _exit_deadline(seconds: float, stopped: threading.Event) -> None:
    """Ends the process `seconds` from now unless it has ended by then.

    Handler threads are not daemons, so the interpreter's exit waits for each of them; one busy
    tokenizing, rendering or stuck in a library call would keep a stopped worker alive, past the
    grace period its orchestrator allows. This is the backstop."""

    def expire() -> None:
        busy = [t.name for t in threading.enumerate() if t.name.startswith(("orcd-rpc", "orcd-render"))]
        log.warning("exit deadline passed; exiting now", extra={"fields": {
            "seconds": seconds, "stopped": stopped.is_set(), "busy_threads": len(busy)}})
        for stream in (sys.stderr, sys.stdout):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0 if stopped.is_set() else 1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.name = "orcd-exit-deadline"
    timer.start()


def apply_switch_interval(tuning: Tuning) -> None:
    """The worker process's thread switch interval (ORCD_GIL_SWITCH_US; 0 leaves Python's)."""
    if tuning.gil_switch_us:
        sys.setswitchinterval(tuning.gil_switch_us / 1e6)


def serve(config: ServerConfig) -> int:
    """Runs the worker until SIGTERM/SIGINT; returns the process exit code."""
    logs.configure(config.log_level)
    apply_switch_interval(Tuning.from_env())
    worker = Worker(config)
    done = threading.Event()
    stopped = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
        if not done.is_set():
            _exit_deadline(max(0.0, config.grace_seconds) + EXIT_MARGIN_S, stopped)
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.start(load_async=True)
        if config.model_path:
            while not done.is_set() and worker._load_thread.is_alive():
                worker._load_thread.join(0.2)
            if worker.load_error is not None:
                worker.stop(0)
                return 1
        while not done.wait(0.5):
            pass
        worker.stop()
        stopped.set()
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
