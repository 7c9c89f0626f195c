"""What one Execute call is to the scheduler: the request, its stopping rules, its samples, and
the events the scheduler puts on its queue (tokens, then a finish per sample, or an error) for the
calling thread to drain.

Parallel sampling: a request with n > 1 has n `Sample`s, each an engine sequence of its own with
its own decoder, timings and finish. The first prefills the prompt but its last token alone
(`Sequence.hold`); then `Engine.fork` shares that KV with the others, and every sample computes
the last prompt token and samples from there as any sequence does. Sample k runs with seed
(seed + k) mod 2^64 (`sample_seed`), so it is reproducible by a request with n = 1 and that seed.
"""
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
    score_only: bool = False  # prompt log-probs with max_tokens 0: the prefill, then no token


@dataclasses.dataclass
class TokenEvent:
    token_id: int
    text: str
    index: int
    logprob: float
    top: list[tuple[int, str, float]]
    sample: int = 0


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
    sample: int = 0
    cancel_reason: str = ""  # with CANCELLED: one of the reasons above
    retry_safe: bool = False
    draft_tokens: int = 0           # speculative decoding: drafts proposed, and those kept
    accepted_draft_tokens: int = 0


@dataclasses.dataclass
class ErrorEvent:
    error: OrcdError


def sample_seed(seed: int | None, k: int) -> int | None:
    """Sample k's seed: (seed + k) mod 2^64 (None stays None: every sample draws fresh entropy)."""
    return None if seed is None else (int(seed) + k) % (1 << 64)


def sample_sampling(sampling: Any, k: int) -> Any:
    """Sample k's sampling parameters: the request's, with sample_seed(seed, k), a matcher of
    its own for a constraint (a copy of the request's, at its start state), and no prompt scoring
    (sample 0 scores the prompt the samples share)."""
    if k == 0 or not dataclasses.is_dataclass(sampling):
        return sampling
    extra = {}
    if getattr(sampling, "constraint", None) is not None:
        extra["constraint"] = sampling.constraint.copy()
    if getattr(sampling, "prompt_logprobs", None) is not None:
        extra["prompt_logprobs"] = None
    return dataclasses.replace(sampling, seed=sample_seed(sampling.seed, k), **extra)


@dataclasses.dataclass(eq=False)
class Sample:
    """One of a request's n completions: its engine sequence (the one copy of its tokens), its
    stream decoder and its own timings. done: finished (its Finished event sent, its KV freed)."""
    index: int
    seq: Any = None
    decoder: Any = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False

    @property
    def generated(self) -> list[int]:
        return self.seq.output_ids if self.seq is not None else []


class Request:
    """One Execute call as the scheduler sees it."""

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: Any, stopping: Stopping, *,
                 engine: Any, model_id: str, correlation_id: str = "", deadline: float | None = None,
                 arrival: float | None = None, owner: str = "", n: int = 1, priority: int = 0,
                 tool_use: Any = None):
        self.request_id = request_id or str(uuid.uuid4())
        # The client identity (security.client_identity) the id belongs to: ids are unique per
        # client, and only the owner can cancel or even learn of a request.
        self.owner = owner
        self.prompt_ids = list(prompt_ids)
        # tool_prompt.ToolUse: how the servicer parses the output for tool calls and channels.
        self.tool_use = tool_use
        self.sampling = sampling
        self.stopping = stopping
        self.engine = engine
        self.model_id = model_id
        self.correlation_id = correlation_id
        self.deadline = deadline  # time.monotonic() value, or None
        self.arrival = time.monotonic() if arrival is None else arrival
        self.events: queue.Queue = queue.Queue()
        self.n = max(1, int(n))
        self.priority = int(priority)
        self.samples: list[Sample] = []  # made on first admission (start)
        self.forked = True  # False while samples 1..n-1 wait for sample 0's prefill (Engine.fork)
        self.queue_tick: int | None = None  # admission_queue's tie-break among equal arrivals
        self.queue_position = 0  # requests ahead of it when it was queued (Started)
        self.estimated_start_ms = 0.0
        self.admitted_at: float | None = None
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
    def seq(self):
        """Sample 0's engine sequence (None before admission)."""
        return self.samples[0].seq if self.samples else None

    @property
    def generated(self) -> list[int]:
        return self.samples[0].generated if self.samples else []

    def finished_event(self, smp: Sample, reason: str, matched: str, detail: str, now: float) -> FinishedEvent:
        """Sample smp's Finished event: its usage, and its timings from the request's arrival."""
        n = len(smp.generated)
        first, last = smp.first_token_at, smp.last_token_at
        tps = (n - 1) / (last - first) if n >= 2 and last is not None and last > first else 0.0
        return FinishedEvent(
            reason=reason, matched_stop=matched, prompt_tokens=self.prompt_tokens, completion_tokens=n,
            cached_prompt_tokens=int(getattr(smp.seq, "cached_prompt_tokens", 0) or 0) if smp.seq else 0,
            queue_ms=1000.0 * ((self.admitted_at or now) - self.arrival),
            time_to_first_token_ms=1000.0 * (first - self.arrival) if first else 0.0,
            decode_tokens_per_second=tps, total_ms=1000.0 * (now - self.arrival), detail=detail, sample=smp.index,
            draft_tokens=int(getattr(smp.seq, "draft_tokens", 0) or 0),
            accepted_draft_tokens=int(getattr(smp.seq, "accepted_drafts", 0) or 0))

    # ---- samples (engine thread) ------------------------------------------------------------
    def start(self, engine, decoder_factory) -> None:
        """Makes the samples' sequences (validating the request against the engine) and decoders;
        with n > 1 the first holds at its prompt's last token until step_seqs forks the others."""
        if self.samples:
            return
        seqs = [engine.new_sequence(self.prompt_ids, sample_sampling(self.sampling, k)) for k in range(self.n)]
        samples = [Sample(k, seq) for k, seq in enumerate(seqs)]
        for seq in seqs:  # a speculative step proposes no draft past it
            seq.max_output = int(self.stopping.max_tokens or 0)
        for smp in samples:
            smp.decoder = decoder_factory(engine.tokenizer, self.stopping.stop)
        if self.n > 1:
            seqs[0].hold = len(self.prompt_ids) - 1
            self.forked = False
        self.samples = samples

    def live_samples(self) -> list[Sample]:
        return [s for s in self.samples if not s.done]

    @property
    def width(self) -> int:
        """Sequences it holds in (or needs of) the batch: its live samples, n before it starts."""
        return len(self.live_samples()) if self.samples else self.n

    def end_samples(self) -> list[Sample]:
        """Marks every live sample done and returns them, for a Finished event each (a request
        never admitted gets placeholders: its caller still awaits n of them)."""
        if not self.samples:
            self.samples = [Sample(k) for k in range(self.n)]
        live = self.live_samples()
        for smp in live:
            smp.done = True
        return live

    def can_admit(self, engine) -> bool:
        """Whether the engine has KV blocks for the next step of every live sample."""
        if not self.forked:
            return engine.can_admit(self.samples[0].seq, samples=self.n)
        live = self.live_samples()
        if len(live) == 1:
            return engine.can_admit(live[0].seq)
        return engine.can_admit_all([s.seq for s in live])

    def step_seqs(self, engine) -> list:
        """The sequences of this request's next step: sample 0 alone until its prefill lets the
        others fork from it (ResourceExhausted: no block for the fork's copies), then every live one."""
        if not self.forked:
            if not engine.fork(self.samples[0].seq, [s.seq for s in self.samples[1:]]):
                return [self.samples[0].seq]
            self.forked = True
        return [s.seq for s in self.samples if not s.done]
