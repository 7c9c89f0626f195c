"""The OpenAI-compatible HTTP front door (issue #21): /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics, over the worker's own Scheduler, served inside the worker process
by uvicorn on its own thread and event loop (http_server.py).

A request takes the gRPC Execute path in the same order: bearer token and role (security.py), rate
limit and usage (ratelimit.py), the body as an ExecuteRequest (openai_schema.py) judged by
request_validation, then Scheduler.submit. Events come back on the request's queue; a
_LoopQueue wakes the event loop on each put, so no thread sits blocked per request. A client that
goes away has its request abandoned (the scheduler frees its KV blocks at its next step).
"""
from __future__ import annotations

import asyncio
import json
import math
import queue
import time

import grpc
import pydantic
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import logs, openai_schema as oa, ratelimit, request_validation as rv, security
from .errors import Internal, NotFound, OrcdError, PermissionDenied, ResourceExhausted
from .request import CANCELLED, ErrorEvent, FinishedEvent, Request, TokenEvent, Unavailable

log = logs.get_logger("orcd.http")

EXECUTE = "/orcd.v1.Worker/Execute"  # the gRPC method whose roles, limits and counters a request shares
LIST_MODELS = "/orcd.v1.Worker/ListModels"
_POLL_S = 1.0  # how often a request waiting on its queue checks that the engine thread is alive

#: gRPC status -> (HTTP status, OpenAI error type). The error's "code" is the gRPC status name (what
#: the same request gets over gRPC) unless _CODES names something OpenAI clients know.
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
}


class Unauthenticated(OrcdError):
    code = grpc.StatusCode.UNAUTHENTICATED


class _HttpError(Exception):
    """An answer that is not an OrcdError's (413, 404 of a path)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _code(err: OrcdError, param: str | None) -> str:
    if isinstance(err, oa.NotSupportedYet):
        return "not_supported_yet"
    if err.code == grpc.StatusCode.NOT_FOUND and param == "model":
        return "model_not_found"
    if err.code == grpc.StatusCode.OUT_OF_RANGE and param in ("prompt", "messages"):
        return "context_length_exceeded"
    return err.code.name.lower()


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: OrcdError, kind: str = "", body=None) -> JSONResponse:
    status, type_ = STATUS.get(err.code, (500, "server_error"))
    message, param = oa.rename(err, kind, body)
    headers = {}
    if err.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_ms / 1000)))
        headers["retry-after-ms"] = str(int(err.retry_after_ms))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="orcd"'
    return JSONResponse(error_body(message, type_, param, _code(err, param)), status_code=status, headers=headers)


def _finite(x: float) -> float:
    # JSON has no -Infinity: a banned token's logprob is reported as vLLM does, -9999.0
    return x if math.isfinite(x) else -9999.0


class _LoopQueue(queue.Queue):
    """A request's event queue that wakes an asyncio loop on every put (from the engine thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._loop = loop
        self._ready = asyncio.Event()

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop has closed (server stopped): nobody is waiting
            pass

    async def next(self, alive) -> object:
        while True:
            self._ready.clear()
            try:
                return self.get_nowait()
            except queue.Empty:
                pass
            try:
                await asyncio.wait_for(self._ready.wait(), _POLL_S)
            except asyncio.TimeoutError:
                if not alive():
                    return ErrorEvent(Internal("the engine thread stopped"))


class _SSEResponse(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends: finished, failed, or
    cancelled because the client disconnected (Starlette cancels the stream on http.disconnect)."""

    def __init__(self, content, on_close, headers=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _pydantic_error(exc: pydantic.ValidationError) -> _HttpError:
    first = exc.errors()[0]
    parts = []
    for x in first.get("loc", ()):
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif isinstance(x, str) and x.isidentifier() and x not in ("str", "int", "float", "list", "dict", "bool"):
            parts.append(("." if parts else "") + x)
        else:
            break  # a union's branch tag (list[int], ...): the field is named already
    param = "".join(parts) or None
    msg = "unknown field (not a parameter of this endpoint)" if first.get("type") == "extra_forbidden" else first["msg"]
    return _HttpError(400, f"{param}: {msg}" if param else msg, param=param)


class FrontDoor:
    """The HTTP application over one worker's scheduler; `app` is the ASGI app."""

    def __init__(self, scheduler, *, metrics=None, max_prompt_bytes: int = rv.prompt_guard.DEFAULT_MAX_PROMPT_BYTES,
                 checker: security.TokenChecker | None = None, limiter=None, usage=None,
                 metrics_auth: security.TokenChecker | None = None, health=None, max_body_bytes: int = 64 << 20):
        self.scheduler = scheduler
        self.metrics = metrics
        self.max_prompt_bytes = max_prompt_bytes
        self.checker = checker if checker else None
        self._priorities: dict[str, int] = {}  # client id -> its token's priority (tokens are fixed at start)
        self.limiter = limiter
        self.usage = usage
        self.metrics_auth = metrics_auth
        self.health = health
        self.max_body_bytes = max_body_bytes
        self._model_created: dict[str, int] = {}
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/health", self.healthz, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.scrape, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed, Exception: self._crash})

    # ---- plumbing ----------------------------------------------------------------------------

    def _count(self, path: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(path, code.name).inc()

    async def _not_found(self, request, exc):
        return JSONResponse(error_body(f"no route {request.url.path}", "not_found_error", None, "not_found"), 404)

    async def _not_allowed(self, request, exc):
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}",
                                       "invalid_request_error", None, "method_not_allowed"), 405)

    async def _crash(self, request, exc):
        log.exception("HTTP handler failed", exc_info=exc)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal"), 500)

    def _caller(self, request: HttpRequest, method: str) -> str:
        """The client id requests are accounted to and scoped by, after the token and role checks."""
        if self.checker is None:
            host = request.client.host if request.client else "unknown"
            return f"peer:{host}"
        header = request.headers.get("authorization")
        verdict = security.authenticate(self.checker, [("authorization", header)] if header is not None else [])
        if not isinstance(verdict[0], str):
            code, msg = verdict
            raise (Unauthenticated(msg) if code == grpc.StatusCode.UNAUTHENTICATED else PermissionDenied(msg))
        client, roles, priority = verdict
        self._priorities[client] = priority  # the token's priority: its requests' default and cap
        denied = security.authorize(method, client, roles)
        if denied is not None:
            raise PermissionDenied(denied)
        return client

    def _admit(self, client: str, stopping=None) -> int:
        """Takes the client's rate-limit tokens (reserving generated tokens for an Execute); returns
        the reservation to settle. Raises ResourceExhausted with the retry delay when refused."""
        reserved = 0
        if self.limiter is not None:
            reserved = ratelimit.reservation(self.limiter, client, stopping) if stopping is not None else 0
            refusal = self.limiter.reserve(client, reserved) if reserved else self.limiter.admit(client)
            if refusal is not None:
                if self.usage is not None:
                    self.usage.rate_limited.labels(self.usage.label(client), refusal.limit).inc()
                raise ResourceExhausted(refusal.message(self.limiter.limits_for(client)),
                                        retry_after_ms=refusal.retry_after_ms)
        if self.usage is not None:
            self.usage.requests.labels(self.usage.label(client)).inc()
        return reserved

    async def _json(self, request: HttpRequest, model):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise _HttpError(413, f"the request body is {size} bytes; at most {self.max_body_bytes} are accepted")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_body_bytes:
                raise _HttpError(413, f"the request body is over {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise _HttpError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise _HttpError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            raise _pydantic_error(exc) from None

    def _prepare(self, pbreq, client: str, correlation: str) -> Request:
        """As WorkerServicer._prepare, on a worker thread: tokenizing may take a while."""
        with logs.bound(correlation=correlation, request=""):
            rv.check_static(pbreq)
            engine = self.scheduler.engine
            if engine is None:
                raise Unavailable("no model is loaded yet")
            prepared = rv.prepare_execute(pbreq, engine.info, engine.tokenizer, max_prompt_bytes=self.max_prompt_bytes)
            return Request(prepared.request_id, prepared.prompt_ids, prepared.sampling, prepared.stopping,
                           engine=engine, model_id=engine.info.model_id, correlation_id=correlation,
                           arrival=time.monotonic(), owner=client, priority=self._priorities.get(client, 0))

    # ---- endpoints ----------------------------------------------------------------------------

    async def completions(self, request: HttpRequest):
        return await self._generate(request, "completions", oa.CompletionRequest, "/v1/completions")

    async def chat(self, request: HttpRequest):
        return await self._generate(request, "chat", oa.ChatRequest, "/v1/chat/completions")

    async def _generate(self, request: HttpRequest, kind: str, model, path: str):
        correlation = (request.headers.get("x-correlation-id") or "")[:128]
        if not correlation or not all(0x20 < ord(c) < 0x7F for c in correlation):  # it is echoed in a header
            correlation = logs.new_correlation_id()
        headers = {"x-correlation-id": correlation}
        body, client, reserved = None, "", 0
        try:
            client = self._caller(request, EXECUTE)
            body = await self._json(request, model)
            pbreq = oa.to_execute(body, kind)
            reserved = self._admit(client, pbreq.stopping)
            req = await run_in_threadpool(self._prepare, pbreq, client, correlation)
            req.events = _LoopQueue(asyncio.get_running_loop())
            self.scheduler.submit(req)
        except OrcdError as err:
            self._settle(client, reserved, 0)
            self._count(path, err.code)
            log.info("request rejected", extra={"fields": {"code": err.code.name, "error": str(err), "path": path}})
            resp = error_response(err, kind, body)
            resp.headers.update(headers)
            return resp
        except _HttpError as err:
            self._settle(client, reserved, 0)
            self._count(path, grpc.StatusCode.INVALID_ARGUMENT)
            return JSONResponse(error_body(err.message, err.type, err.param, err.code),
                                err.status, headers=headers)
        except BaseException:  # a bug or a cancelled handler: the reservation is still given back
            self._settle(client, reserved, 0)
            raise
        run = _Run(self, req, kind, body, client, reserved, path)
        headers["x-request-id"] = req.request_id
        if body.stream:
            return _SSEResponse(run.events(), run.close, headers=headers)
        watcher = asyncio.create_task(_on_disconnect(request, run.gone))
        try:
            return await run.collect(headers)
        finally:
            watcher.cancel()
            run.close()

    def _settle(self, client: str, reserved: int, used: int) -> None:
        if reserved and self.limiter is not None:
            self.limiter.settle(client, reserved, used)

    async def models(self, request: HttpRequest):
        try:
            self._admit(self._caller(request, LIST_MODELS))
        except OrcdError as err:
            self._count("/v1/models", err.code)
            return error_response(err)
        info = self.scheduler.model_info
        self._count("/v1/models", grpc.StatusCode.OK)
        return JSONResponse({"object": "list", "data": [self._card(info)] if info is not None else []})

    async def model(self, request: HttpRequest):
        try:
            self._admit(self._caller(request, LIST_MODELS))
            info = self.scheduler.model_info
            want = request.path_params["model_id"]
            if info is None or want != info.model_id:
                raise NotFound(f"no model {want[:128]!r} is loaded", field="model_id")
        except OrcdError as err:
            self._count("/v1/models", err.code)
            return error_response(err)
        self._count("/v1/models", grpc.StatusCode.OK)
        return JSONResponse(self._card(info))

    def _card(self, info) -> dict:
        card = oa.model_card(info)
        card["created"] = self._model_created.setdefault(info.model_id, card["created"])
        return card

    async def healthz(self, request: HttpRequest):
        ok = bool(self.health()) if self.health is not None else self.scheduler.engine is not None
        return Response("SERVING\n" if ok else "NOT_SERVING\n", 200 if ok else 503, media_type="text/plain")

    async def scrape(self, request: HttpRequest):
        if self.metrics is None:
            return JSONResponse(error_body("no metrics", "not_found_error", None, "not_found"), 404)
        if self.metrics_auth is not None:  # tokens are configured: a metrics-role one is needed
            verdict = security.authenticate(self.metrics_auth, [("authorization", request.headers.get("authorization") or "")])
            if not isinstance(verdict[0], str):
                status = 401 if verdict[0] == grpc.StatusCode.UNAUTHENTICATED else 403
                return JSONResponse(error_body(verdict[1], "authentication_error" if status == 401 else "permission_error",
                                               None, verdict[0].name.lower()), status)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _on_disconnect(request: HttpRequest, gone) -> None:
    """Calls gone() when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone()
            return


class _Run:
    """One submitted request's events, as a stream of SSE chunks or as one reply."""

    def __init__(self, door: FrontDoor, req: Request, kind: str, body, client: str, reserved: int, path: str):
        self.door, self.req, self.kind, self.body = door, req, kind, body
        self.client, self.reserved, self.path = client, reserved, path
        self.reply = oa.Reply(kind, req.request_id, req.model_id)
        wants = body.logprobs if kind == "chat" else body.logprobs is not None
        self.logprobs = oa.LogprobsBuilder(kind, req.engine.tokenizer) if wants else None
        self.generated = 0
        self._closed = False
        self._gone = False
        usage = door.usage
        self._label = usage.label(client) if usage is not None else None
        if usage is not None:
            usage.prompt_tokens.labels(self._label).inc(req.prompt_tokens)

    def gone(self) -> None:
        self._gone = True
        self.door.scheduler.abandon(self.req)

    def close(self) -> None:
        """However the call ended: a request still live is abandoned, the reservation settled."""
        if self._closed:
            return
        self._closed = True
        self.door.scheduler.abandon(self.req)
        self.door._settle(self.client, self.reserved, self.generated)

    async def _next(self):
        ev = await self.req.events.next(self.door.scheduler.alive)
        if isinstance(ev, TokenEvent):
            self.generated += 1
            if self.door.usage is not None:
                self.door.usage.generated_tokens.labels(self._label).inc()
        return ev

    def _failure(self, ev) -> OrcdError:
        if isinstance(ev, ErrorEvent):
            return ev.error
        return Unavailable(f"the request was cancelled: {ev.detail or 'the worker is stopping'}")

    def _token_logprobs(self, ev):
        if self.logprobs is None:
            return None
        out = self.logprobs.add(ev)
        _sanitize(out)
        return out

    async def collect(self, headers: dict):
        texts = []
        while True:
            ev = await self._next()
            if isinstance(ev, TokenEvent):
                texts.append(ev.text)
                self._token_logprobs(ev)
                continue
            if isinstance(ev, FinishedEvent) and ev.reason != CANCELLED:
                self.door._count(self.path, grpc.StatusCode.OK)
                lp = self.logprobs.result() if self.logprobs is not None else None
                resp = JSONResponse(self.reply.complete("".join(texts), ev, lp), headers=headers)
                return resp
            err = self._failure(ev)
            # a client that went away is counted as gRPC counts a cancelled call, not as an outage
            self.door._count(self.path, grpc.StatusCode.CANCELLED if self._gone else err.code)
            resp = error_response(err, self.kind, self.body)
            resp.headers.update(headers)
            return resp

    async def events(self):
        opts = self.body.stream_options
        with_usage = bool(opts and opts.include_usage)
        if self.kind == "chat":
            yield _sse(self.reply.chunk(role=True, text="", with_usage=with_usage))
        while True:
            ev = await self._next()
            if isinstance(ev, TokenEvent):
                lp = self._token_logprobs(ev)
                if ev.text or lp is not None:
                    yield _sse(self.reply.chunk(text=ev.text, logprobs=lp, with_usage=with_usage))
                continue
            if isinstance(ev, FinishedEvent) and ev.reason != CANCELLED:
                self.door._count(self.path, grpc.StatusCode.OK)
                yield _sse(self.reply.chunk(text=None if self.kind == "chat" else "",
                                            finish=oa.FINISH_REASONS[ev.reason], with_usage=with_usage))
                if with_usage:
                    yield _sse(self.reply.usage_chunk(ev))
                break
            err = self._failure(ev)
            self.door._count(self.path, err.code)
            status, type_ = STATUS.get(err.code, (500, "server_error"))
            message, param = oa.rename(err, self.kind, self.body)
            yield _sse(error_body(message, type_, param, _code(err, param)))
            break
        yield "data: [DONE]\n\n"


def _sanitize(lp: dict) -> None:
    for entry in lp.get("content") or ():
        entry["logprob"] = _finite(entry["logprob"])
        for alt in entry["top_logprobs"]:
            alt["logprob"] = _finite(alt["logprob"])
    if "token_logprobs" in lp:
        lp["token_logprobs"] = [_finite(x) for x in lp["token_logprobs"]]
        lp["top_logprobs"] = [{t: _finite(v) for t, v in d.items()} for d in lp["top_logprobs"]]
