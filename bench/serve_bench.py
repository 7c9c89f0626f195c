#!/usr/bin/env python3
"""Serving benchmark: concurrent streaming clients against a running server, as users see it.

One fixed-seed workload of prompt and output lengths (ShareGPT-like: log-normal, clipped) is sent
by C closed-loop clients (each sends its next request when the last one ends) to one of:

  grpc ADDR        an orcd worker's Execute (token ids in, ignore_eos, max_tokens)
  openai URL       any OpenAI-style /v1/completions that takes a prompt of token ids and
                   `ignore_eos` (llama.cpp's llama-server, orcd's HTTP front door, vLLM)

Prompts are token ids, so every server sees the same prompt lengths whatever its tokenizer, and
outputs run to max_tokens (ignore_eos), so every server writes the same number of tokens. Per
request: time to first token (send to first streamed token), time per output token ((last -
first) / (tokens - 1)); per run: output tok/s = all output tokens / wall time of the run.
Clients are threads spread over --procs processes (the GIL of one process would cap a fast
server); all start together after a barrier.

    python3 bench/serve_bench.py grpc 127.0.0.1:50051 --clients 1,8,32,64,128,256 --vocab 151936
    python3 bench/serve_bench.py openai http://127.0.0.1:8080 --clients 1,8,64 --vocab 151936

Prints one JSON line per client count: {"clients", "requests", "output_tok_s", "ttft_ms":
{"p50","p99"}, "tpot_ms": {"p50","p99"}, "errors", ...}.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import sys
import time
import urllib.parse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def level_requests(clients: int, min_requests: int, per_client: int) -> int:
    """Requests in the level of `clients` clients (bench/llama_server_log.py groups a log by it)."""
    return max(min_requests, clients * per_client)


def workload(n: int, *, seed: int, vocab: int, prompt_mean: int, output_mean: int,
             max_prompt: int, max_output: int) -> list[tuple[list[int], int]]:
    """n (prompt ids, max_tokens) pairs. Log-normal lengths (sigma 0.8, as chat logs skew: many
    short turns, a long tail) with the given means, clipped to [8, max]."""
    rng = np.random.default_rng(seed)

    def lengths(mean, hi):
        sigma = 0.8
        mu = np.log(mean) - sigma * sigma / 2
        return np.clip(rng.lognormal(mu, sigma, n).astype(int), 8, hi)

    p, o = lengths(prompt_mean, max_prompt), lengths(output_mean, max_output)
    # ids from the middle of the vocabulary: clear of the control tokens most vocabularies start
    # or end with, so no prompt holds a BOS/EOS or a template marker
    lo, hi = min(1000, vocab // 4), max(vocab - 1000, vocab * 3 // 4)
    return [(rng.integers(lo, hi, int(a)).tolist(), int(b)) for a, b in zip(p, o)]


# ---- the server's side, from its Prometheus metrics (--metrics URL) ----------------------------

SAMPLED = ("orcd_running_sequences", "orcd_queue_depth", "orcd_kv_blocks_free", "orcd_kv_blocks_used")
COUNTED = ("orcd_engine_step_seconds_count", "orcd_engine_step_seconds_sum", "orcd_preemptions_total",
           "orcd_generated_tokens_total", "orcd_time_to_first_token_seconds_sum",
           "orcd_time_to_first_token_seconds_count", "orcd_queue_wait_seconds_sum", "orcd_queue_wait_seconds_count")


STEP_KINDS = ("prefill", "decode", "decode_ahead")  # orcd_engine_steps_total{kind}


def histogram_quantile(first: dict, last: dict, name: str, q: float) -> float | None:
    """The q-quantile of what histogram `name` counted between two scrapes, from its cumulative
    buckets (name_bucket{le="..."}) as Prometheus's histogram_quantile: linear within the bucket
    it falls in (its upper bound where that is +Inf); None where nothing was counted."""
    pre = f'{name}_bucket{{le="'
    bounds = sorted((float(k[len(pre):-2]), last[k] - first.get(k, 0.0)) for k in last if k.startswith(pre))
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank, lo, below = q * bounds[-1][1], 0.0, 0.0
    for le, n in bounds:
        if n >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (rank - below) / max(n - below, 1e-12)
        lo, below = le, n
    return lo


def scrape(url: str) -> dict[str, float]:
    """The samples of a Prometheus text page, summed over labels: {name: value}; and each
    labelled sample as it is named there too: {'name{label="v"}': value}."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=5)
    try:
        conn.request("GET", u.path or "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        full, _, value = line.rpartition(" ")
        name = full.split("{", 1)[0]
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + v
        if full != name:
            out[full] = v
    return out


class ServerSide:
    """Samples the server's gauges every `every` seconds while a level runs, and the counters at
    its ends: what the server did meanwhile (sequences running, requests queued, free KV blocks,
    engine steps and their mean duration, preemptions), to say what bounds a figure."""

    def __init__(self, url: str, every: float = 0.25):
        import threading

        self.url, self.every = url, every
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.samples.append(scrape(self.url))
            except OSError:
                pass

    def __enter__(self):
        self.t0, self.first = time.monotonic(), scrape(self.url)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.last, self.t1 = scrape(self.url), time.monotonic()

    def summary(self) -> dict:
        d = {k: self.last.get(k, 0.0) - self.first.get(k, 0.0) for k in COUNTED}
        steps = d["orcd_engine_step_seconds_count"]
        out = {"steps_per_s": round(steps / max(self.t1 - self.t0, 1e-9), 1),
               "mean_step_ms": round(1e3 * d["orcd_engine_step_seconds_sum"] / steps, 2) if steps else None,
               "busy": round(d["orcd_engine_step_seconds_sum"] / max(self.t1 - self.t0, 1e-9), 3),
               "tokens_per_step": round(d["orcd_generated_tokens_total"] / steps, 1) if steps else None,
               "preemptions": int(d["orcd_preemptions_total"])}
        # which steps they were: eager ones (prefill, decode) keep the host launching every kernel
        kinds = {k: self.last.get(f'orcd_engine_steps_total{{kind="{k}"}}', 0.0)
                 - self.first.get(f'orcd_engine_steps_total{{kind="{k}"}}', 0.0) for k in STEP_KINDS}
        if sum(kinds.values()):
            out["step_kinds"] = {k: round(v / sum(kinds.values()), 3) for k, v in kinds.items()}
            # and how long each kind took: orcd_engine_kind_seconds_total{kind} (absent in older workers)
            key = 'orcd_engine_kind_seconds_total{kind="%s"}'
            ms = {k: round(1e3 * (self.last[key % k] - self.first.get(key % k, 0.0)) / kinds[k], 2)
                  for k in STEP_KINDS if kinds[k] and key % k in self.last}
            if ms:
                out["step_ms_by_kind"] = ms
        # the worker's own clock, from the call's arrival in its handler: against the client's
        # time to first token, what the transport and the handler's dispatch add
        n = d["orcd_time_to_first_token_seconds_count"]
        if n:
            out["server_ttft_mean_ms"] = round(1e3 * d["orcd_time_to_first_token_seconds_sum"] / n, 2)
            for q in (0.5, 0.99):  # to set beside the clients' p50 / p99 (bucket-interpolated)
                v = histogram_quantile(self.first, self.last, "orcd_time_to_first_token_seconds", q)
                if v is not None:
                    out[f"server_ttft_p{int(q * 100)}_ms"] = round(1e3 * v, 1)
            out["server_queue_wait_mean_ms"] = round(
                1e3 * d["orcd_queue_wait_seconds_sum"] / max(d["orcd_queue_wait_seconds_count"], 1), 2)
        for k in SAMPLED:
            v = [s[k] for s in self.samples if k in s]
            if v:
                name = k.removeprefix("orcd_")
                out[name + "_mean"] = round(float(np.mean(v)), 1)
                if k == "orcd_kv_blocks_free":  # how close the KV cache came to running out
                    out[name + "_min"] = float(np.min(v))
                else:
                    out[name + "_max"] = float(np.max(v))
        return out


# ---- one request on each kind of server: returns (ttft_s, tokens, first_to_last_s) ------------


def _grpc_one(stub, pb, ids, max_tokens, timeout, coalesce=False):
    req = pb.ExecuteRequest(tokens=pb.TokenIds(ids=ids), coalesce_tokens=coalesce)
    req.sampling.temperature = 0.0
    req.stopping.max_tokens = max_tokens
    req.stopping.ignore_eos = True
    req.add_bos = False
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    for ev in stub.Execute(req, timeout=timeout):
        kind = ev.WhichOneof("event")
        if kind in ("token", "token_batch"):
            last = time.perf_counter()
            first = first or last
            tokens += 1 if kind == "token" else len(ev.token_batch.tokens)
        elif kind == "finished":
            tokens = max(tokens, ev.finished.usage.completion_tokens)
    return (first or time.perf_counter()) - t0, tokens, (last or 0) - (first or 0)


def _openai_one(url, ids, max_tokens, timeout, model):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    first = last = None
    chunks = usage = 0
    try:
        conn.request("POST", (u.path.rstrip("/") or "") + "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read(300)!r}")
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if obj.get("usage"):
                usage = int(obj["usage"].get("completion_tokens") or 0)
            if any(c.get("text") for c in obj.get("choices") or ()):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    finally:
        conn.close()
    return (first or time.perf_counter()) - t0, max(usage, chunks), (last or 0) - (first or 0)


def _client_proc(target, where, model, jobs, barrier, out, timeout, coalesce=False, level_s=0.0):
    """One process: a thread per client; each thread takes its share of jobs in order, and sends
    none after level_s seconds (0: no limit); what it did not send is counted, not run."""
    import threading

    if target == "grpc":
        import grpc

        from orcd_grpc.proto import pb, pb_grpc

        channel = grpc.insecure_channel(where, options=[("grpc.max_receive_message_length", 64 << 20)])
        stub = pb_grpc.WorkerStub(channel)
        one = lambda ids, m: _grpc_one(stub, pb, ids, m, timeout, coalesce)  # noqa: E731
    else:
        one = lambda ids, m: _openai_one(where, ids, m, timeout, model)  # noqa: E731
    results = []
    unsent = [0]
    lock = threading.Lock()

    def run(mine):
        for i, (ids, m) in enumerate(mine):
            if level_s and time.monotonic() > stop_at:
                with lock:
                    unsent[0] += len(mine) - i
                return
            t = time.perf_counter()
            try:
                ttft, n, span = one(ids, m)
                r = (ttft, n, span, t, time.perf_counter(), "", len(ids))
            except Exception as exc:  # a failed request is counted, not fatal to the run
                r = (0.0, 0, 0.0, t, time.perf_counter(), f"{type(exc).__name__}: {exc}"[:200], len(ids))
            with lock:
                results.append(r)

    threads = [threading.Thread(target=run, args=(j,), daemon=True) for j in jobs]
    barrier.wait()
    stop_at = time.monotonic() + level_s
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out.put((results, unsent[0]))


def run_level(target, where, model, reqs, clients, procs, timeout, coalesce=False, level_s=0.0):
    """All of reqs through `clients` closed-loop clients (none sent after level_s seconds, when
    given); returns the level's summary."""
    per_client = [reqs[i::clients] for i in range(clients)]
    procs = max(1, min(procs, clients))
    groups = [per_client[i::procs] for i in range(procs)]
    ctx = mp.get_context("spawn")  # a fresh interpreter: no grpc state inherited across fork
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_client_proc, args=(target, where, model, g, barrier, out, timeout, coalesce, level_s),
                      daemon=True) for g in groups]
    for p in ps:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    rows, unsent = [], 0
    for _ in ps:
        got, n = out.get()
        rows += got
        unsent += n
    wall = time.perf_counter() - t0
    for p in ps:
        p.join()
    ok = [r for r in rows if not r[5]]
    ttft = np.array([r[0] for r in ok]) * 1000.0
    tpot = np.array([r[2] / (r[1] - 1) for r in ok if r[1] > 1]) * 1000.0
    tokens = sum(r[1] for r in ok)

    def pct(a):
        return {"p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2)} if a.size else {}

    return {"clients": clients, "requests": len(rows), "errors": len(rows) - len(ok),
            "first_error": next((r[5] for r in rows if r[5]), ""), "output_tokens": tokens,
            "wall_s": round(wall, 3), "output_tok_s": round(tokens / wall, 1), "ttft_ms": pct(ttft),
            "tpot_ms": pct(tpot), "prompt_tokens": sum(r[6] for r in rows), "unsent": unsent}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=("grpc", "openai"))
    ap.add_argument("where", help="grpc: host:port; openai: base URL (http://host:port)")
    ap.add_argument("--clients", default="1,8,32,64,128,256", help="comma-separated client counts")
    ap.add_argument("--requests-per-client", type=int, default=4,
                    help="requests per level = max(--min-requests, clients x this)")
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=0, help="the model's vocabulary size (prompt ids below it)")
    ap.add_argument("--vocab-from", default="", help="a GGUF file to read the vocabulary size from")
    ap.add_argument("--prompt-mean", type=int, default=256)
    ap.add_argument("--output-mean", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--seed", type=int, default=20261205)
    ap.add_argument("--procs", type=int, default=min(8, os.cpu_count() or 1), help="client processes")
    ap.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    ap.add_argument("--model", default="", help="openai: the model field")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent first, not counted")
    ap.add_argument("--level-seconds", type=float, default=0.0,
                    help="no request is sent after this many seconds of a level (those in flight finish; "
                    "the row's 'unsent' counts the rest): a slow server's levels end in bounded time")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the server to serve")
    ap.add_argument("--coalesce", action="store_true",
                    help="grpc: ExecuteRequest.coalesce_tokens (tokens ready together arrive as one TokenBatch)")
    ap.add_argument("--metrics", default="", help="an orcd worker's Prometheus URL (http://host:port/metrics): "
                    "each level's row gains a 'server' object of what the worker did meanwhile (ServerSide)")
    a = ap.parse_args(argv)
    if a.vocab_from:
        from gguf import GGUFReader

        a.vocab = len(GGUFReader(a.vocab_from).fields["tokenizer.ggml.tokens"].data)
    if a.vocab <= 0:
        ap.error("--vocab or --vocab-from is required")
    kw = dict(vocab=a.vocab, prompt_mean=a.prompt_mean, output_mean=a.output_mean,
              max_prompt=a.max_prompt, max_output=a.max_output)
    # warm up, and wait for the server: a worker may still be loading its model
    deadline = time.monotonic() + a.ready_timeout
    while True:
        w = run_level(a.target, a.where, a.model, workload(max(1, a.warmup), seed=a.seed + 1, **kw), 1, 1, a.timeout)
        if not w["errors"]:
            break
        if time.monotonic() > deadline:
            print(json.dumps({"error": "server not ready", "detail": w["first_error"]}), flush=True)
            return 1
        time.sleep(2.0)
    for c in (int(x) for x in a.clients.split(",") if x):
        reqs = workload(level_requests(c, a.min_requests, a.requests_per_client), seed=a.seed, **kw)
        if a.metrics:
            with ServerSide(a.metrics) as side:
                res = run_level(a.target, a.where, a.model, reqs, c, a.procs, a.timeout, a.coalesce, a.level_seconds)
            res["server"] = side.summary()
        else:
            res = run_level(a.target, a.where, a.model, reqs, c, a.procs, a.timeout, a.coalesce, a.level_seconds)
        res.update(target=a.target, seed=a.seed, coalesce=a.coalesce)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
