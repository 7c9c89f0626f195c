"""bench/serve_bench.py against a real worker (a 1-layer llama, gRPC and the HTTP front door):
every request of the workload is served to its max_tokens and counted."""
from __future__ import annotations

import json
import os
import sys

import pytest

from fuzz import fuzz_gguf
from orcd_grpc.server import ServerConfig, start_server

# importable by name: its client processes are spawned and import it again
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import serve_bench  # noqa: E402

KW = dict(vocab=40, prompt_mean=12, output_mean=6, max_prompt=24, max_output=10)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("sb") / "tiny.gguf"
    fuzz_gguf._tiny_llama(str(path))
    cfg = ServerConfig(host="127.0.0.1", port=0, http_port=0, model_dirs=[str(path.parent)], model_path=str(path),
                       backend="cpu", max_context=64, max_sequences=4, max_queue=64, grace_seconds=1)
    w, port, _ = start_server(cfg)
    assert w.wait_loaded(120), w.load_error
    yield w, port
    w.stop(1)


def test_workload_is_fixed_by_its_seed_and_bounded():
    a = serve_bench.workload(50, seed=3, **KW)
    assert a == serve_bench.workload(50, seed=3, **KW)
    assert a != serve_bench.workload(50, seed=4, **KW)
    assert all(8 <= len(ids) <= 24 and 8 <= m <= 10 and all(0 <= t < 40 for t in ids) for ids, m in a)


@pytest.mark.parametrize("target", ["grpc", "openai"])
def test_every_request_runs_to_max_tokens(worker, target, capsys):
    w, port = worker
    where = f"127.0.0.1:{port}" if target == "grpc" else f"http://127.0.0.1:{w.http_port}"
    args = [target, where, "--clients", "1,3", "--min-requests", "6", "--requests-per-client", "2",
            "--procs", "2", "--warmup", "1", "--seed", "11"] + [f"--{k.replace('_', '-')}={v}" for k, v in KW.items()]
    assert serve_bench.main(args) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["clients"] for r in rows] == [1, 3]
    want = sum(m for _, m in serve_bench.workload(6, seed=11, **KW))
    for r in rows:
        assert r["errors"] == 0, r["first_error"]
        assert r["requests"] == 6 and r["output_tokens"] == want  # ignore_eos: each to its max_tokens
        assert r["output_tok_s"] > 0 and 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
        assert r["tpot_ms"]["p50"] > 0


def test_a_server_that_is_not_there_fails_the_run(capsys):
    assert serve_bench.main(["grpc", "127.0.0.1:1", "--clients", "1", "--ready-timeout", "0", "--timeout", "2",
                             "--vocab", "40"]) == 1
    assert "not ready" in capsys.readouterr().out


def test_level_seconds_stops_sending_and_counts_the_rest(worker, capsys):
    """--level-seconds: no request is sent once a level's time is up; the row says how many were
    not sent, and counts the prompt and output tokens of the sent ones only."""
    w, port = worker
    base = ["grpc", f"127.0.0.1:{port}", "--clients", "1", "--min-requests", "6", "--procs", "1", "--warmup", "1",
            "--seed", "11"] + [f"--{k.replace('_', '-')}={v}" for k, v in KW.items()]
    assert serve_bench.main(base + ["--level-seconds", "1e-9"]) == 0
    assert serve_bench.main(base) == 0
    cut, full = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (cut["requests"], cut["unsent"], cut["output_tokens"], cut["prompt_tokens"]) == (0, 6, 0, 0)
    reqs = serve_bench.workload(6, seed=11, **KW)
    assert (full["requests"], full["unsent"], full["errors"]) == (6, 0, 0)
    assert full["prompt_tokens"] == sum(len(i) for i, _ in reqs) and full["output_tokens"] == sum(m for _, m in reqs)


def test_server_ttft_quantiles_come_from_the_level_s_bucket_counts():
    """server_ttft_p50/p99_ms: Prometheus's histogram_quantile over what the level added to each
    cumulative bucket (not what the worker counted before it): linear inside the bucket."""
    b = 'orcd_time_to_first_token_seconds_bucket{le="%s"}'
    first = {b % "0.1": 50.0, b % "0.25": 50.0, b % "0.5": 50.0, b % "+Inf": 50.0,
             "orcd_time_to_first_token_seconds_count": 50.0, "orcd_time_to_first_token_seconds_sum": 1.0}
    # this level: 20 under 0.1 s, 60 in (0.1, 0.25], 20 in (0.25, 0.5]
    last = {b % "0.1": 70.0, b % "0.25": 130.0, b % "0.5": 150.0, b % "+Inf": 150.0,
            "orcd_time_to_first_token_seconds_count": 150.0, "orcd_time_to_first_token_seconds_sum": 21.0}
    q = serve_bench.histogram_quantile
    assert q(first, last, "orcd_time_to_first_token_seconds", 0.5) == pytest.approx(0.1 + 0.15 * 30 / 60)
    assert q(first, last, "orcd_time_to_first_token_seconds", 0.99) == pytest.approx(0.25 + 0.25 * 19 / 20)
    assert q(first, first, "orcd_time_to_first_token_seconds", 0.5) is None  # nothing counted
    side = serve_bench.ServerSide("http://127.0.0.1:1/metrics")
    side.first, side.last, side.t0, side.t1, side.samples = first, last, 0.0, 1.0, []
    out = side.summary()
    assert out["server_ttft_mean_ms"] == 200.0 and out["server_ttft_p50_ms"] == 175.0
    assert out["server_ttft_p99_ms"] == pytest.approx(487.5)


def test_server_side_reports_the_share_of_each_step_kind():
    """The row's step_kinds: each kind's share of the engine steps counted during the level, from
    the labelled orcd_engine_steps_total samples (absent when the worker has no such counter); and
    step_ms_by_kind, each kind's mean step from orcd_engine_kind_seconds_total{kind}."""
    side = serve_bench.ServerSide("http://127.0.0.1:1/metrics")
    key = 'orcd_engine_steps_total{kind="%s"}'
    side.first = {key % "prefill": 5.0, key % "decode": 1.0, "orcd_engine_step_seconds_count": 6.0}
    side.last = {key % "prefill": 35.0, key % "decode": 11.0, key % "decode_ahead": 60.0,
                 "orcd_engine_step_seconds_count": 106.0, "orcd_engine_step_seconds_sum": 0.5}
    side.t0, side.t1, side.samples = 0.0, 1.0, []
    out = side.summary()
    assert out["step_kinds"] == {"prefill": 0.3, "decode": 0.1, "decode_ahead": 0.6}
    assert "step_ms_by_kind" not in out  # a worker without orcd_engine_kind_seconds
    secs = 'orcd_engine_kind_seconds_total{kind="%s"}'
    side.first.update({secs % "prefill": 1.0, secs % "decode": 0.25})
    side.last.update({secs % "prefill": 1.3, secs % "decode": 0.3, secs % "decode_ahead": 0.12})
    assert side.summary()["step_ms_by_kind"] == {"prefill": 10.0, "decode": 5.0, "decode_ahead": 2.0}
    side.first = {"orcd_engine_step_seconds_count": 1.0}
    side.last = {"orcd_engine_step_seconds_count": 2.0}
    assert "step_kinds" not in side.summary()
