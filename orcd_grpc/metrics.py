"""Prometheus metrics of one worker.

Each server gets its own CollectorRegistry: several servers in one process (the test suite) must
not share or collide on metric names, and the default registry's process collectors are added
explicitly so a scrape still shows CPU and RSS.
"""
from __future__ import annotations

import collections
import socket
import socketserver
import ssl
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Latencies on a CPU backend run to seconds per token, on a GPU to milliseconds; the buckets
# span both.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TokenMetrics:
    """orcd_generated_tokens_total and orcd_inter_token_latency_seconds, as a collector.

    Every generated token is counted and timed, so prometheus_client's Counter and Histogram (a
    lock and a bucket walk per call, about 1.7 us a token together) would cost the engine thread
    milliseconds a second at batch 64. Here a token is an int add and a deque append (thread-safe
    without a lock); latencies are bucketed when scraped, or when many wait. One writer: the
    scheduler's thread."""

    _PENDING_MAX = 1 << 16
    _TOKENS = ("orcd_generated_tokens", "Tokens generated")
    _LATENCY = ("orcd_inter_token_latency_seconds", "Time between consecutive generated tokens of one request")

    def __init__(self, buckets=_LATENCY_BUCKETS, registry: CollectorRegistry | None = None):
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()  # scrapes (and the writer's own drain) bucket one at a time
        self.tokens = 0
        if registry is not None:
            registry.register(self)

    def record(self, latency: float | None) -> None:
        """One generated token; `latency`: seconds since the sample's previous token (None for its first)."""
        self.tokens += 1
        if latency is not None:
            self._pending.append(latency)
            if len(self._pending) > self._PENDING_MAX:  # never scraped: keep the memory bounded
                self._drain()

    def _drain(self) -> None:
        with self._lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        dq = self._pending
        vals = np.fromiter((dq.popleft() for _ in range(len(dq))), dtype=np.float64)
        if vals.size:
            # bucket i holds v <= bounds[i] (Prometheus' "le"), the last one the rest
            self._counts += np.bincount(np.searchsorted(self._bounds, vals, side="left"),
                                        minlength=self._counts.size)
            self._sum += float(vals.sum())

    def collect(self):
        with self._lock:  # a snapshot: the writer's own drain may not run in between
            self._drain_locked()
            cum, total, n = np.cumsum(self._counts), self._sum, self.tokens
        tokens = CounterMetricFamily(*self._TOKENS)
        tokens.add_metric([], float(n))
        les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        latency = HistogramMetricFamily(*self._LATENCY, buckets=[(le, float(c)) for le, c in zip(les, cum)],
                                        sum_value=total)
        return [tokens, latency]

    def describe(self):
        return [CounterMetricFamily(*self._TOKENS), HistogramMetricFamily(*self._LATENCY)]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        try:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        except ValueError:  # already registered in a caller-supplied registry
            pass
        self.requests = Counter("orcd_requests", "RPCs answered, by method and final status code",
                                ["method", "code"], registry=r)
        self.finished = Counter("orcd_finished_requests", "Execute requests finished, by finish reason",
                                ["reason"], registry=r)
        self.cancelled = Counter("orcd_cancelled_requests", "Execute requests cancelled, by cancel reason "
                                 "(client_cancel, client_disconnect, deadline_exceeded, model_unloaded, "
                                 "model_swapped, server_shutdown)", ["reason"], registry=r)
        self.prompt_tokens = Counter("orcd_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.tokens = TokenMetrics(registry=r)  # orcd_generated_tokens_total, orcd_inter_token_latency_seconds
        self.ttft = Histogram("orcd_time_to_first_token_seconds",
                              "Time between a request's arrival and its first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("orcd_queue_wait_seconds", "Time a request waited before its prefill began",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("orcd_engine_step_seconds", "Duration of one engine forward step",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.steps = Counter("orcd_engine_steps", "Engine steps by kind: prefill (carried prompt tokens), "
                             "decode (launched once the step before it was delivered), decode_ahead (queued "
                             "behind the step in flight, so the host's work overlapped the device's)",
                             ["kind"], registry=r)
        self.step_kind_seconds = Counter("orcd_engine_kind_seconds", "Seconds of engine steps by the kind of the step "
                                         "delivered (orcd_engine_steps' kinds): over orcd_engine_steps_total{kind}, "
                                         "the mean duration of each kind", ["kind"], registry=r)
        self.queue_depth = Gauge("orcd_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("orcd_running_sequences", "Sequences in the running batch", registry=r)
        self.kv_used = Gauge("orcd_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("orcd_kv_blocks_free", "KV cache blocks free", registry=r)
        # parallel samples (n > 1) and prefix-cache hits read one block from several sequences:
        # kv_used counts it once, this says how many blocks are held that way
        self.kv_shared = Gauge("orcd_kv_blocks_shared", "KV cache blocks in use by more than one sequence "
                               "(counted once in orcd_kv_blocks_used)", registry=r)
        self.prefix_hits = Counter("orcd_prefix_cache_hit_tokens",
                                   "Prompt tokens whose KV was reused from the prefix cache", registry=r)
        self.preemptions = Counter("orcd_preemptions", "Sequences preempted because KV blocks ran out",
                                   registry=r)
        self.engine_errors = Counter("orcd_engine_errors", "Engine steps that raised", registry=r)
        # Speculative decoding: accepted / proposed is the acceptance rate (per request: Usage).
        self.draft_tokens = Counter("orcd_speculative_draft_tokens", "Draft tokens proposed and verified "
                                    "(speculative decoding)", registry=r)
        self.accepted_draft_tokens = Counter("orcd_speculative_accepted_tokens",
                                             "Draft tokens the model kept (speculative decoding)", registry=r)
        self.model_vram = Gauge("orcd_model_vram_bytes", "VRAM held by the loaded model (weights, KV, workspace)",
                                registry=r)
        self.model_ram = Gauge("orcd_model_ram_bytes", "Host RAM held by the loaded model on the CPU backend",
                               registry=r)
        self.model_load_seconds = Gauge("orcd_model_load_seconds", "Seconds the last successful model load took",
                                        registry=r)
        self.model_loaded = Gauge("orcd_model_loaded", "1 while a model is loaded, by model id", ["model_id"],
                                  registry=r)
        self._http = None

    def set_model(self, info) -> None:
        """Records the served model's memory; `info` is an engine ModelInfo or None (unloaded)."""
        self.model_loaded.clear()
        if info is None:
            self.model_vram.set(0)
            self.model_ram.set(0)
            self.kv_used.set(0)
            self.kv_free.set(0)
            self.kv_shared.set(0)
            return
        total = info.vram_bytes
        on_gpu = info.backend == "cuda"
        self.model_vram.set(total if on_gpu else 0)
        self.model_ram.set(0 if on_gpu else total)
        self.model_load_seconds.set(info.load_seconds)
        self.model_loaded.labels(info.model_id).set(1)

    def serve_http(self, port: int, addr: str = "127.0.0.1", health=None, *, tls: tuple[str, str] | None = None,
                   auth=None) -> int:
        """Starts the HTTP endpoint on daemon threads; returns the bound port (0 picks one).
        /healthz answers 200 "SERVING" or 503 "NOT_SERVING" from `health()` (a bool): a probe for
        containers whose gRPC port speaks TLS (Docker's HEALTHCHECK has no gRPC-over-TLS client);
        like gRPC health it needs no token. /metrics is the Prometheus scrape; with `auth` (a
        security.TokenChecker) it needs "Authorization: Bearer <token>" of one of its tokens.
        Other paths are 404: a scanner learns nothing from them. `tls` = (cert, key) PEM paths
        serves HTTPS."""
        scrape = make_wsgi_app(self.registry)

        def answer(start_response, status, body: bytes, extra=()):
            start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *extra])
            return [body]

        def app(environ, start_response):
            path = environ.get("PATH_INFO") or "/"
            if health is not None and path == "/healthz":
                ok = bool(health())
                return answer(start_response, "200 OK" if ok else "503 Service Unavailable",
                              b"SERVING\n" if ok else b"NOT_SERVING\n")
            if path != "/metrics":
                return answer(start_response, "404 Not Found", b"not found; the scrape is /metrics\n")
            if auth is not None:
                scheme, _, token = (environ.get("HTTP_AUTHORIZATION") or "").strip().partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    return answer(start_response, "401 Unauthorized", b"bearer token missing\n",
                                  [("WWW-Authenticate", 'Bearer realm="orcd-metrics"')])
                if auth.lookup(token.strip()) is None:
                    return answer(start_response, "403 Forbidden", b"bearer token is not a metrics token\n")
            return scrape(environ, start_response)

        server_class = _ThreadingWSGIServer6 if ":" in addr else _ThreadingWSGIServer
        httpd = make_server(addr, port, app, server_class=server_class, handler_class=_QuietHandler)
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(tls[0], tls[1])
            # The handshake runs on the connection's own thread (at its first read), not in the
            # accept loop, where one client that never completes it would stall every scrape.
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=httpd.serve_forever, name="orcd-metrics-http", daemon=True).start()
        self._http = httpd
        return httpd.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the process open

    def handle_error(self, request, client_address):
        # A plaintext client on the TLS port, a failed handshake or a dropped connection is the
        # client's problem, not a traceback on the worker's stderr.
        if isinstance(sys.exc_info()[1], (OSError, ssl.SSLError)):
            return
        super().handle_error(request, client_address)


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = 30  # a connection that sends nothing (or stalls its TLS handshake) gives its thread back

    def log_message(self, format, *args):  # scrapes every few seconds are not worth a log line each
        pass
