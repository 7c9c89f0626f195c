"""The OpenAI-compatible HTTP front door (issue #21): /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics, over the worker's own Scheduler, served inside the worker process
by uvicorn on its own thread and event loop (http_server.py).

A request takes the gRPC Execute path in the same order: bearer token and role (security.py), rate
limit and usage (ratelimit.py), the body as an ExecuteRequest (openai_schema.py) judged by
request_validation, then Scheduler.submit. Events come back on the request's queue
(loop_events: the loop is woken once per step for all its streams, and no thread sits blocked
per request); http_run.py turns them into the reply. A client that goes away has its request abandoned (the scheduler frees
its KV blocks at its next step).
"""
from __future__ import annotations

import json
import time

import grpc
import pydantic
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import http_tokens, logs, openai_reply as rp, openai_schema as oa, ratelimit, request_validation as rv, security
from .errors import NotFound, OrcdError, PermissionDenied, ResourceExhausted
from .http_errors import HttpError, Unauthenticated, error_body, error_response, pydantic_error
from .http_run import Run, respond
from .loop_events import LoopEvents
from .request import Request, Unavailable

log = logs.get_logger("orcd.http")

EXECUTE = "/orcd.v1.Worker/Execute"  # the gRPC method whose roles, limits and counters a request shares
LIST_MODELS = "/orcd.v1.Worker/ListModels"

class FrontDoor:
    """The HTTP application over one worker's scheduler; `app` is the ASGI app."""

    def __init__(self, scheduler, *, metrics=None, max_prompt_bytes: int = rv.prompt_guard.DEFAULT_MAX_PROMPT_BYTES,
                 checker: security.TokenChecker | None = None, limiter=None, usage=None,
                 metrics_auth: security.TokenChecker | None = None, health=None, max_body_bytes: int = 64 << 20,
                 max_samples: int = rv.DEFAULT_MAX_SAMPLES, tool_formats: dict[str, str] | None = None):
        self.scheduler = scheduler
        self.max_samples = max_samples
        self.tool_formats = dict(tool_formats or {})  # as WorkerServicer's: model id ("" for all) -> family
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
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/health", self.healthz, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.scrape, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed, Exception: self._crash})

    # ---- plumbing ----------------------------------------------------------------------------

    def count(self, path: str, code: grpc.StatusCode) -> None:
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

    def _admit(self, client: str, stopping=None, n: int = 1, scoring: bool = False) -> int:
        """Takes the client's rate-limit tokens (reserving generated tokens for an Execute); returns
        the reservation to settle. Raises ResourceExhausted with the retry delay when refused."""
        reserved = 0
        if self.limiter is not None:
            reserved = ratelimit.reservation(self.limiter, client, stopping, n, scoring) if stopping is not None else 0
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
            raise HttpError(413, f"the request body is {size} bytes; at most {self.max_body_bytes} are accepted")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_body_bytes:
                raise HttpError(413, f"the request body is over {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            raise pydantic_error(exc) from None

    def _prepare(self, pbreq, client: str, correlation: str, echo: bool) -> tuple[Request, tuple | None]:
        """As WorkerServicer._prepare, on a worker thread: tokenizing may take a while. Returns the
        request and, for completions' echo, (the prompt text, whether it was given as text)."""
        with logs.bound(correlation=correlation, request=""):
            rv.check_static(pbreq)
            n = rv.check_samples(pbreq.n, self.max_samples, self.scheduler.effective_max_sequences())
            engine = self.scheduler.engine
            if engine is None:
                raise Unavailable("no model is loaded yet")
            fmt = self.tool_formats.get(engine.info.model_id) or self.tool_formats.get("")
            prepared = rv.prepare_execute(pbreq, engine.info, engine.tokenizer, max_prompt_bytes=self.max_prompt_bytes,
                                          tool_format=fmt)
            req = Request(prepared.request_id, prepared.prompt_ids, prepared.sampling, prepared.stopping,
                          engine=engine, model_id=engine.info.model_id, correlation_id=correlation,
                          arrival=time.monotonic(), owner=client, priority=self._priorities.get(client, 0), n=n,
                          tool_use=prepared.tools)
            if not echo:
                return req, None
            if pbreq.WhichOneof("input") == "text":
                return req, (pbreq.text, True)
            return req, (engine.tokenizer.decode(req.prompt_ids), False)

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
        body, client, reserved, submitted = None, "", 0, []
        try:
            client = self._caller(request, EXECUTE)
            body = await self._json(request, model)
            pbreq = oa.to_execute(body, kind)
            count = len(oa.prompts(body)) if kind == "completions" else 1
            # a batch reserves for all its prompts' samples (admission may cap pbreq's max_tokens first)
            reserved = self._admit(client, pbreq.stopping, max(1, pbreq.n) * count, pbreq.HasField("prompt_logprobs"))
            pbreqs = oa.batch(pbreq, body) if kind == "completions" else [pbreq]
            echo = kind == "completions" and bool(body.echo)
            prepared = [await run_in_threadpool(self._prepare, r, client, correlation, echo) for r in pbreqs]
            events = LoopEvents()
            for i, (req, _) in enumerate(prepared):
                req.events = events.tagged(i)
                self.scheduler.submit(req)
                submitted.append(req)
        except OrcdError as err:
            for req in submitted:  # a batch is admitted whole or not at all
                self.scheduler.abandon(req)
            self.settle(client, reserved, 0)
            self.count(path, err.code)
            log.info("request rejected", extra={"fields": {"code": err.code.name, "error": str(err), "path": path}})
            resp = error_response(err, kind, body)
            resp.headers.update(headers)
            return resp
        except HttpError as err:
            self.settle(client, reserved, 0)
            self.count(path, grpc.StatusCode.INVALID_ARGUMENT)
            return JSONResponse(error_body(err.message, err.type, err.param, err.code),
                                err.status, headers=headers)
        except BaseException:  # a bug or a cancelled handler: the reservation is still given back
            for req in submitted:
                self.scheduler.abandon(req)
            self.settle(client, reserved, 0)
            raise
        headers["x-request-id"] = ",".join(req.request_id for req in submitted)
        run = Run(self, [req for req, _ in prepared], kind, body, client, reserved, path, events,
                  [e for _, e in prepared])
        return await respond(run, request, headers)

    def settle(self, client: str, reserved: int, used: int) -> None:
        if reserved and self.limiter is not None:
            self.limiter.settle(client, reserved, used)

    async def tokenize(self, request: HttpRequest):
        return await self._unary(request, http_tokens.TOKENIZE, "/tokenize", http_tokens.TokenizeBody,
                                 lambda body: http_tokens.tokenize(self.scheduler, body, self.max_prompt_bytes))

    async def detokenize(self, request: HttpRequest):
        return await self._unary(request, http_tokens.DETOKENIZE, "/detokenize", http_tokens.DetokenizeBody,
                                 lambda body: http_tokens.detokenize(self.scheduler, body))

    async def _unary(self, request: HttpRequest, method: str, path: str, model, answer):
        """A call answered by answer(body) on a threadpool thread, with the roles and request rate
        limit of the gRPC `method`."""
        try:
            self._admit(self._caller(request, method))
            body = await self._json(request, model)
            out = await run_in_threadpool(answer, body)
        except OrcdError as err:
            self.count(path, err.code)
            return error_response(http_tokens.renamed(err))
        except HttpError as err:
            self.count(path, grpc.StatusCode.INVALID_ARGUMENT)
            return JSONResponse(error_body(err.message, err.type, err.param, err.code), err.status)
        self.count(path, grpc.StatusCode.OK)
        return JSONResponse(out)

    async def models(self, request: HttpRequest):
        try:
            self._admit(self._caller(request, LIST_MODELS))
        except OrcdError as err:
            self.count("/v1/models", err.code)
            return error_response(err)
        info = self.scheduler.model_info
        self.count("/v1/models", grpc.StatusCode.OK)
        return JSONResponse({"object": "list", "data": [self._card(info)] if info is not None else []})

    async def model(self, request: HttpRequest):
        try:
            self._admit(self._caller(request, LIST_MODELS))
            info = self.scheduler.model_info
            want = request.path_params["model_id"]
            if info is None or want != info.model_id:
                raise NotFound(f"no model {want[:128]!r} is loaded", field="model_id")
        except OrcdError as err:
            self.count("/v1/models", err.code)
            return error_response(err)
        self.count("/v1/models", grpc.StatusCode.OK)
        return JSONResponse(self._card(info))

    def _card(self, info) -> dict:
        card = rp.model_card(info)
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
