"""The orcd.v1.Worker service: validation, error mapping and event streaming.

It stays thin on purpose: the scheduler owns all state, so anything here that fails (a bad
request, a client that goes away) leaves nothing behind except an abandoned request the scheduler
retires at its next step.
"""
from __future__ import annotations

import asyncio
import contextvars
import os
import queue
import threading
import time

import grpc

from . import (admission_queue, events, execute_stream, lifecycle, logs, loop_events, request_validation as rv, routing, security,
               token_service)
from .errors import FailedPrecondition, Internal, OrcdError, ResourceExhausted
from .proto import pb, pb_grpc
from .request import Request
from .scheduler import Scheduler

log = logs.get_logger("orcd.servicer")


class _LoadAborted(Exception):
    pass


def client_path(path, model_dirs: list[str]) -> str:
    """The served file as a client may name it to LoadModel: relative to the model directory that
    holds it, else its file name. Any token holder can list models; the worker's directory layout
    is none of their business (issue #15: no server path in what a client reads)."""
    real = os.path.realpath(str(path))
    for d in model_dirs:
        root = os.path.realpath(d)
        if real.startswith(root + os.sep):
            return os.path.relpath(real, root)
    return os.path.basename(real)


# KVCacheType <-> the loader's names (KV_CACHE_TYPE_Q8_0 <-> "q8_0")
_KV_NAMES = {v: pb.KVCacheType.Name(v).removeprefix("KV_CACHE_TYPE_").lower() for v in pb.KVCacheType.values() if v}
_KV_ENUM = {name: value for value, name in _KV_NAMES.items()}


def describe(info, model_dirs: list[str] = ()) -> pb.ModelDescription:
    return pb.ModelDescription(
        model_id=info.model_id, path=client_path(info.path, list(model_dirs)), architecture=info.architecture,
        name=info.name or "",
        parameters=int(info.parameters), tensor_types={k: int(v) for k, v in info.tensor_types.items()},
        context_length=int(info.context_length), trained_context_length=int(info.trained_context_length),
        vocab_size=int(info.vocab_size), weights_bytes=int(info.weights_bytes),
        kv_cache_bytes=int(info.kv_cache_bytes), workspace_bytes=int(info.workspace_bytes),
        backend=info.backend, has_chat_template=bool(info.has_chat_template),
        load_seconds=float(info.load_seconds), max_sequences=int(info.max_sequences),
        kv_cache_type=_KV_ENUM[info.kv_cache_type], draft_model=info.draft_model or "",
        draft_bytes=int(info.draft_bytes))


def _metadata_correlation(context) -> str:
    # The server's interceptor binds the id already; this covers a servicer used without it.
    for key, value in context.invocation_metadata() or ():
        if key == "x-correlation-id" and value:
            return str(value)[:128]
    return ""


def _without_paths(err: OrcdError, path, model_dirs) -> OrcdError:
    """err with the server's directories cut out of its message (a caller learns the file name it
    sent, not where the worker keeps its models); the log keeps the full text."""
    msg = str(err)
    cuts = {str(path): path.name, str(path.parent): "<model dir>"}
    for d in model_dirs:
        cuts[str(d)] = "<model dir>"
        cuts[os.path.realpath(d)] = "<model dir>"
    for full in sorted(cuts, key=len, reverse=True):  # the file before its directory
        if len(full) > 1:
            msg = msg.replace(full, cuts[full])
    if msg == str(err):
        return err
    out = type(err)(msg, retry_after_ms=err.retry_after_ms)
    out.field = err.field
    return out


def _abort(context, err: OrcdError):
    if err.retry_after_ms is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(err.retry_after_ms))),))
    context.abort(err.code, str(err))


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, scheduler: Scheduler, *, model_dirs: list[str] | None = None, backend: str = "auto",
                 max_context: int = 0, max_vram: int = 0, metrics=None, max_ram: int = 0,
                 max_prompt_bytes: int = rv.prompt_guard.DEFAULT_MAX_PROMPT_BYTES,
                 max_samples: int = rv.DEFAULT_MAX_SAMPLES, tool_formats: dict[str, str] | None = None,
                 life: lifecycle.Lifecycle | None = None, hub: events.EventHub | None = None,
                 kv_cache_type: str = "", executor=None):
        self.scheduler = scheduler
        # where Execute's submissions run off the event loop (the server's handler pool; None: the
        # loop's default executor)
        self.executor = executor
        self.kv_cache_type = kv_cache_type  # --kv-cache-type: what a load that names none gets
        self.max_samples = max_samples
        # --tool-format: model id -> tool_calls family ("" for every model), over the detected one
        self.tool_formats = dict(tool_formats or {})
        self.life = life or lifecycle.Lifecycle(scheduler)
        self.hub = hub or events.EventHub()
        self.max_prompt_bytes = max_prompt_bytes
        self.model_dirs = [str(d) for d in (model_dirs or [])]
        self.backend = backend
        self.max_context = max_context
        self.max_vram = max_vram
        self.max_ram = max_ram
        self.metrics = metrics

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(method, code.name).inc()

    # ------------------------------------------------------------------ Execute

    async def Execute(self, request, context):
        """A coroutine on the server's event loop (grpc_loop): the request is validated, tokenized
        and submitted on a pool thread (a long prompt must not hold up the other streams), then
        its events stream from the loop."""
        arrival = time.monotonic()
        correlation = logs.correlation_id.get() or _metadata_correlation(context) or logs.new_correlation_id()
        remaining = context.time_remaining()
        deadline = arrival + remaining if remaining is not None else None
        owner = security.client_identity(context)
        loop = asyncio.get_running_loop()
        events = loop_events.LoopEvents()
        submitting = loop.run_in_executor(self.executor, contextvars.copy_context().run, self._submit, request,
                                          arrival, deadline, owner, correlation, events)
        try:
            req = await submitting
        except OrcdError as err:
            self._count("Execute", err.code)
            log.info("request rejected", extra={"fields": {"code": err.code.name, "error": str(err)}})
            await execute_stream.abort(context, err)
            return
        except asyncio.CancelledError:  # the client left while its request was being submitted
            submitting.add_done_callback(
                lambda f: f.cancelled() or f.exception() is not None or self.scheduler.abandon(f.result()))
            raise
        with logs.bound(request=req.request_id):
            async for response in execute_stream.stream(req, context, self.scheduler,
                                                        lambda code: self._count("Execute", code),
                                                        coalesce=request.coalesce_tokens):
                yield response

    def _submit(self, request, arrival: float, deadline: float | None, owner: str, correlation: str,
                events) -> Request:
        rv.check_request_id(request.request_id, allow_empty=True)
        rv.check_static(request)
        n = rv.check_samples(request.n, self.max_samples, self.scheduler.effective_max_sequences())
        priority = admission_queue.request_priority(request.priority if request.HasField("priority") else None)
        engine = self.scheduler.engine
        if engine is None:
            raise FailedPrecondition("no model is loaded; call LoadModel first")
        fmt = self.tool_formats.get(engine.info.model_id) or self.tool_formats.get("")
        prepared = rv.prepare_execute(request, engine.info, engine.tokenizer,
                                      max_prompt_bytes=self.max_prompt_bytes, tool_format=fmt,
                                      speculation_default=self.scheduler.speculation)
        req = Request(prepared.request_id, prepared.prompt_ids, prepared.sampling, prepared.stopping,
                      engine=engine, model_id=engine.info.model_id, correlation_id=correlation,
                      deadline=deadline, arrival=arrival, owner=owner, n=n,
                      priority=priority, tool_use=prepared.tools)
        req.events = events
        self.scheduler.submit(req)
        return req

    # ------------------------------------------------------------------ Cancel

    def Cancel(self, request, context):
        try:
            rid = rv.check_request_id(request.request_id, allow_empty=False)
            ok = self.scheduler.cancel(rid, owner=security.client_identity(context))
        except OrcdError as err:
            self._count("Cancel", err.code)
            _abort(context, err)
            return None
        log.info("cancel requested", extra={"request_id": rid})
        self._count("Cancel", grpc.StatusCode.OK)
        return pb.CancelResponse(cancelled=ok)

    # ------------------------------------------------------------------ models

    def LoadModel(self, request, context):
        try:
            path = rv.resolve_model_path(request.path, self.model_dirs)
            model_id = request.model_id or rv.default_model_id(path)
            rv.check_model_id(model_id)
            ctx = int(request.context_length)
            rv.check_context_length(ctx, self.max_context)
            draft = rv.resolve_draft_path(request.draft_path, self.model_dirs) if request.draft_path else None
            kv_type = rv.kv_cache_type(int(request.kv_cache_type), _KV_NAMES, self.kv_cache_type)
        except OrcdError as err:
            self._count("LoadModel", err.code)
            _abort(context, err)
            return
        if request.dry_run:
            yield from self._plan_load(path, ctx, kv_type, context)
            return

        events: queue.Queue = queue.Queue()
        abandoned = threading.Event()

        def progress(stage: str, done: int, total: int) -> None:
            if abandoned.is_set():
                # The caller is gone: stop the load instead of swapping in a model nobody waits for.
                raise _LoadAborted("LoadModel call ended")
            events.put(("progress", str(stage), int(done), int(total)))

        def run() -> None:
            try:
                # With context_length 0 the engine takes the trained length capped by max_context.
                info = self.scheduler.load(path, model_id=model_id, context_length=ctx,
                                           max_context=self.max_context, backend=self.backend,
                                           max_vram=self.max_vram, max_ram=self.max_ram, progress=progress,
                                           draft_path=draft, kv_cache_type=kv_type)
                events.put(("done", info))
            except OrcdError as err:
                events.put(("error", _without_paths(err, path, self.model_dirs)))
            except _LoadAborted:
                events.put(("error", Internal("load aborted: the client went away")))
            except MemoryError:
                log.exception("model load failed")
                events.put(("error", ResourceExhausted(f"loading {path.name} ran out of host memory", field="path")))
            except Exception as exc:
                log.exception("model load failed")
                events.put(("error", _without_paths(
                    Internal(f"loading {path.name} failed: {type(exc).__name__}: {exc}"), path, self.model_dirs)))

        context.add_callback(abandoned.set)
        log.info("loading model", extra={"fields": {"path": str(path), "model_id": model_id,
                                                    "context_length": ctx}})
        threading.Thread(target=run, name="orcd-load", daemon=True).start()
        last_stage = ""
        try:
            while True:
                kind, *rest = events.get()
                if kind == "progress":
                    stage, done, total = rest
                    last_stage = stage
                    yield pb.LoadModelResponse(progress=pb.LoadProgress(stage=stage, bytes_done=done,
                                                                        bytes_total=total))
                elif kind == "done":
                    info = rest[0]
                    if last_stage != "ready":
                        yield pb.LoadModelResponse(progress=pb.LoadProgress(
                            stage="ready", bytes_done=int(info.weights_bytes), bytes_total=int(info.weights_bytes)))
                    self._count("LoadModel", grpc.StatusCode.OK)
                    yield pb.LoadModelResponse(model=describe(info, self.model_dirs))
                    return
                else:
                    err = rest[0]
                    self._count("LoadModel", err.code)
                    log.warning("model load failed", extra={"fields": {"error": str(err), "code": err.code.name}})
                    _abort(context, err)
                    return
        finally:
            abandoned.set()

    def _plan_load(self, path, ctx: int, kv_type: str, context):
        try:
            p = self.scheduler.plan_load(path, context_length=ctx, max_context=self.max_context,
                                         backend=self.backend, max_vram=self.max_vram, max_ram=self.max_ram,
                                         kv_cache_type=kv_type)
        except OrcdError as err:
            self._count("LoadModel", err.code)
            _abort(context, _without_paths(err, path, self.model_dirs))
            return
        except Exception as exc:
            log.exception("load plan failed")
            err = _without_paths(Internal(f"planning {path.name} failed: {type(exc).__name__}: {exc}"),
                                 path, self.model_dirs)
            self._count("LoadModel", err.code)
            _abort(context, err)
            return
        self._count("LoadModel", grpc.StatusCode.OK)
        yield pb.LoadModelResponse(plan=pb.LoadPlan(
            weights_bytes=p.weights_bytes, kv_cache_bytes=p.kv_cache_bytes, workspace_bytes=p.workspace_bytes,
            step_bytes=p.step_bytes, total_bytes=p.total_bytes, available_bytes=p.available_bytes or 0,
            has_limit=p.available_bytes is not None, fits=p.fits, reason=p.reason,
            context_length=p.context_length, max_sequences=p.max_sequences, backend=p.backend,
            kv_cache_type=_KV_ENUM[p.kv_cache_type]))

    def UnloadModel(self, request, context):
        try:
            rv.check_unload_model_id(request.model_id)
            self.scheduler.unload(request.model_id)
        except OrcdError as err:
            self._count("UnloadModel", err.code)
            _abort(context, err)
            return None
        self._count("UnloadModel", grpc.StatusCode.OK)
        return pb.UnloadModelResponse()

    def ListModels(self, request, context):
        info = self.scheduler.model_info
        self._count("ListModels", grpc.StatusCode.OK)
        return pb.ListModelsResponse(models=[describe(info, self.model_dirs)] if info is not None else [])

    # ------------------------------------------------------------------ hardware

    def HardwareInfo(self, request, context):
        engine = self.scheduler.engine
        gpu = None
        used = 0
        try:
            if engine is not None:
                backend = "cuda" if engine.info.backend == "cuda" else "cpu"  # the device kind: numpy runs on the CPU
                if backend == "cuda":
                    gpu = engine.gpu_info()
                    used = engine.info.vram_bytes
            else:  # no model yet: the device a load would use, and its free memory now
                from .backends.factory import idle_device

                backend, gpu = idle_device(self.backend)
            from .hardware import hardware_info

            from .worker_limits import worker_limits

            resp = hardware_info(backend, gpu, vram_used_by_worker=used, vram_limit=self.max_vram)
            resp.limits.CopyFrom(worker_limits(pb, self.scheduler, self.max_prompt_bytes))
        except Exception as exc:
            self._count("HardwareInfo", grpc.StatusCode.INTERNAL)
            context.abort(grpc.StatusCode.INTERNAL, f"hardware: {type(exc).__name__}: {exc}")
            return None
        self._count("HardwareInfo", grpc.StatusCode.OK)
        return resp

    # ------------------------------------------------------------------ token services

    def _unary(self, method: str, context, answer):
        """answer() on this handler thread (tokenizing, never on the engine thread), its OrcdError
        as the call's status."""
        try:
            resp = answer()
        except OrcdError as err:
            self._count(method, err.code)
            _abort(context, err)
            return None
        self._count(method, grpc.StatusCode.OK)
        return resp

    def Tokenize(self, request, context):
        return self._unary("Tokenize", context, lambda: token_service.tokenize(
            request, token_service.serving(self.scheduler, request.model_id), self.max_prompt_bytes, pb))

    def Detokenize(self, request, context):
        return self._unary("Detokenize", context, lambda: token_service.detokenize(
            request, token_service.serving(self.scheduler, request.model_id), pb))

    def RenderChat(self, request, context):
        return self._unary("RenderChat", context, lambda: token_service.render_chat(
            request, token_service.serving(self.scheduler, request.model_id), self.max_prompt_bytes, pb))
    # ------------------------------------------------------------------ lifecycle and routing

    def Drain(self, request, context):
        try:
            wait_s = self.life.check(bool(request.wait), int(request.wait_timeout_ms), bool(request.resume))
            out = self.life.resume() if request.resume else self.life.drain(wait_s, context.is_active)
        except OrcdError as err:
            self._count("Drain", err.code)
            _abort(context, err)
            return None
        self._count("Drain", grpc.StatusCode.OK)
        return pb.DrainResponse(**out)

    def Probe(self, request, context):
        try:
            out = routing.probe(self.scheduler, request, self.max_prompt_bytes)
        except OrcdError as err:
            self._count("Probe", err.code)
            _abort(context, err)
            return None
        self._count("Probe", grpc.StatusCode.OK)
        return pb.ProbeResponse(**out)

    def WatchEvents(self, request, context):
        sched = self.scheduler
        stream = events.watch(self.hub, request, context.is_active, lambda: routing.snapshot(sched),
                              lambda: [e for e in (sched.engine, *sched.retiring) if e is not None])
        try:
            first = next(stream, None)  # bad arguments and a full house answer before any event
        except OrcdError as err:
            self._count("WatchEvents", err.code)
            _abort(context, err)
            return
        self._count("WatchEvents", grpc.StatusCode.OK)
        if first is not None:
            yield first
            yield from stream
