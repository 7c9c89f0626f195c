"""The scheduler: one engine thread runs continuous batching over the served model.

Calls hand it validated `Request`s; it queues them (bounded; priority, then arrival:
admission_queue.py), admits them into the running batch while the engine has KV blocks for them,
steps the engine and pushes each request's events (tokens, then a finish per sample, or an error)
onto that request's own queue, which the calling thread drains.

Everything that touches the engine happens on the engine thread, including model swaps and
unloads (posted as commands and run between steps), so the engine never sees two callers at once
and a swap can never land in the middle of a forward pass.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Any, Callable

from . import lifecycle, logs, prompt_scoring, token_outcome
from .admission_queue import AdmissionQueue, StartEstimator, preemption_victim
from .model_management import ModelManagement, default_loader
from .errors import AlreadyExists, FailedPrecondition, Internal, NotFound, OrcdError, ResourceExhausted
from .overlap import Overlap
from .request import (CANCELLED, CLIENT_CANCEL, DEADLINE_EXCEEDED, LENGTH, MODEL_SWAPPED, MODEL_UNLOADED,
                      SERVER_SHUTDOWN, ErrorEvent, Request, Sample, TokenEvent, Unavailable)

log = logs.get_logger("orcd.scheduler")


def _make_decoder(tokenizer, stop: list[str]):
    from .detokenize import StreamDecoder

    return StreamDecoder(tokenizer, list(stop))


class Scheduler(ModelManagement):
    def __init__(self, *, max_queue: int = 256, max_sequences: int = 64, token_budget: int = 2048,
                 metrics=None, loader: Callable[..., Any] | None = None,
                 decoder_factory: Callable[..., Any] | None = None,
                 on_model_change: Callable[[Any], None] | None = None,
                 idle_wait_s: float = 0.05, speculation=None):
        if max_queue < 0 or max_sequences < 1 or token_budget < 1:
            raise ValueError("max_queue >= 0, max_sequences >= 1 and token_budget >= 1 are required")
        self.max_queue = max_queue
        self.max_sequences = max_sequences
        self.token_budget = token_budget
        self.metrics = metrics
        self._loader = loader or default_loader
        self._decoder_factory = decoder_factory or _make_decoder
        self._on_model_change = on_model_change
        self._idle_wait_s = idle_wait_s
        # speculation.Speculation: what requests that ask for none run with (None: off)
        self.speculation = speculation

        self._cv = threading.Condition()
        self._waiting = AdmissionQueue()
        self._estimator = StartEstimator(token_budget)
        self._running: list[Request] = []
        self._by_id: dict[tuple[str, str], Request] = {}  # (owner, request id) -> request
        self._commands: collections.deque = collections.deque()
        self._engine = None
        self._accepting = True
        self.closed: str | None = None  # why admission is stopped (Drain), None while open
        self.retiring = lifecycle.Retiring()  # replaced models finishing their requests
        self.on_engine_closed: Callable[[Any], None] | None = None
        self._stopping = False
        self._load_lock = threading.Lock()
        self._overlaps: dict[int, Overlap] = {}  # id(engine) -> its overlap loop
        self._thread = threading.Thread(target=self._loop, name="orcd-engine", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run_command(self, fn):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if not self._thread.is_alive():
                raise Unavailable("the engine thread has stopped")
            self._commands.append((fn, fut))
            self._cv.notify_all()
        return fut.result()

    # ------------------------------------------------------------------ requests

    def effective_max_sequences(self) -> int:
        e = self._engine
        cap = getattr(e.info, "max_sequences", 0) if e is not None else 0
        return min(self.max_sequences, cap) if cap else self.max_sequences

    def submit(self, req: Request) -> None:
        with self._cv:
            if not self._accepting or self.closed:
                raise Unavailable(self.closed or "the worker is shutting down")
            if self._engine is None:
                raise FailedPrecondition("no model is loaded")
            if req.engine is not self._engine:
                raise Unavailable("the model changed while the request was being prepared; retry")
            if req.key in self._by_id:  # only the owner's own ids: others' are not its business
                raise AlreadyExists(f"request {req.request_id!r} is already running", field="request_id")
            if len(self._waiting) >= self.max_queue:
                wait_ms = int(min(60_000, max(100.0, self._wait_ms_locked(1))))
                raise ResourceExhausted(f"the request queue is full ({self.max_queue} waiting)", retry_after_ms=wait_ms)
            self._estimator.place(req, self._waiting, self._running, self.effective_max_sequences())
            self._by_id[req.key] = req
            self._waiting.push(req)
            self._gauges_locked()
            self._cv.notify_all()

    def accepting(self) -> bool:
        return self._accepting and self.closed is None

    def cancel(self, request_id: str, reason: str = "cancelled by Cancel", *, owner: str = "") -> bool:
        """Cancels `owner`'s request `request_id`. Another client's request with that id answers
        NOT_FOUND exactly as an unknown id does, so Cancel cannot probe which ids others use."""
        with self._cv:
            req = self._by_id.get((owner, request_id))
            if req is None or req.done:
                raise NotFound(f"no running or queued request {request_id!r}", field="request_id")
            req.cancel(CLIENT_CANCEL, reason)
            self._cv.notify_all()
            return True

    def abandon(self, req: Request) -> None:
        """Cancels `req` if it is still live; used when its call ends under it (never raises)."""
        with self._cv:
            if not req.done:
                req.cancel(*lifecycle.gone_reason(req))
            self._cv.notify_all()

    def step_s(self) -> float | None:
        """The smoothed step time; None before the first step."""
        return self._estimator.step_s

    def wait_ms(self, prompt_tokens: int) -> float:
        """Estimated ms to the first token of a new request of prompt_tokens uncached tokens."""
        with self._cv:
            return self._wait_ms_locked(prompt_tokens)

    def _wait_ms_locked(self, prompt_tokens: int) -> float:
        return self._estimator.wait_ms(prompt_tokens, self._running, self._waiting, self.effective_max_sequences())

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._running), "live": len(self._by_id)}

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stops admitting, lets requests finish for up to `grace_s`, cancels the rest, frees the model."""
        with self._cv:
            self._accepting = False
            deadline = time.monotonic() + max(0.0, grace_s)
            while (self._waiting or self._running) and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.1))
            for req in list(self._waiting) + list(self._running):
                req.cancel(SERVER_SHUTDOWN, "the worker is shutting down")
            self._cv.notify_all()
            # The cancellations take effect at the next step boundary; wait for one step at most.
            end = time.monotonic() + 30.0
            while (self._waiting or self._running) and self._thread.is_alive() and time.monotonic() < end:
                self._cv.wait(0.05)
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30.0)
        e, self._engine = self._engine, None
        self._close_retired(force=True)
        if e is not None:
            self._closed_engine(e)
            self._model_changed(None)

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._commands or self._waiting or self._running):
                    self._cv.wait()
                if self._stopping and not self._commands:
                    self._drop_everything_locked()
                    return
                commands = list(self._commands)
                self._commands.clear()
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the caller of _run_command
                    fut.set_exception(exc)
            try:
                self._iteration()
            except Exception as exc:  # a scheduler bug must not take the worker down
                log.exception("scheduler iteration failed")
                err = Internal(f"scheduler failure: {type(exc).__name__}: {exc}")
                for req in list(self._running) + list(self._waiting):
                    self._fail(req, err)

    def _drop_everything_locked(self) -> None:
        for req in list(self._waiting) + list(self._running):
            req.cancel(SERVER_SHUTDOWN, "the worker stopped")
            self._release(req)
            self._emit_all(req, CANCELLED, "", req.cancel_reason)
        self._waiting.clear()
        self._running.clear()
        self._by_id.clear()

    def _iteration(self) -> None:
        engine = self._engine
        self._reap()
        with self._cv:  # queued for a model that is gone (the served one is always live)
            orphans = [r for r in self._waiting if r.engine is not engine and r.engine not in self.retiring]
        for req in orphans:
            self._cancel_now(req, *((MODEL_UNLOADED, "no model is loaded") if engine is None
                                    else (MODEL_SWAPPED, "the model was replaced")))
        self._admit()
        if self._running:
            for eng in {id(r.engine): r.engine for r in self._running}.values():  # a swap's old model too
                self._step(eng, [r for r in self._running if r.engine is eng])
        if self.retiring:
            self._close_retired()
        with self._cv:
            self._gauges_locked()
            self._cv.notify_all()

    def _reap(self) -> None:
        now = time.monotonic()
        with self._cv:
            victims = [r for r in list(self._waiting) + list(self._running)
                       if r.cancel_reason is not None or (r.deadline is not None and now >= r.deadline)]
        for req in victims:
            self._cancel_now(req, DEADLINE_EXCEEDED, "deadline exceeded")

    def _cancel_now(self, req: Request, kind: str, detail: str) -> None:
        req.cancel(kind, detail)  # a reason given earlier stays
        self._finish(req, CANCELLED, detail=req.cancel_reason)

    def _admit(self) -> bool:
        admitted = False
        limit = self.effective_max_sequences()
        while True:
            with self._cv:
                if not self._waiting:
                    return admitted
                req = self._waiting.head()
                if sum(r.width for r in self._running) + req.width > limit:
                    return admitted
            engine = req.engine  # live: _iteration cancelled those of a model that is gone
            try:
                req.start(engine, self._decoder_factory)
            except OrcdError as exc:
                self._fail(req, exc)
                continue
            if not req.can_admit(engine):
                if self._running:
                    return admitted
                # Nothing runs, so nothing will free KV blocks: this request can never be admitted
                # (the one tried, not whatever heads the queue by now: that may have just arrived).
                samples = f", {req.n} samples" if req.n > 1 else ""
                self._fail(req, ResourceExhausted(
                    f"the prompt ({req.prompt_tokens} tokens{samples}) needs more KV cache than the worker has",
                    field="input"))
                continue
            with self._cv:
                # By req, not the head: a request submitted meanwhile (the lock is free while req
                # starts) may sort ahead of it, and one cancelled meanwhile has left the queue.
                if req.done:
                    continue
                self._waiting.remove(req)
                self._running.append(req)
                self._gauges_locked()
            if req.admitted_at is None:
                req.admitted_at = time.monotonic()
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(req.admitted_at - req.arrival)
                    self.metrics.prompt_tokens.inc(req.prompt_tokens)
                log.debug("admitted", extra={"correlation_id": req.correlation_id, "request_id": req.request_id,
                                             "fields": {"prompt_tokens": req.prompt_tokens}})
            admitted = True

    def _step(self, engine, batch: list[Request]) -> None:
        ov = self._overlaps.get(id(engine))
        if ov is None or ov.engine is not engine:
            ov = self._overlaps[id(engine)] = Overlap(engine)
        t0 = time.monotonic()
        try:
            seqs = [seq for r in batch for seq in r.step_seqs(engine)]
            # the scheduler appends each token it accepts itself (_on_token)
            samples = ov.step(seqs, self.token_budget, self._may_follow(batch), append=False)
        except ResourceExhausted as exc:
            if len(batch) > 1:
                self._preempt(preemption_victim(batch))
            else:
                self._fail(batch[0], exc)
            return
        except Exception as exc:
            self._overlaps.pop(id(engine), None)
            if self.metrics is not None:
                self.metrics.engine_errors.inc()
            log.exception("engine step failed", extra={"fields": {"batch": [r.request_id for r in batch]}})
            err = exc if isinstance(exc, OrcdError) else Internal(
                f"engine step failed: {type(exc).__name__}: {exc}")
            for req in batch:
                self._fail(req, err)
            return
        dt = time.monotonic() - t0
        self._estimator.observe_step(dt)
        if self.metrics is not None:
            self.metrics.step_seconds.observe(dt)
            if ov.last_kind is not None:
                self.metrics.steps.labels(ov.last_kind).inc()
                self.metrics.step_kind_seconds.labels(ov.last_kind).inc(dt)
        for req in batch:
            if getattr(req.seq, "prompt_scores", None) and not req.done:  # a prefill chunk's, first
                for ev in prompt_scoring.take_events(req.seq, engine.tokenizer):
                    req.events.put(ev)
            for smp in req.live_samples():
                sample = samples.get(smp.seq.seq_id)
                if sample is None:
                    continue
                for one in (sample, *sample.following):  # a verify step's tokens, until one ends it
                    if req.done or smp.done:
                        break
                    self._on_token(engine, req, smp, one)
        try:
            ov.settle()  # every matcher has its token now
        except Exception:  # the next step's launch queues it again, and reports what fails
            log.debug("settling the step in flight failed", exc_info=True)

    @staticmethod
    def _may_follow(batch: list[Request]):
        """Whether a step may be launched past the one in flight: not when that one brings a
        request to its max_tokens (the step would only keep the device from the next request)."""
        limits = {smp.seq.seq_id: r.stopping.max_tokens for r in batch for smp in r.samples}

        def ok(seq) -> bool:
            m = limits[seq.seq_id]
            return not m or len(seq.output_ids) + 2 <= m
        return ok

    def _preempt(self, req: Request) -> None:
        """Gives a running request's KV back and requeues it in its place (its priority, then its
        arrival: ahead of what came later).

        The engine's sequences keep their tokens and sampler state; once readmitted each recomputes
        the KV of prompt and output and carries on as if never interrupted.
        """
        self._release(req)
        with self._cv:
            if req in self._running:
                self._running.remove(req)
            self._waiting.push(req)
            self._gauges_locked()
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        log.info("preempted for lack of KV blocks", extra={
            "correlation_id": req.correlation_id, "request_id": req.request_id,
            "fields": {"generated": len(req.generated)}})

    def _on_token(self, engine, req: Request, smp: Sample, sample) -> None:
        now = time.monotonic()
        if req.cancel_reason is not None or (req.deadline is not None and now >= req.deadline):
            # Cancelled (or out of time) while this step ran: the token is never streamed, so it
            # must not be counted in the request's usage either.
            self._cancel_now(req, DEADLINE_EXCEEDED, "deadline exceeded")
            return
        if req.stopping.score_only:  # its prompt is scored: the sample is nobody's
            self._finish(req, LENGTH)
            return
        tid = int(sample.token_id)
        generated = smp.generated
        index = len(generated)
        smp.seq.append(tid)  # its constraint, if any, advances past it
        if smp.seq.constraint is not None and smp.seq.constraint.error:
            # its matcher hit a limit of llguidance's (the token was EOS, all it then allows)
            self._fail(req, smp.seq.constraint.error)
            return
        m = self.metrics
        if smp.first_token_at is None:
            smp.first_token_at = now
            if m is not None and smp.index == 0:
                m.ttft.observe(now - req.arrival)
                m.prefix_hits.inc(int(getattr(smp.seq, "cached_prompt_tokens", 0) or 0))
            if m is not None:
                m.tokens.record(None)
        elif m is not None:
            m.tokens.record(now - smp.last_token_at)
        smp.last_token_at = now

        text, reason, matched = token_outcome.judge(engine, req, smp, tid)
        top = token_outcome.alternatives(engine.tokenizer, sample)
        req.events.put(TokenEvent(tid, text, index, float(sample.logprob), top, smp.index))
        if reason is not None:
            self._finish_sample(req, smp, reason, matched)

    # ------------------------------------------------------------------ retiring

    def _release(self, req: Request, samples: list[Sample] | None = None) -> None:
        for smp in req.samples if samples is None else samples:
            if smp.seq is None:
                continue
            try:
                req.engine.release(smp.seq)
            except Exception:
                log.exception("releasing KV failed", extra={"request_id": req.request_id})

    def _remove(self, req: Request) -> bool:
        with self._cv:
            if req.done:
                return False
            req.done = True
            if req in self._running:
                self._running.remove(req)
            try:
                self._waiting.remove(req)
            except ValueError:
                pass
            if self._by_id.get(req.key) is req:
                del self._by_id[req.key]
            # before the request's last event can reach its client: a scrape after the response
            # sees it gone, as the endpoint picker's aliases (read at scrape time) do
            self._gauges_locked()
        # Its matchers (one per sample) go with the request, however it ends.
        for sampling in [req.sampling] + [getattr(smp.seq, "sampling", None) for smp in req.samples]:
            c = getattr(sampling, "constraint", None)
            if c is not None:
                c.close()
        return True

    def _finish(self, req: Request, reason: str, matched: str = "", detail: str = "") -> None:
        """Ends the whole request: each sample still live finishes with `reason`."""
        if not self._remove(req):
            return
        self._release(req)
        self._emit_all(req, reason, matched, detail)

    def _finish_sample(self, req: Request, smp: Sample, reason: str, matched: str = "") -> None:
        """Ends one sample (its KV freed at once); the request ends with its last one."""
        smp.done = True
        self._release(req, [smp])
        if req.live_samples() or self._remove(req):
            self._emit_finished(req, smp, reason, matched, "")

    def _emit_all(self, req: Request, reason: str, matched: str, detail: str) -> None:
        for smp in req.end_samples():
            self._emit_finished(req, smp, reason, matched, detail)

    def _fail(self, req: Request, err: OrcdError) -> None:
        if not self._remove(req):
            return
        self._release(req)
        log.warning("request failed", extra={"correlation_id": req.correlation_id, "request_id": req.request_id,
                                             "fields": {"error": str(err), "code": err.code.name}})
        req.events.put(ErrorEvent(err))

    def _emit_finished(self, req: Request, smp: Sample, reason: str, matched: str, detail: str) -> None:
        now = time.monotonic()
        ev = req.finished_event(smp, reason, matched, detail, now)
        n = ev.completion_tokens
        kind = req.cancel_kind if reason == CANCELLED else ""
        # safe to retry elsewhere only if nothing of any sample reached the client
        ev.cancel_reason = kind
        ev.retry_safe = lifecycle.retry_safe(kind, sum(len(x.generated) for x in req.samples))
        if reason != CANCELLED:
            self._estimator.observe_finish(n)
        if self.metrics is not None:
            self.metrics.finished.labels(reason).inc()
            if ev.draft_tokens:
                self.metrics.draft_tokens.inc(ev.draft_tokens)
                self.metrics.accepted_draft_tokens.inc(ev.accepted_draft_tokens)
            if kind:
                self.metrics.cancelled.labels(kind).inc()
        log.info("request finished", extra={"correlation_id": req.correlation_id, "request_id": req.request_id,
                                            "fields": {"reason": reason, "cancel_reason": kind, "detail": detail,
                                                       "sample": smp.index,
                                                       "prompt_tokens": ev.prompt_tokens,
                                                       "completion_tokens": n,
                                                       "ttft_ms": round(ev.time_to_first_token_ms, 2),
                                                       "draft_tokens": ev.draft_tokens,
                                                       "accepted_draft_tokens": ev.accepted_draft_tokens,
                                                       "total_ms": round(ev.total_ms, 2)}})
        req.events.put(ev)

    def _cancel_all(self, kind: str, detail: str, engine) -> None:
        with self._cv:
            victims = [r for r in list(self._waiting) + list(self._running) if r.engine is engine]
        for req in victims:
            self._cancel_now(req, kind, detail)

    def _gauges_locked(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.queue_depth.set(len(self._waiting))
        m.running.set(len(self._running))
        e = self._engine
        if e is not None:
            try:
                free, total = e.free_blocks(), e.total_blocks()
                m.kv_free.set(free)
                m.kv_used.set(total - free)
                m.kv_shared.set(e.shared_blocks())
            except Exception:
                pass
