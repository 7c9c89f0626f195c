"""TokenMetrics (the per-token counter and latency histogram) against prometheus_client's own
Counter and Histogram fed the same values: the scrape must be the same text."""
from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from orcd_grpc.metrics import _LATENCY_BUCKETS, TokenMetrics


def _lines(registry) -> list[str]:
    """The scrape's lines but _created; each _sum to 12 significant digits (numpy adds in another order)."""
    out = []
    for ln in generate_latest(registry).decode().splitlines():
        if not ln or "_created" in ln:
            continue
        if ln.startswith("orcd_inter_token_latency_seconds_sum "):
            ln = "%s %.12g" % (ln.split()[0], float(ln.split()[1]))
        out.append(ln)
    return sorted(out)


def _pair():
    ours, ref = CollectorRegistry(), CollectorRegistry()
    tm = TokenMetrics(registry=ours)
    count = Counter("orcd_generated_tokens", "Tokens generated", registry=ref)
    hist = Histogram("orcd_inter_token_latency_seconds", "Time between consecutive generated tokens of one request",
                     buckets=_LATENCY_BUCKETS, registry=ref)
    return tm, ours, count, hist, ref


def _feed(tm, count, hist, values):
    for v in values:
        tm.record(None if v is None else float(v))
        count.inc()
        if v is not None:
            hist.observe(float(v))


def test_scrape_matches_prometheus_clients_own_metrics():
    rng = np.random.default_rng()
    tm, ours, count, hist, ref = _pair()
    assert _lines(ours) == _lines(ref)  # nothing recorded yet
    # log-uniform latencies over every bucket, the bounds themselves (le is inclusive), first tokens
    vals = list(np.exp(rng.uniform(np.log(1e-4), np.log(100.0), 3000)))
    vals += list(_LATENCY_BUCKETS) + [None] * 37 + [0.0]
    rng.shuffle(vals)
    _feed(tm, count, hist, vals[:1000])
    assert _lines(ours) == _lines(ref)  # a scrape in the middle, then more
    _feed(tm, count, hist, vals[1000:])
    assert _lines(ours) == _lines(ref)
    assert ours.get_sample_value("orcd_generated_tokens_total") == len(vals)
    assert ours.get_sample_value("orcd_inter_token_latency_seconds_count") == len(vals) - 37


def test_unscraped_latencies_stay_bounded_and_counted():
    tm, ours, count, hist, ref = _pair()
    n = TokenMetrics._PENDING_MAX + 5000
    vals = np.random.default_rng().uniform(0, 0.05, n)
    _feed(tm, count, hist, vals)
    assert len(tm._pending) <= TokenMetrics._PENDING_MAX
    assert _lines(ours) == _lines(ref)


def test_scrapes_during_recording_lose_nothing():
    tm, ours, count, hist, ref = _pair()
    vals = np.random.default_rng().uniform(0, 0.2, 200_000)
    stop = threading.Event()

    def scrape():
        while not stop.is_set():
            generate_latest(ours)

    t = threading.Thread(target=scrape)
    t.start()
    try:
        _feed(tm, count, hist, vals)
    finally:
        stop.set()
        t.join()
    assert _lines(ours) == _lines(ref)
