"""How requests and models end: cancel reasons, draining, and models retired by a swap.

The scheduler owns the requests and runs everything on its engine thread; this module holds the
policy it calls into, so that the scheduler stays about batching:

  * which CancelReason a cancelled request gets and whether a retry elsewhere is safe;
  * `Retiring`: models replaced by LoadModel that still finish the requests admitted to them
    (the swap keeps both in memory, which the load already checked), freed after their last one;
  * `Lifecycle`: Drain (admission stops, health NOT_SERVING, optionally wait until idle) and the
    memory a new model may take beside the models still loaded.
"""
from __future__ import annotations

import time
from typing import Callable

from . import logs
from .errors import InvalidArgument, OutOfRange, ResourceExhausted
from .request import CLIENT_DISCONNECT, DEADLINE_EXCEEDED, WORKER_REASONS

log = logs.get_logger("orcd.lifecycle")

DRAINING = ("the worker is draining (Drain was called): it admits no new requests; "
            "send this one to another worker")
DEFAULT_DRAIN_WAIT_MS = 30_000
MAX_DRAIN_WAIT_MS = 600_000
_IDLE_POLL_S = 0.05


# ---- cancel reasons ------------------------------------------------------------------------------

# A client's gRPC stack ends a call at its own deadline, a moment before the server's copy of it
# (sent as a relative timeout, started when the server received it) runs out: a call that ends
# this close to the request's deadline ended because of it.
DEADLINE_SLACK_S = 0.1


def gone_reason(req, now: float | None = None) -> tuple[str, str]:
    """(reason, detail) of a request whose call ended under it: the client closed it, or its
    deadline passed (gRPC ends both the same way; the request's deadline tells them apart)."""
    now = time.monotonic() if now is None else now
    if req.deadline is not None and now >= req.deadline - DEADLINE_SLACK_S:
        return DEADLINE_EXCEEDED, "deadline exceeded"
    return CLIENT_DISCONNECT, "the client went away"


def retry_safe(reason: str, completion_tokens: int) -> bool:
    """Whether another worker may run the request again: the worker ended it for its own reasons
    and no token of it was streamed (a token generated but not streamed is not counted)."""
    return reason in WORKER_REASONS and completion_tokens == 0


# ---- memory beside the served model ----------------------------------------------------------------

def left_beside(held_by: list, backend: str, limit: int, flag: str, field: str) -> int:
    """What `limit` (0: none) leaves a model loading beside the engines in `held_by` (the served
    one and those still finishing their requests) that hold memory of its kind (`backend`)."""
    from .backends.factory import HOST_BACKENDS

    kinds = HOST_BACKENDS if backend in HOST_BACKENDS else {backend}
    held_by = [e for e in held_by if e is not None and e.info.backend in kinds]
    if not limit or not held_by:
        return limit
    held = sum(e.info.vram_bytes for e in held_by)
    if held >= limit:
        names = ", ".join(e.info.model_id for e in held_by)
        raise ResourceExhausted(f"{flag} {limit / 2**30:.2f} GiB is held by the loaded model(s) {names} "
                                f"({held / 2**30:.2f} GiB); unload first", field=field)
    return limit - held


def drop_frames(exc: BaseException) -> None:
    """Cuts the tracebacks off a failed load's exception chain. Their frames hold the new model
    (its weights, reader and tokenizer) for as long as anyone keeps the exception, and the
    caller, a log record or the gRPC layer may keep it well after the load was refused."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


# ---- models retired by a swap ------------------------------------------------------------------------

class Retiring:
    """Engines replaced by LoadModel that still run requests admitted or queued for them. Touched
    only on the engine thread (the swap, the steps, unload), read by UnloadModel through it."""

    def __init__(self):
        self._engines: list = []

    def __contains__(self, engine) -> bool:
        return any(e is engine for e in self._engines)

    def __iter__(self):
        return iter(list(self._engines))

    def __len__(self) -> int:
        return len(self._engines)

    def add(self, engine) -> None:
        self._engines.append(engine)
        log.info("model replaced; it finishes its requests", extra={"fields": {"model_id": engine.info.model_id}})

    def named(self, model_id: str) -> list:
        return [e for e in self._engines if e.info.model_id == model_id]

    def close_idle(self, live: set[int], force: bool = False) -> list:
        """Closes (and forgets) each retired engine no live request uses (every one with force);
        returns them."""
        done = [e for e in self._engines if force or id(e) not in live]
        for e in done:
            self._engines.remove(e)
            try:
                e.close()
            except Exception:
                log.exception("closing a retired model failed")
            log.info("retired model freed", extra={"fields": {"model_id": e.info.model_id}})
        return done


# ---- drain ---------------------------------------------------------------------------------------------

class Lifecycle:
    """Drain and resume. `on_change` re-evaluates health (server.Worker) when draining flips."""

    def __init__(self, scheduler, on_change: Callable[[], None] = lambda: None):
        self.scheduler = scheduler
        self._on_change = on_change

    @property
    def draining(self) -> bool:
        return self.scheduler.closed is not None

    def check(self, wait: bool, wait_timeout_ms: int, resume: bool) -> float:
        """The wait in seconds a DrainRequest asks for; errors name the field."""
        if resume and (wait or wait_timeout_ms):
            raise InvalidArgument("resume cannot be combined with wait or wait_timeout_ms", field="resume")
        if wait_timeout_ms > MAX_DRAIN_WAIT_MS:
            raise OutOfRange(f"must be at most {MAX_DRAIN_WAIT_MS} (10 minutes), got {wait_timeout_ms}",
                             field="wait_timeout_ms")
        if wait_timeout_ms and not wait:
            raise InvalidArgument("only meaningful with wait", field="wait_timeout_ms")
        return (wait_timeout_ms or DEFAULT_DRAIN_WAIT_MS) / 1000.0 if wait else 0.0

    def drain(self, wait_s: float = 0.0, active: Callable[[], bool] = lambda: True) -> dict:
        """Stops admission; waits up to wait_s for idleness while `active()` (the call is alive).
        Returns what DrainResponse reports."""
        stats = self.scheduler.stats()
        first = self.scheduler.closed is None
        self.scheduler.closed = DRAINING
        if first:
            log.info("draining", extra={"fields": {"running": stats["running"], "queued": stats["waiting"]}})
            self._on_change()
        t0 = time.monotonic()
        end = t0 + wait_s
        idle = self.scheduler.stats()["live"] == 0
        while not idle and time.monotonic() < end and active():
            time.sleep(_IDLE_POLL_S)
            idle = self.scheduler.stats()["live"] == 0
        return {"running": stats["running"], "queued": stats["waiting"], "idle": idle, "draining": True,
                "waited_ms": 1000.0 * (time.monotonic() - t0) if wait_s else 0.0}

    def resume(self) -> dict:
        stats = self.scheduler.stats()
        if self.scheduler.closed is not None:
            self.scheduler.closed = None
            log.info("drain ended; admitting requests again")
            self._on_change()
        return {"running": stats["running"], "queued": stats["waiting"], "idle": stats["live"] == 0,
                "draining": False, "waited_ms": 0.0}
