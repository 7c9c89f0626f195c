"""Metrics scraped over HTTP from a real server after a real request; then a graceful shutdown."""
from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server

pytestmark = pytest.mark.slow


def scrape(port) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def srv(smollm2_path):
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(smollm2_path.parent)],
                       model_path=str(smollm2_path), backend="cpu", max_context=128, max_sequences=4,
                       metrics_port=0, grace_seconds=1)  # metrics on --host's address by default
    worker, port, _ = start_server(cfg)
    assert worker.wait_loaded(300), worker.load_error
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield worker, channel
    channel.close()
    worker.stop(0)


def healthz(port) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()


def test_metrics_endpoint_follows_the_grpc_host_and_serves_healthz(srv):
    worker, _ = srv
    assert worker.metrics._http.server_address[0] == "127.0.0.1"  # a loopback worker keeps metrics local
    assert healthz(worker.metrics_port) == (200, "SERVING")


def test_metrics_after_a_request(srv):
    worker, channel = srv
    before = scrape(worker.metrics_port)
    assert before[("orcd_model_ram_bytes", ())] > 0
    assert before[("orcd_model_vram_bytes", ())] == 0
    assert before[("orcd_model_load_seconds", ())] > 0
    assert before[("orcd_kv_blocks_free", ())] > 0

    stub = pb_grpc.WorkerStub(channel)
    events = list(stub.Execute(pb.ExecuteRequest(text="The capital of France is",
                                                 sampling=pb.SamplingParams(temperature=0),
                                                 stopping=pb.StoppingCriteria(max_tokens=4)), timeout=60))
    prompt_tokens = events[0].started.prompt_tokens
    m = scrape(worker.metrics_port)
    assert m[("orcd_requests_total", (("code", "OK"), ("method", "Execute")))] == 1
    assert m[("orcd_finished_requests_total", (("reason", "length"),))] == 1
    assert m[("orcd_prompt_tokens_total", ())] == prompt_tokens
    assert m[("orcd_generated_tokens_total", ())] == 4
    assert m[("orcd_time_to_first_token_seconds_count", ())] == 1
    assert m[("orcd_time_to_first_token_seconds_sum", ())] > 0
    assert m[("orcd_inter_token_latency_seconds_count", ())] == 3
    # the prompt's step gave the first token; the CPU backend queues nothing ahead
    assert m[("orcd_engine_steps_total", (("kind", "prefill"),))] == 1
    assert m[("orcd_engine_steps_total", (("kind", "decode"),))] == 3
    assert ("orcd_engine_steps_total", (("kind", "decode_ahead"),)) not in m
    assert m[("orcd_engine_step_seconds_count", ())] == 4
    by_kind = m[("orcd_engine_kind_seconds_total", (("kind", "prefill"),))] + \
        m[("orcd_engine_kind_seconds_total", (("kind", "decode"),))]
    assert by_kind == pytest.approx(m[("orcd_engine_step_seconds_sum", ())], rel=1e-9)  # every step, by kind
    assert m[("orcd_queue_depth", ())] == 0
    assert m[("orcd_running_sequences", ())] == 0
    assert m[("orcd_kv_blocks_used", ())] + m[("orcd_kv_blocks_free", ())] == worker.scheduler.engine.total_blocks()
    assert ("orcd_prefix_cache_hit_tokens_total", ()) in m
    assert m[("orcd_model_loaded", (("model_id", "smollm2-135m-instruct"),))] == 1

    with pytest.raises(grpc.RpcError):
        list(stub.Execute(pb.ExecuteRequest(text=""), timeout=10))
    m = scrape(worker.metrics_port)
    assert m[("orcd_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Execute")))] == 1


def test_prefix_cache_hits_move_under_a_repeated_prompt(srv):
    """The second of two requests with the same long prompt reuses its KV blocks: the counter
    grows by exactly the cached_prompt_tokens the Finished event reports, and the token and
    latency series move with it."""
    worker, channel = srv
    stub = pb_grpc.WorkerStub(channel)
    prompt = ("The quick brown fox jumps over the lazy dog while the five boxing wizards jump "
              "quickly and a wizard's job is to vex chumps quickly in fog. ") * 2
    req = pb.ExecuteRequest(text=prompt, sampling=pb.SamplingParams(temperature=0),
                            stopping=pb.StoppingCriteria(max_tokens=3, ignore_eos=True))
    list(stub.Execute(req, timeout=60))
    before = scrape(worker.metrics_port)
    events = list(stub.Execute(req, timeout=60))
    cached = events[-1].finished.usage.cached_prompt_tokens
    assert cached > 0, "a repeated prompt of several KV blocks hits the prefix cache"
    m = scrape(worker.metrics_port)
    key = ("orcd_prefix_cache_hit_tokens_total", ())
    assert m[key] - before[key] == cached
    assert m[("orcd_prompt_tokens_total", ())] - before[("orcd_prompt_tokens_total", ())] \
        == events[0].started.prompt_tokens
    assert m[("orcd_generated_tokens_total", ())] - before[("orcd_generated_tokens_total", ())] == 3
    assert m[("orcd_time_to_first_token_seconds_count", ())] - before[("orcd_time_to_first_token_seconds_count", ())] == 1
    assert m[("orcd_inter_token_latency_seconds_count", ())] - before[("orcd_inter_token_latency_seconds_count", ())] == 2
    ok = ("orcd_requests_total", (("code", "OK"), ("method", "Execute")))
    assert m[ok] - before[ok] == 1


def test_graceful_shutdown_cancels_after_grace(srv):
    worker, channel = srv
    stub = pb_grpc.WorkerStub(channel)
    call = stub.Execute(pb.ExecuteRequest(text="Once upon a time", sampling=pb.SamplingParams(temperature=0),
                                          stopping=pb.StoppingCriteria(max_tokens=100, ignore_eos=True)),
                        timeout=120)
    next(call)
    next(call)
    stopper = threading.Thread(target=worker.stop, args=(1.0,))
    t0 = time.monotonic()
    stopper.start()
    time.sleep(0.2)
    # During the grace period the worker says it is going away, and takes no new work.
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert healthz(worker.metrics_port) == (503, "NOT_SERVING")
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Execute(pb.ExecuteRequest(text="late"), timeout=10))
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(call)
    assert rest[-1].finished.reason == pb.FINISH_REASON_CANCELLED
    stopper.join(30)
    assert time.monotonic() - t0 < 15
    assert worker.scheduler.engine is None


def test_readme_metrics_table_lists_every_metric():
    """The README's Metrics table names exactly the orcd_* metrics the worker defines (its own and
    the per-client usage counters), with their type and labels."""
    import pathlib
    import re

    from prometheus_client import CollectorRegistry

    from orcd_grpc.metrics import Metrics, TokenMetrics
    from orcd_grpc.ratelimit import UsageMetrics

    registry = CollectorRegistry()
    owners = (Metrics(registry), UsageMetrics(registry))
    defined = {}
    for collector in (v for o in owners for v in vars(o).values() if hasattr(v, "_labelnames")):
        fam = collector.describe()[0]
        name = fam.name + ("_total" if fam.type == "counter" else "")
        defined[name] = (fam.type, tuple(collector._labelnames))
    for fam in (f for o in owners for v in vars(o).values() if isinstance(v, TokenMetrics) for f in v.describe()):
        defined[fam.name + ("_total" if fam.type == "counter" else "")] = (fam.type, ())
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.search(r"^## Metrics\n(.*?)(?=^## )", readme, re.S | re.M).group(1)
    documented = {}
    for name, labels, kind in re.findall(r"^\| `(orcd_\w+)(?:\{([\w,]+)\})?` \| (\w+) \|", section, re.M):
        documented[name] = (kind, tuple(labels.split(",")) if labels else ())
    assert len(defined) >= 20
    assert documented == defined
