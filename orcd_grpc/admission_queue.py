"""The waiting queue's order and what a caller is told about its wait.

Order: priority (larger first), then arrival, so a preempted request goes back to its own place
rather than behind everything that arrived after it. Under KV pressure the scheduler preempts
`preemption_victim`: the running request of lowest priority, the latest among equals.

Estimates (`StartEstimator`) schedule the work ahead of a new request onto the worker's sequence
slots: each running sample keeps its slot for its remaining tokens, each queued request ahead
takes slots for its prefill steps and its expected tokens, and a step lasts the recent smoothed
step time. The request starts when enough slots for its n samples are free. KV pressure, prefix
hits and stop strings are not modelled: it is an estimate for a client deciding whether to wait,
and for refusing at once a request whose deadline falls before its estimated first token.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time
from types import SimpleNamespace
from typing import Iterable, Iterator

from . import security
from .errors import PermissionDenied, ResourceExhausted

# Completion tokens assumed for a sample with no max_tokens until finished requests say better.
DEFAULT_EXPECTED_TOKENS = 256
_ALPHA = 0.2  # weight of the newest observation in the smoothed averages
MAX_RETRY_AFTER_MS = 600_000


def _key(req) -> tuple:
    return (-req.priority, req.arrival, req.queue_tick)


class AdmissionQueue:
    """Requests waiting for admission, in (priority desc, arrival) order."""

    def __init__(self):
        self._items: list = []
        self._ticks = itertools.count()

    def push(self, req) -> None:
        if req.queue_tick is None:  # once: a preempted request keeps its place among equals
            req.queue_tick = next(self._ticks)
        bisect.insort(self._items, req, key=_key)

    def position(self, req) -> int:
        """Requests that would be ahead of req (not yet queued)."""
        probe = (-req.priority, req.arrival, math.inf)
        return bisect.bisect_left(self._items, probe, key=_key)

    def head(self):
        return self._items[0]

    def popleft(self):
        return self._items.pop(0)

    def remove(self, req) -> None:
        self._items.remove(req)  # ValueError when absent, as a deque's

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator:
        return iter(list(self._items))


def request_priority(asked: int | None) -> int:
    """A request's scheduling priority: what it asked for (None: its token's, else 0). With
    tokens configured, more than the token's is PERMISSION_DENIED naming "priority"."""
    granted = security.CALL_PRIORITY.get()
    if asked is None:
        return granted or 0
    if granted is not None and asked > granted:
        raise PermissionDenied(f"{asked} exceeds the priority {granted} of the caller's token (an operator grants "
                               "more as --auth-token TOKEN:CLIENT:ROLES:PRIORITY)", field="priority")
    return asked


def preemption_victim(running: list):
    """The running request to give its KV back first: lowest priority, latest arrival among equals."""
    return min(running, key=lambda r: (r.priority, -r.arrival))


class StartEstimator:
    """Smoothed step time and completion length, and the start estimate built from them."""

    def __init__(self, token_budget: int = 2048):
        self.token_budget = max(1, token_budget)
        self.step_s: float | None = None  # None: no step seen yet, nothing is estimated
        self.expected_tokens = float(DEFAULT_EXPECTED_TOKENS)

    def observe_step(self, seconds: float) -> None:
        s = max(0.0, float(seconds))
        self.step_s = s if self.step_s is None else (1 - _ALPHA) * self.step_s + _ALPHA * s

    def observe_finish(self, completion_tokens: int) -> None:
        self.expected_tokens = (1 - _ALPHA) * self.expected_tokens + _ALPHA * max(1, int(completion_tokens))

    def _tokens(self, req) -> float:
        m = req.stopping.max_tokens
        return float(m) if m else self.expected_tokens

    def _prefill_steps(self, req) -> int:
        return -(-req.prompt_tokens // self.token_budget)

    def prefill_ms(self, req) -> float:
        return 1000.0 * self._prefill_steps(req) * (self.step_s or 0.0)

    def start_ms(self, req, running: Iterable, ahead: Iterable, slots: int) -> float:
        """Milliseconds until req's prefill is expected to start: 0 when its samples fit the free
        slots and nothing waits ahead of it, or when no step time is known yet."""
        step = self.step_s
        busy: list[float] = []
        for r in running:
            left = self._tokens(r)
            for smp in r.live_samples():
                busy.append(max(1.0, left - len(smp.generated)) * step if step else 0.0)
        ahead = list(ahead)
        if not ahead and len(busy) + req.n <= slots:
            return 0.0
        if not step:
            return 0.0
        # free slots are free now; a full batch frees its slots as its samples finish
        heap = sorted(busy)[:slots] + [0.0] * max(0, slots - len(busy))
        heapq.heapify(heap)
        for r in ahead:
            need = min(r.n, len(heap))
            starts = [heapq.heappop(heap) for _ in range(need)]
            at = max(starts)  # its samples start together
            work = (self._prefill_steps(r) + self._tokens(r)) * step
            for _ in range(need):
                heapq.heappush(heap, at + work)
        return 1000.0 * heapq.nsmallest(min(req.n, len(heap)), heap)[-1]

    def wait_ms(self, prompt_tokens: int, running: list, waiting: Iterable, slots: int) -> float:
        """Milliseconds until a new one-sample request of prompt_tokens uncached tokens, queued
        behind everything waiting, has its first token (start plus prefill): Probe's estimate and
        a full queue's retry hint, from the same model as Started's."""
        # what start_ms reads of a request, for one not built: one sample, no max_tokens
        req = SimpleNamespace(n=1, stopping=SimpleNamespace(max_tokens=0), prompt_tokens=max(1, int(prompt_tokens)))
        return self.start_ms(req, running, waiting, slots) + self.prefill_ms(req)

    def place(self, req, waiting: AdmissionQueue, running: list, slots: int) -> None:
        """Sets req's queue position and estimated start, or refuses it (check_deadline)."""
        req.queue_position = waiting.position(req)
        ahead = itertools.islice(waiting, req.queue_position)
        req.estimated_start_ms = self.start_ms(req, running, ahead, slots)
        self.check_deadline(req, req.estimated_start_ms, time.monotonic())

    def check_deadline(self, req, start_ms: float, now: float) -> None:
        """RESOURCE_EXHAUSTED, with a retry hint, when req's deadline falls before its estimated
        first step ends; never for a request that starts at once."""
        if req.deadline is None or start_ms <= 0.0:
            return
        left_ms = 1000.0 * (req.deadline - now)
        first_ms = start_ms + self.prefill_ms(req)
        if first_ms <= left_ms:
            return
        # after this long, the queue ahead should have drained enough for the same deadline
        retry = int(min(MAX_RETRY_AFTER_MS, max(100.0, first_ms - left_ms)))
        raise ResourceExhausted(
            f"the deadline ({left_ms:.0f} ms left) falls before the request's estimated start in "
            f"{start_ms:.0f} ms (prefill {self.prefill_ms(req):.0f} ms more) behind the work queued and "
            f"running; retry after {retry} ms or with a longer deadline", field="deadline", retry_after_ms=retry)
