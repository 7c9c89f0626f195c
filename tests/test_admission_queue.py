"""Priority and admission (issue #18): the queue's order, preemption's victim, the start estimate,
the deadline refusal, and where a request's priority comes from (its token, its own field)."""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import grpc
import pytest

from orcd_grpc import admission_queue as aq, request_validation as rv, security
from orcd_grpc.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.request import FinishedEvent, Stopping, TokenEvent, sample_sampling, sample_seed
from orcd_grpc.sampling import SamplingParams
from orcd_grpc.server import ServerConfig, start_server

from test_scheduler import FakeEngine, drain, make_request, make_sched  # noqa: F401 (fixture)

TOKEN_HI, TOKEN_LO = "h" * 20 + "-token", "l" * 20 + "-token"


def _req(priority=0, arrival=0.0, n=1, max_tokens=10, prompt=4, generated=()):
    r = SimpleNamespace(priority=priority, arrival=arrival, queue_tick=None, n=n, prompt_tokens=prompt,
                        stopping=Stopping(max_tokens=max_tokens), deadline=None)
    r.live_samples = lambda: [SimpleNamespace(generated=list(generated))] * n
    return r


def test_queue_orders_by_priority_then_arrival_and_keeps_a_preempted_requests_place():
    q = aq.AdmissionQueue()
    a, b, c, d = _req(0, 1.0), _req(5, 2.0), _req(0, 3.0), _req(5, 4.0)
    for r in (a, b, c, d):
        assert q.position(r) == sum(1 for x in q if (-x.priority, x.arrival) < (-r.priority, r.arrival))
        q.push(r)
    assert list(q) == [b, d, a, c]
    assert q.position(_req(5, 9.0)) == 2 and q.position(_req(9, 9.0)) == 0 and q.position(_req(-1, 0.0)) == 4
    assert q.popleft() is b
    q.push(b)  # preempted: back in its own place, ahead of d which came later
    assert q.head() is b and len(q) == 4
    q.remove(c)
    with pytest.raises(ValueError):
        q.remove(c)
    assert list(q) == [b, d, a]


def test_preemption_victim_is_the_lowest_priority_then_the_latest():
    old_low, new_low, high = _req(-1, 1.0), _req(-1, 2.0), _req(3, 3.0)
    assert aq.preemption_victim([high, old_low, new_low]) is new_low
    assert aq.preemption_victim([high]) is high


def test_start_estimate_schedules_the_work_ahead_onto_the_slots():
    est = aq.StartEstimator(token_budget=8)
    new = _req(n=1, max_tokens=5)
    assert est.start_ms(new, [_req()], [], slots=1) == 0.0  # no step seen yet: nothing estimated
    est.observe_step(0.1)
    assert est.start_ms(new, [], [], slots=2) == 0.0
    running = [_req(max_tokens=10, generated=[1] * 4)]  # 6 tokens left at 0.1 s
    assert est.start_ms(new, running, [], slots=1) == pytest.approx(600.0)
    assert est.start_ms(new, running, [], slots=2) == 0.0  # a free slot
    # a queued request ahead: its prefill (prompt 12 at budget 8: 2 steps) and 10 tokens, after the running one
    ahead = [_req(max_tokens=10, prompt=12)]
    assert est.start_ms(new, running, ahead, slots=1) == pytest.approx(600.0 + 1200.0)
    # two slots: the one ahead takes the free one, the new request waits for the running one
    assert est.start_ms(new, running, ahead, slots=2) == pytest.approx(600.0)
    # n samples need n slots at once: the later of the two frees
    assert est.start_ms(_req(n=2), running, ahead, slots=2) == pytest.approx(1200.0)
    # max_tokens 0: the smoothed length of finished samples
    est.observe_finish(256)
    assert est.start_ms(new, [_req(max_tokens=0)], [], slots=1) == pytest.approx(25600.0)


def test_deadline_refusal_has_a_retry_hint_and_spares_a_request_that_starts_at_once():
    est = aq.StartEstimator(token_budget=8)
    est.observe_step(0.1)
    r = _req(prompt=4)
    now = time.monotonic()
    r.deadline = now + 0.5
    est.check_deadline(r, 0.0, now)  # starts at once: never refused here
    est.check_deadline(r, 350.0, now)  # start 350 ms + prefill 100 ms fits 500 ms
    with pytest.raises(ResourceExhausted) as err:
        est.check_deadline(r, 900.0, now)
    assert err.value.field == "deadline" and err.value.retry_after_ms == pytest.approx(500, abs=2)
    r.deadline = None
    est.check_deadline(r, 1e9, now)


def test_scheduler_admits_by_priority_and_refuses_a_hopeless_deadline(make_sched):  # noqa: F811
    eng = FakeEngine(step_delay=0.02, max_sequences=1)
    s = make_sched(eng, max_sequences=1)
    hog = make_request(eng, "x", stopping=Stopping(max_tokens=40))
    s.submit(hog)
    assert isinstance(hog.events.get(timeout=10), TokenEvent)  # running, step times known
    reqs = []
    for text, prio in (("a", 0), ("b", 5), ("c", 0), ("d", 5)):
        r = make_request(eng, text, stopping=Stopping(max_tokens=2))
        r.priority = prio
        s.submit(r)
        reqs.append(r)
    assert [r.queue_position for r in reqs] == [0, 0, 2, 1]  # c: behind b and a; d: behind b
    assert all(r.estimated_start_ms > 0 for r in reqs)
    late = make_request(eng, "e", stopping=Stopping(max_tokens=2), deadline=time.monotonic() + 0.05)
    with pytest.raises(ResourceExhausted) as err:
        s.submit(late)
    assert err.value.retry_after_ms >= 100 and "deadline" in str(err.value)
    s.cancel(hog.request_id)
    for r in reqs:
        assert drain(r)[-1].completion_tokens == 2
    order = sorted(reqs, key=lambda r: r.admitted_at)
    assert [reqs.index(r) for r in order] == [1, 3, 0, 2]


def test_samples_seeds_derive_from_the_requests():
    assert [sample_seed(7, k) for k in range(3)] == [7, 8, 9]
    assert sample_seed(2**64 - 1, 1) == 0 and sample_seed(None, 3) is None
    p = SamplingParams(temperature=0.5, seed=40)
    assert sample_sampling(p, 0) is p and sample_sampling(p, 2).seed == 42 and p.seed == 40
    assert sample_sampling(SamplingParams(), 2).seed is None


def test_check_samples_caps_n():
    assert rv.check_samples(0, 16, 64) == 1 and rv.check_samples(16, 16, 64) == 16
    with pytest.raises(InvalidArgument, match="^n: at most 16 samples .*--max-samples"):
        rv.check_samples(17, 16, 64)
    with pytest.raises(InvalidArgument, match="^n: at most 4 samples .*sequences"):
        rv.check_samples(5, 16, 4)


# ---- priorities from tokens ------------------------------------------------------------------

def test_token_specs_carry_a_priority():
    specs = f"{TOKEN_HI}:ops:infer+admin:50,{TOKEN_LO}:batch::-10,{'z' * 20}:plain"
    assert security.parse_token_priorities(specs) == {TOKEN_HI: 50, TOKEN_LO: -10, "z" * 20: 0}
    assert security.parse_token_specs(specs)[TOKEN_LO] == ("batch", security.DEFAULT_ROLES)
    for bad, msg in ((f"{TOKEN_HI}:ops:infer:high", "not an integer"), (f"{TOKEN_HI}:ops:infer:5000", "outside"),
                     (f"{TOKEN_HI}:ops:infer:1,{TOKEN_HI}:ops:infer:2", "different priorities"),
                     (f"to:{TOKEN_HI}:alice:admin", "tokens may not contain ':'")):
        with pytest.raises(ValueError, match=msg):
            security.parse_token_specs(bad)
    p = argparse.ArgumentParser()
    security.add_arguments(p)
    cfg = security.config_from_args(p.parse_args(["--auth-token", specs]), environ={})
    assert cfg.priorities == {TOKEN_HI: 50, TOKEN_LO: -10}
    assert security.TokenChecker(cfg.tokens, cfg.roles, cfg.priorities).identify(TOKEN_LO)[2] == -10


def test_request_priority_is_the_tokens_unless_it_asks_for_less():
    assert aq.request_priority(None) == 0 and aq.request_priority(700) == 700  # no tokens configured
    tok = security.CALL_PRIORITY.set(5)
    try:
        assert aq.request_priority(None) == 5 and aq.request_priority(-3) == -3 and aq.request_priority(5) == 5
        with pytest.raises(PermissionDenied, match="^priority: 6 exceeds the priority 5"):
            aq.request_priority(6)
    finally:
        security.CALL_PRIORITY.reset(tok)


def test_a_token_caps_the_priority_through_a_real_server(tmp_path):
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(tmp_path)], backend="cpu", grace_seconds=0)
    sec = security.SecurityConfig(tokens={TOKEN_HI: "ops", TOKEN_LO: "batch"},
                                  priorities={TOKEN_HI: 10, TOKEN_LO: -5})
    security.apply_to_server_config(cfg, sec)
    worker, port, _ = start_server(cfg)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)

            def code(token, **kw):
                try:
                    list(stub.Execute(pb.ExecuteRequest(text="hi", **kw), timeout=10,
                                      metadata=[("authorization", f"Bearer {token}")]))
                except grpc.RpcError as e:
                    return e.code(), e.details()
                return grpc.StatusCode.OK, ""

            c, msg = code(TOKEN_LO, priority=0)
            assert c == grpc.StatusCode.PERMISSION_DENIED and msg.startswith("priority: 0 exceeds the priority -5")
            # within the token's: the request goes on to the next check (no model is loaded)
            assert code(TOKEN_LO, priority=-6)[0] == grpc.StatusCode.FAILED_PRECONDITION
            assert code(TOKEN_HI, priority=10)[0] == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        worker.stop(0)


def test_events_name_their_sample():
    assert TokenEvent(1, "a", 0, -0.1, [], 3).sample == 3
    assert FinishedEvent("length", "", 1, 1, 0, 0, 0, 0, 0).sample == 0


def test_probe_wait_is_the_start_estimate_of_a_request_behind_the_queue_plus_its_prefill():
    est = aq.StartEstimator(token_budget=8)
    assert est.wait_ms(100, [_req()], [], slots=1) == 0.0  # nothing measured yet
    est.observe_step(0.02)
    running = [_req(max_tokens=10, generated=[1] * 4)]
    waiting = [_req(max_tokens=6, prompt=9)]
    same = _req(max_tokens=0, prompt=20)  # what Execute would build for this prompt
    want = est.start_ms(same, running, waiting, slots=1) + est.prefill_ms(same)
    assert est.wait_ms(20, running, waiting, slots=1) == pytest.approx(want)
    # running (6 left) then the queued one (2 prefill steps + 6 tokens), then 3 prefill steps
    assert want == pytest.approx(20.0 * (6 + 2 + 6 + 3))
    # a free slot and nothing queued: the prefill alone
    assert est.wait_ms(20, running, [], slots=2) == pytest.approx(60.0)
