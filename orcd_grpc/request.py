"""What one Execute call is to the scheduler: the request, its stopping rules, and the events the
scheduler puts on its queue (tokens, then one finish or error) for the calling thread to drain."""
from __future__ import annotations

import dataclasses
import queue
import time
import uuid
from typing import Any

import grpc

from .errors import OrcdError

STOP_TOKEN = "stop_token"
LENGTH = "length"
STOP_STRING = "stop_string"
CANCELLED = "cancelled"

# Why a request was cancelled (the proto's CancelReason, lower case; the metric's label values).
CLIENT_CANCEL = "client_cancel"
CLIENT_DISCONNECT = "client_disconnect"
DEADLINE_EXCEEDED = "deadline_exceeded"
MODEL_UNLOADED = "model_unloaded"
MODEL_SWAPPED = "model_swapped"
SERVER_SHUTDOWN = "server_shutdown"
PREEMPTED = "preempted"
# The worker's own reasons: the client did not ask for the end, so another worker may redo it.
WORKER_REASONS = frozenset({MODEL_UNLOADED, MODEL_SWAPPED, SERVER_SHUTDOWN, PREEMPTED})


class Unavailable(OrcdError):
    """The worker is shutting down (or the model changed under a request being submitted)."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclasses.dataclass
class Stopping:
    max_tokens: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    min_tokens: int = 0  # stop tokens and stop strings count only from this many tokens on


@dataclasses.dataclass
class TokenEvent:
    token_id: int
    text: str
    index: int
    logprob: float
    top: list[tuple[int, str, float]]


@dataclasses.dataclass
class FinishedEvent:
    reason: str
    matched_stop: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    queue_ms: float
    time_to_first_token_ms: float
    decode_tokens_per_second: float
    total_ms: float
    detail: str = ""
    cancel_reason: str = ""  # with CANCELLED: one of the reasons above
    retry_safe: bool = False


@dataclasses.dataclass
class ErrorEvent:
    error: OrcdError


class Request:
    """One Execute call as the scheduler sees it."""

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: Any, stopping: Stopping, *,
                 engine: Any, model_id: str, correlation_id: str = "", deadline: float | None = None,
                 arrival: float | None = None, owner: str = ""):
        self.request_id = request_id or str(uuid.uuid4())
        # The client identity (security.client_identity) the id belongs to: ids are unique per
        # client, and only the owner can cancel or even learn of a request.
        self.owner = owner
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.stopping = stopping
        self.engine = engine
        self.model_id = model_id
        self.correlation_id = correlation_id
        self.deadline = deadline  # time.monotonic() value, or None
        self.arrival = time.monotonic() if arrival is None else arrival
        self.events: queue.Queue = queue.Queue()
        self.seq = None  # the engine's sequence: it holds the tokens (the one copy of them)
        self.decoder = None
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.cancel_reason: str | None = None  # the detail logged; set once, by cancel()
        self.cancel_kind = ""  # one of the reasons above, set with it
        self.done = False

    def cancel(self, kind: str, detail: str) -> None:
        """Marks the request for cancellation (the scheduler ends it at its next step); the
        first reason given is the one reported."""
        if self.cancel_reason is None:
            self.cancel_kind, self.cancel_reason = kind, detail

    @property
    def key(self) -> tuple[str, str]:
        return self.owner, self.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated(self) -> list[int]:
        return self.seq.output_ids if self.seq is not None else []
