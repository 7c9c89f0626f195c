"""Per-client rate limits (requests/s and generated tokens/s) and per-client usage accounting.

Each client (see security.client_identity: token client id, verified certificate CN, else peer
address) has two token buckets:

  * requests: one token per RPC; a call that finds it empty is refused.
  * generated tokens: an Execute call reserves its stopping.max_tokens from the bucket when it is
    admitted (refused if the bucket cannot cover it) and is refunded what it did not generate
    when it ends, however it ends. Checking the level alone at admission let a concurrent burst
    through on one full bucket (20 calls generated 6x the allowance, and the debt then locked the
    client out for minutes); a reservation cannot be overdrawn. A call may not reserve more than
    the burst: an explicit max_tokens above it is OUT_OF_RANGE (it could never be served), and
    max_tokens 0 ("until the context is full") is capped to the burst. A request for n parallel
    samples (ExecuteRequest.n) reserves n x max_tokens, and its max_tokens 0 is capped to burst / n.

A refused call ends with RESOURCE_EXHAUSTED, a message naming the client and the limit, and the
trailing metadata "retry-after-ms": the time until the bucket would admit the call.

Usage (requests, prompt and generated tokens, refusals) is counted per client in Prometheus
counters with a "client" label. Label values are capped (max_label_clients; the rest are counted
as "other") so that a stream of peer addresses cannot grow the scrape without bound.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import OrderedDict
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter

from . import security
from .call_hooks import NO_HOOKS, Hooks, Policy
from .errors import OutOfRange

RETRY_AFTER_KEY = "retry-after-ms"
EXECUTE_METHOD = "/orcd.v1.Worker/Execute"


@dataclasses.dataclass
class RateLimits:
    requests_per_s: float = 0.0   # 0: no request limit
    request_burst: float = 0.0    # bucket size; 0: max(1, requests_per_s)
    tokens_per_s: float = 0.0     # generated tokens; 0: no token limit
    token_burst: float = 0.0      # bucket size; 0: 10 seconds' worth of tokens_per_s

    def __post_init__(self):
        for name in ("requests_per_s", "request_burst", "tokens_per_s", "token_burst"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"rate limit {name} must be a finite number >= 0, got {v!r}")
        if self.request_burst == 0 and self.requests_per_s:
            self.request_burst = max(1.0, self.requests_per_s)
        if self.token_burst == 0 and self.tokens_per_s:
            self.token_burst = max(1.0, 10.0 * self.tokens_per_s)

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_s or self.tokens_per_s)


class TokenBucket:
    """A bucket of `burst` tokens refilled at `rate` per second; the level may go negative (debt)."""

    __slots__ = ("rate", "burst", "level", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.level, self.stamp = float(rate), float(burst), float(burst), now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)  # a clock that steps back must not mint tokens

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until the level reaches `amount` (0 when it already has)."""
        self.refill(now)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float, now: float) -> float:
        """Takes `amount` if available and returns 0, else takes nothing and returns the wait."""
        wait = self.wait_for(amount, now)
        if wait == 0.0:
            self.level -= amount
        return wait

    def charge(self, amount: float, now: float) -> None:
        """Takes `amount` unconditionally (work already done); the level may go into debt."""
        self.refill(now)
        self.level -= amount


@dataclasses.dataclass
class Refusal:
    client: str
    limit: str           # "requests" or "tokens"
    retry_after_s: float

    @property
    def retry_after_ms(self) -> int:
        # the epsilon keeps float noise (0.6000000000000227 s) from adding a millisecond
        return max(1, math.ceil(self.retry_after_s * 1000 - 1e-6))

    def message(self, limits: RateLimits) -> str:
        if self.limit == "requests":
            what = f"{limits.requests_per_s:g} requests/s (burst {limits.request_burst:g})"
        else:
            what = f"{limits.tokens_per_s:g} generated tokens/s (burst {limits.token_burst:g})"
        return f"rate limit: client {self.client} exceeded {what}; retry after {self.retry_after_ms} ms"


class RateLimiter:
    """The buckets of every client, created on first use and forgotten least-recently-used first
    beyond `max_clients` (a forgotten client starts again with full buckets, which errs on the side
    of serving; the cap bounds memory when callers are told apart by address)."""

    def __init__(self, limits: RateLimits, *, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000, overrides: dict[str, RateLimits] | None = None):
        self.limits = limits
        self.overrides = dict(overrides or {})
        self._clock = clock
        self._max = max_clients
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, tuple[TokenBucket | None, TokenBucket | None]] = OrderedDict()

    def limits_for(self, client: str) -> RateLimits:
        return self.overrides.get(client, self.limits)

    def _buckets(self, client: str, now: float):
        b = self._clients.get(client)
        if b is None:
            lim = self.limits_for(client)
            b = (TokenBucket(lim.requests_per_s, lim.request_burst, now) if lim.requests_per_s else None,
                 TokenBucket(lim.tokens_per_s, lim.token_burst, now) if lim.tokens_per_s else None)
            self._clients[client] = b
            while len(self._clients) > self._max:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        return b

    def admit(self, client: str) -> Refusal | None:
        """Admits one call (taking a request token) or returns why not and for how long."""
        with self._lock:
            now = self._clock()
            req, tok = self._buckets(client, now)
            # Check the token debt first: a refused call must not also spend a request token.
            if tok is not None:
                tok.refill(now)
                if tok.level <= 0:  # in debt: admit again once the refill has paid it back
                    return Refusal(client, "tokens", -tok.level / tok.rate + 0.001)
            if req is not None:
                wait = req.take(1.0, now)
                if wait:
                    return Refusal(client, "requests", wait)
            return None

    def reserve(self, client: str, amount: int) -> Refusal | None:
        """Admits one call that will generate at most `amount` tokens: takes a request token and
        reserves `amount` generated tokens, or takes nothing and returns why not. The caller
        settles the reservation with settle() when the call ends."""
        with self._lock:
            now = self._clock()
            req, tok = self._buckets(client, now)
            need = min(float(amount), tok.burst) if tok is not None else 0.0
            # Tokens first: a refused call must not also spend a request token.
            if tok is not None:
                wait = tok.wait_for(max(need, 1e-9), now)  # a bucket in debt (old charges) admits nothing
                if wait:
                    return Refusal(client, "tokens", wait + 0.001)
            if req is not None:
                wait = req.take(1.0, now)
                if wait:
                    return Refusal(client, "requests", wait)
            if tok is not None:
                tok.level -= need
            return None

    def settle(self, client: str, reserved: int, used: int) -> None:
        """Ends a reservation: refunds what was not generated (or charges an overrun as debt)."""
        with self._lock:
            now = self._clock()
            _, tok = self._buckets(client, now)
            if tok is None:
                return
            tok.refill(now)
            tok.level = min(tok.burst, tok.level + min(float(reserved), tok.burst) - used)

    def charge_tokens(self, client: str, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            _, tok = self._buckets(client, self._clock())
            if tok is not None:
                tok.charge(n, self._clock())

    def clients(self) -> int:
        with self._lock:
            return len(self._clients)


class UsageMetrics:
    """Per-client usage counters, registered in the worker's CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_label_clients: int = 1000):
        r = registry or CollectorRegistry()
        self.registry = r
        self._max = max_label_clients
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self.requests = Counter("orcd_client_requests", "RPCs admitted, by client", ["client"], registry=r)
        self.prompt_tokens = Counter("orcd_client_prompt_tokens", "Prompt tokens of Execute calls, by client",
                                     ["client"], registry=r)
        self.generated_tokens = Counter("orcd_client_generated_tokens", "Tokens generated, by client",
                                        ["client"], registry=r)
        self.rate_limited = Counter("orcd_client_rate_limited", "Calls refused by a rate limit, by client and limit",
                                    ["client", "limit"], registry=r)

    def label(self, client: str) -> str:
        with self._lock:
            if client in self._labels:
                return client
            if len(self._labels) < self._max:
                self._labels.add(client)
                return client
        return "other"


def _execute_usage(response) -> tuple[int, int]:
    """(prompt tokens, generated tokens) that one ExecuteResponse event reports."""
    which = response.WhichOneof("event")
    if which == "token":
        return 0, 1
    if which == "started":
        return int(response.started.prompt_tokens), 0
    return 0, 0


class RateLimitInterceptor(Policy):
    """Admits each call through the client's buckets and counts its usage.

    Install it after security.AuthInterceptor so that the token's client id is known. Health and
    reflection are never limited (probes must not be starved by a busy client).
    """

    def __init__(self, limiter: RateLimiter | None, usage: UsageMetrics | None = None, *,
                 identify: Callable = security.client_identity,
                 open_prefixes: tuple[str, ...] = security.OPEN_METHOD_PREFIXES,
                 usage_of: dict[str, Callable] | None = None):
        self.limiter = limiter
        self.usage = usage
        self._identify = identify
        self._open = open_prefixes
        self._usage_of = {EXECUTE_METHOD: _execute_usage} if usage_of is None else usage_of

    def bind_registry(self, registry: CollectorRegistry) -> None:
        """Creates the usage counters in `registry` (the worker's), if not done yet."""
        if self.usage is None:
            self.usage = UsageMetrics(registry)

    def _refuse(self, context, client: str, refusal: Refusal) -> None:
        usage = self.usage
        if usage is not None:
            usage.rate_limited.labels(usage.label(client), refusal.limit).inc()
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(refusal.retry_after_ms)),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message(self.limiter.limits_for(client)))

    def _admit(self, context, client: str, reserve: int = 0) -> None:
        if self.limiter is not None:
            refusal = self.limiter.reserve(client, reserve) if reserve else self.limiter.admit(client)
            if refusal is not None:
                self._refuse(context, client, refusal)
        if self.usage is not None:
            self.usage.requests.labels(self.usage.label(client)).inc()

    def _reservation(self, method: str, request, context, client: str) -> int:
        """Generated tokens an Execute call must reserve (0: no token limit applies)."""
        if method != EXECUTE_METHOD or self.limiter is None:
            return 0
        stopping = getattr(request, "stopping", None)
        if stopping is None:  # not an ExecuteRequest: tokens are charged as streamed
            return 0
        try:
            return reservation(self.limiter, client, stopping, n=int(getattr(request, "n", 1) or 1),
                               scoring=request.HasField("prompt_logprobs"))
        except OutOfRange as err:
            context.abort(err.code, str(err))

    def begin_for(self, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._open):
            return None
        usage_of = self._usage_of.get(method)

        def begin(request, context) -> Hooks:
            client = self._identify(context)
            reserved = self._reservation(method, request, context, client)
            self._admit(context, client, reserved)
            if usage_of is None and not reserved:
                return NO_HOOKS
            hooks = _Usage(self, client, reserved, usage_of)
            # also from the call's termination: a stream the client abandons may never reach its end
            context.add_callback(hooks.end)
            return hooks

        return begin


class _Usage(Hooks):
    """One admitted call's token accounting: the responses' tokens counted as they stream, the
    reservation settled once at the end."""

    def __init__(self, icp: RateLimitInterceptor, client: str, reserved: int, usage_of: Callable | None):
        self.icp, self.client, self.reserved, self.usage_of = icp, client, reserved, usage_of
        usage = icp.usage
        # the client's counters, looked up once per call rather than per streamed token
        self.label = usage.label(client) if usage is not None else None
        self.gen_counter = usage.generated_tokens.labels(self.label) if usage is not None else None
        self.generated = 0
        self.settled = threading.Lock()

    def each(self, response) -> None:
        prompt, new = self.usage_of(response) if self.usage_of is not None else (0, 0)
        icp = self.icp
        if new:
            self.generated += new
            if icp.limiter is not None and not self.reserved:
                icp.limiter.charge_tokens(self.client, new)
            if self.gen_counter is not None:
                self.gen_counter.inc(new)
        if prompt and icp.usage is not None:
            icp.usage.prompt_tokens.labels(self.label).inc(prompt)

    def end(self) -> None:
        # from the wrapper's end and from the call's termination callback, whichever comes first
        if self.reserved and self.settled.acquire(blocking=False):
            self.icp.limiter.settle(self.client, self.reserved, self.generated)


def reservation(limiter: RateLimiter, client: str, stopping, n: int = 1, scoring: bool = False) -> int:
    """Generated tokens a call with `stopping` (its StoppingCriteria) and `n` samples must reserve
    from `client`'s bucket; 0 when no token limit applies (or it only scores its prompt). Caps an
    unbounded max_tokens to the burst (shared by the samples) in `stopping` itself, so the
    scheduler stops there; an explicit one above it could never be served (OutOfRange). Shared by
    the gRPC interceptor and the HTTP front door."""
    lim = limiter.limits_for(client)
    if not lim.tokens_per_s:
        return 0
    burst = max(1, int(lim.token_burst))
    n = max(1, int(n))  # every sample may generate max_tokens (the servicer checks n against its own cap)
    if n > burst:
        raise OutOfRange(f"{n} samples exceed the generated-token burst of client {client}'s rate limit "
                         f"({burst}), at one token each", field="n")
    wanted = int(stopping.max_tokens)
    if wanted == 0 and scoring:
        return 0  # scoring only: it generates nothing
    if wanted == 0:
        stopping.max_tokens = burst // n
        return n * (burst // n)
    if n * wanted > burst:
        per = "" if n == 1 else f" x n {n} = {n * wanted}"
        raise OutOfRange(f"{wanted}{per} exceeds the generated-token burst of client {client}'s rate limit "
                         f"({burst}); ask for at most {burst // n}", field="stopping.max_tokens")
    return n * wanted


# ---- configuration -----------------------------------------------------------------------------

_ENV = {"rate_limit_rps": "ORCD_RATE_LIMIT_RPS", "rate_limit_burst": "ORCD_RATE_LIMIT_BURST",
        "rate_limit_tokens": "ORCD_RATE_LIMIT_TOKENS", "rate_limit_token_burst": "ORCD_RATE_LIMIT_TOKEN_BURST"}


def add_arguments(parser) -> None:
    """Adds --rate-limit-rps, --rate-limit-burst, --rate-limit-tokens, --rate-limit-token-burst."""
    parser.add_argument("--rate-limit-rps", type=float, default=None, metavar="N",
                        help="per-client requests per second; 0: unlimited (env ORCD_RATE_LIMIT_RPS)")
    parser.add_argument("--rate-limit-burst", type=float, default=None, metavar="N",
                        help="per-client request burst (default: max(1, rps)) (env ORCD_RATE_LIMIT_BURST)")
    parser.add_argument("--rate-limit-tokens", type=float, default=None, metavar="N",
                        help="per-client generated tokens per second; 0: unlimited (env ORCD_RATE_LIMIT_TOKENS)")
    parser.add_argument("--rate-limit-token-burst", type=float, default=None, metavar="N",
                        help="per-client generated-token burst (default: 10 s worth) "
                             "(env ORCD_RATE_LIMIT_TOKEN_BURST)")


def limits_from_args(args, environ=None) -> RateLimits:
    env = os.environ if environ is None else environ
    vals = {}
    for name, var in _ENV.items():
        v = getattr(args, name, None)
        if v is None and env.get(var):
            try:
                v = float(env[var])
            except ValueError:
                raise ValueError(f"{var}: {env[var]!r} is not a number") from None
        vals[name] = v or 0.0
    return RateLimits(requests_per_s=vals["rate_limit_rps"], request_burst=vals["rate_limit_burst"],
                      tokens_per_s=vals["rate_limit_tokens"], token_burst=vals["rate_limit_token_burst"])


def build_interceptor(limits: RateLimits, registry: CollectorRegistry | None = None,
                      clock: Callable[[], float] = time.monotonic) -> RateLimitInterceptor:
    """The interceptor for `limits`; usage is counted even with no limits set. Without `registry`
    the counters are created when the server calls bind_registry(worker registry)."""
    limiter = RateLimiter(limits, clock=clock) if limits.enabled else None
    return RateLimitInterceptor(limiter, UsageMetrics(registry) if registry is not None else None)
