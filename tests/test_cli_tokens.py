"""`orcd tokenize`, `orcd score` and `orcd generate --n`: the real CLI in a subprocess against a
real worker (CPU backend, SmolLM2-135M) on a real socket, checked against the Python client's
answers from the same worker and against the contract's promises (offsets cover the text, one
log-prob per prompt position after the first, sample k = a one-sample request with seed + k)."""
from __future__ import annotations

import json
import math

import pytest

from test_cli_client import TOKEN, assert_clean_error, orcd, start_worker, tiny_model  # noqa: F401

TEXT = "The capital of France is Paris. Ünïcödé ok"


@pytest.fixture(scope="module")
def smol(smollm2_path):
    worker, port = start_worker(smollm2_path)
    yield f"127.0.0.1:{port}"
    worker.stop(0)


@pytest.fixture(scope="module")
def client(smol):
    from orcd_grpc.client import OrcdClient

    with OrcdClient(smol, timeout=60) as c:
        yield c


def test_tokenize_prints_the_workers_ids_and_offsets(smol, client):
    proc = orcd("tokenize", TEXT, "--address", smol)
    assert proc.returncode == 0, proc.stderr
    want = list(client.tokenize(TEXT).ids)
    assert [int(x) for x in proc.stdout.split()] == want
    assert f"[{len(want)} tokens]" in proc.stderr

    proc = orcd("tokenize", TEXT, "--offsets", "--address", smol)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(None, 3) for line in proc.stdout.splitlines()[1:]]
    assert [int(r[1]) for r in rows] == want
    spans = [tuple(map(int, r[2].split("-"))) for r in rows]
    # The spans cover the text's UTF-8 bytes in order, without gaps (neighbours may overlap on a
    # character split between tokens; BOS, if any, is the empty span at 0).
    data = TEXT.encode()
    spans = [(s, e) for s, e in spans if e > s]
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(b[0] <= a[1] and b[0] >= a[0] and b[1] >= a[1] for a, b in zip(spans, spans[1:])), spans
    assert "'Paris'" in proc.stdout or "' Paris'" in proc.stdout

    # A chat prompt: a plain message and the same as JSON give the template's ids.
    plain = orcd("tokenize", "--chat", "hello", "--system", "be brief", "--address", smol)
    js = orcd("tokenize", "--chat", json.dumps([{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hello"}]), "--address", smol)
    assert plain.returncode == js.returncode == 0, plain.stderr + js.stderr
    want = client.tokenize([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]).ids
    assert [int(x) for x in plain.stdout.split()] == [int(x) for x in js.stdout.split()] == list(want)


def test_tokenize_bad_input_is_a_clean_error(smol):
    assert_clean_error(orcd("tokenize", "--chat", "[{oops", "--address", smol), 1, "INVALID_ARGUMENT", "chat")
    assert_clean_error(orcd("tokenize", "x", "--system", "s", "--address", smol), 1, "INVALID_ARGUMENT", "--chat")
    # Offsets of a chat prompt: the worker's own refusal, naming the field.
    assert_clean_error(orcd("tokenize", "--chat", "hi", "--offsets", "--address", smol), 1,
                       "INVALID_ARGUMENT", "return_offsets")
    assert_clean_error(orcd("score", "x", "--top-n", "999", "--address", smol), 1, "INVALID_ARGUMENT", "top")


def test_score_prints_per_token_logprobs_and_their_total(smol, client):
    proc = orcd("score", TEXT, "--json", "--top-n", "3", "--address", smol)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    n_prompt = len(client.tokenize(TEXT).ids)
    assert got["prompt_tokens"] == n_prompt
    assert len(got["tokens"]) == n_prompt - 1  # every position but the first
    ref = client.score(TEXT, top_n=3).prompt_logprobs
    for t, e in zip(got["tokens"], ref):
        assert t["token_id"] == e.token_id
        assert math.isfinite(t["logprob"]) and t["logprob"] <= 0
        assert t["logprob"] == pytest.approx(e.logprob, abs=1e-4)
        assert len(t["top"]) == 3 and t["top"][0]["logprob"] >= t["logprob"] - 1e-4
    assert got["total_logprob"] == pytest.approx(sum(e.logprob for e in ref), abs=1e-3)

    table = orcd("score", TEXT, "--address", smol)
    assert table.returncode == 0, table.stderr
    last = table.stdout.splitlines()[-1]
    assert last.startswith(f"total log-likelihood {got['total_logprob']:.4f} over {n_prompt - 1} tokens"), last
    # Nothing was generated: the scoring call is prompt_logprobs with max_tokens 0.
    assert client.score(TEXT).usage.completion_tokens == 0


def test_generate_n_prints_each_sample_labelled(smol, client):
    args = ("generate", "Once upon a time", "--n", "3", "--seed", "7", "--max-tokens", "6", "--ignore-eos",
            "--address", smol)
    proc = orcd(*args)
    assert proc.returncode == 0, proc.stderr
    for k in range(3):
        assert f"[sample {k}: length; 6 generated tokens]" in proc.stderr
    # Sample k runs with seed + k: each block is the one-sample completion with that seed.
    blocks = {}
    current = None
    for line in proc.stdout.splitlines():
        if line.startswith("--- sample "):
            current = int(line.split()[2])
            blocks[current] = []
        else:
            blocks[current].append(line)
    assert sorted(blocks) == [0, 1, 2]
    for k in range(3):
        want = client.generate_text("Once upon a time", seed=7 + k, max_tokens=6, ignore_eos=True).text
        assert "\n".join(blocks[k]) == want.rstrip("\n")
    bad = orcd("generate", "x", "--n", "0", "--address", smol)  # argparse's refusal
    assert bad.returncode == 2 and "--n: must be > 0" in bad.stderr and "Traceback" not in bad.stderr
    assert_clean_error(orcd("generate", "x", "--n", "1000", "--address", smol), 1, "INVALID_ARGUMENT", "n")


def test_token_commands_send_the_bearer_token(tiny_model):  # noqa: F811
    worker, port = start_worker(tiny_model, tokens=f"{TOKEN}:ops")
    try:
        address = f"127.0.0.1:{port}"
        for cmd in (("tokenize", "ab cd"), ("score", "ab cd"), ("generate", "ab", "--n", "2", "--max-tokens", "2")):
            assert_clean_error(orcd(*cmd, "--address", address, "--timeout", "30"), 1, "UNAUTHENTICATED")
            proc = orcd(*cmd, "--address", address, "--timeout", "30", env={"ORCD_AUTH_TOKEN": TOKEN})
            assert proc.returncode == 0, proc.stderr
    finally:
        worker.stop(0)
