"""Soak driver: a real orcd server (CPU backend, tiny random llama models) on a real port, hundreds
of concurrent Execute streams with injected faults, then leak checks.

    python3 bench/soak.py                                  # 150 s, 400 streams (README figures)
    python3 bench/soak.py --duration 20 --warmup 5 --concurrency 200 --max-sequences 32 \
        --max-queue 128 --swap-interval 2   # tests/test_soak.py's load (it also settles 1 s, not 2)

Each client thread runs one Execute after another until the time is up, each with one fault
drawn by weight:

  normal      a plain request (1..16 tokens, random sampling, sometimes a stop string)
  cancel      a long request cancelled from the side with the Cancel RPC
  abandon     a long request whose client cancels its call object (RST_STREAM)
  disconnect  a long request on its own channel, which the client closes mid-stream
  deadline    a long request with a 1..200 ms gRPC deadline
  invalid     a bad request (top_p 1.5, token id past the vocabulary, empty text, a prompt longer
              than the context, an unknown model id, a non-printable request id)

and a swapper thread replaces the served model with LoadModel every --swap-interval seconds
(alternating between two files and two model ids), with a LoadModel of a path outside the model
directory now and then. The server's queue is smaller than the number of clients, so some
requests are refused with RESOURCE_EXHAUSTED (overload).

Every stream's ending is checked against what its fault allows (a finish reason, or a status
code); anything else is a violation. Afterwards: no request left in the scheduler, every KV block
free (allocator and the orcd_kv_blocks_used gauge), threads and RSS back to their level after a
warm-up run of the same shape, and the server still answers Execute and health.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import gc
import json
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import grpc  # noqa: E402

FAULTS = ("normal", "cancel", "abandon", "disconnect", "deadline", "invalid")
WEIGHTS = {"normal": 40, "cancel": 12, "abandon": 12, "disconnect": 6, "deadline": 12, "invalid": 18}
WORDS = ("ab", "cd", "ef", "a", "b", "c", "abc", "cdef", "fed", "ba")
CLIENT_TIMEOUT_S = 60.0  # no stream may take this long; one that does is reported as a hang


def write_tiny_models(directory: str) -> list[str]:
    """Two tiny one-layer llama models (F32 and Q8_0; d=32, vocab 40, context 64) that load in
    milliseconds: the fastest models the server serves."""
    from fuzz.fuzz_gguf import _tiny_llama

    paths = []
    for name, qtype in (("tiny-f32.gguf", "F32"), ("tiny-q8.gguf", "Q8_0")):
        path = os.path.join(directory, name)
        _tiny_llama(path, qtype=qtype)
        paths.append(path)
    return paths


# ---- process measurements ---------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def os_threads() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def thread_census() -> collections.Counter:
    """Live Python threads by name, numbers stripped ("orcd-rpc_17" -> "orcd-rpc")."""
    return collections.Counter(re.sub(r"[_-]?\d+$", "", t.name) for t in threading.enumerate())


def settle_memory() -> int:
    gc.collect()
    try:  # give freed heap pages back, so RSS shows what is still held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
    return rss_bytes()


# ---- the client side -------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    fault: str
    outcome: str            # "finished:<REASON>" or "status:<CODE>"
    ok: bool
    detail: str = ""
    tokens: int = 0


class Soak:
    """Drives one server at `address` with `concurrency` client threads for `duration` seconds."""

    def __init__(self, address: str, model_paths: list[str], *, concurrency: int, duration: float, seed: int = 1,
                 swap_interval: float = 2.0, channels: int = 8, sample=None):
        self.address = address
        self.model_paths = model_paths
        self.concurrency = concurrency
        self.duration = duration
        self.seed = seed
        self.swap_interval = swap_interval
        self.sample = sample  # optional () -> int: requests the server holds (sampled for the peak)
        self.channels = [grpc.insecure_channel(address) for _ in range(channels)]
        self._lock = threading.Lock()
        self.results: list[Result] = []
        self.swaps = collections.Counter()
        self.cancel_rpc = collections.Counter()  # answers to the Cancel RPCs sent
        self._swap_epoch = 0      # odd while a LoadModel is in flight
        self._in_flight = 0
        self.peak_in_flight = 0
        self.peak_server_live = 0
        self.rss_trace: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._ids = iter(range(1, 1 << 62))

    # -- bookkeeping
    def _rid(self) -> str:
        with self._lock:
            return f"soak-{self.seed}-{next(self._ids)}"

    def _enter(self):
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            return self._swap_epoch

    def _leave(self, epoch0: int) -> bool:
        """True when a model swap overlapped the call that started at `epoch0`."""
        with self._lock:
            self._in_flight -= 1
            return self._swap_epoch != epoch0 or epoch0 % 2 == 1

    def _record(self, r: Result) -> None:
        with self._lock:
            self.results.append(r)

    # -- one request
    @staticmethod
    def _request(pb, rng, *, long: bool, rid: str = ""):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        sampling = pb.SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), seed=rng.randint(0, 1 << 30),
                                     top_k=rng.choice([0, 5, 40]), top_p=rng.choice([1.0, 0.9]))
        if long:
            stopping = pb.StoppingCriteria(max_tokens=rng.randint(24, 40), ignore_eos=True)
        else:
            stopping = pb.StoppingCriteria(max_tokens=rng.randint(1, 16),
                                           stop=["fe"] if rng.random() < 0.2 else [])
        return pb.ExecuteRequest(request_id=rid, text=text, sampling=sampling, stopping=stopping,
                                 top_logprobs=rng.choice([0, 0, 2]))

    def _invalid(self, pb, rng):
        """A bad request and the status it must get."""
        good = self._request(pb, rng, long=False)
        kind = rng.randrange(6)
        if kind == 0:
            good.sampling.top_p = 1.5
            return good, "INVALID_ARGUMENT"
        if kind == 1:
            return pb.ExecuteRequest(tokens=pb.TokenIds(ids=[1, 2, 4000])), "INVALID_ARGUMENT"
        if kind == 2:
            return pb.ExecuteRequest(text=""), "INVALID_ARGUMENT"
        if kind == 3:
            return pb.ExecuteRequest(tokens=pb.TokenIds(ids=[3] * 80)), "OUT_OF_RANGE"
        if kind == 4:
            good.model_id = "no-such-model"
            return good, "NOT_FOUND"
        good.request_id = "soak\x01bad"
        return good, "INVALID_ARGUMENT"

    def _one(self, rng, fault: str) -> Result:
        from orcd_grpc.proto import pb, pb_grpc

        channel = rng.choice(self.channels)
        own_channel = None
        if fault == "disconnect":
            own_channel = channel = grpc.insecure_channel(self.address)
        stub = pb_grpc.WorkerStub(channel)
        expect_code = None
        timeout = CLIENT_TIMEOUT_S
        if fault == "invalid":
            req, expect_code = self._invalid(pb, rng)
        else:
            req = self._request(pb, rng, long=fault != "normal",
                                rid=self._rid() if fault in ("cancel", "normal") else "")
            if fault == "deadline":
                timeout = rng.uniform(0.001, 0.2)
        epoch0 = self._enter()
        events, code, cancel_ok = [], None, None
        call = stub.Execute(req, timeout=timeout)
        try:
            act_after = rng.randint(0, 3)  # tokens to read before the fault acts
            n_tokens, acted = 0, fault not in ("cancel", "abandon", "disconnect")
            for ev in call:
                events.append(ev)
                kind = ev.WhichOneof("event")
                n_tokens += kind == "token"
                if acted or kind == "finished" or n_tokens < act_after:
                    continue
                acted = True
                if fault == "cancel":
                    try:
                        cancel_ok = stub.Cancel(pb.CancelRequest(request_id=req.request_id), timeout=30).cancelled
                    except grpc.RpcError as exc:
                        cancel_ok = False
                        # NOT_FOUND: the request finished first. RESOURCE_EXHAUSTED: the server's
                        # cap on concurrent calls refused the Cancel itself (overload); the stream
                        # then runs to its end. Anything else is wrong.
                        with self._lock:
                            self.cancel_rpc[exc.code().name] += 1
                        if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED):
                            code = f"cancel-rpc:{exc.code().name}"
                            call.cancel()
                            break
                    else:
                        with self._lock:
                            self.cancel_rpc["OK"] += 1
                elif fault == "abandon":
                    call.cancel()
                elif fault == "disconnect":
                    own_channel.close()
        except grpc.RpcError as exc:
            code = exc.code().name
        except ValueError as exc:  # iterating a call whose channel was closed
            code = f"client:{exc}"
        finally:
            overlapped = self._leave(epoch0)
            if own_channel is not None:
                own_channel.close()
        return self._judge(fault, req, events, code, expect_code, cancel_ok, overlapped)

    def _judge(self, fault, req, events, code, expect_code, cancel_ok, overlapped) -> Result:
        from orcd_grpc.proto import pb

        kinds = [e.WhichOneof("event") for e in events]
        tokens = kinds.count("token")
        # Whatever the ending, the stream so far must be well formed: Started first, then tokens,
        # and a Finished event only last.
        shape_ok = (not kinds or kinds[0] == "started") and "finished" not in kinds[:-1] \
            and "started" not in kinds[1:]
        if code is None and kinds and kinds[-1] == "finished":
            fin = events[-1].finished
            reason = pb.FinishReason.Name(fin.reason).removeprefix("FINISH_REASON_")
            outcome = f"finished:{reason}"
            consistent = fin.usage.completion_tokens == tokens and (
                reason != "LENGTH" or tokens == req.stopping.max_tokens
                or fin.usage.prompt_tokens + tokens >= 64)
            if fault == "invalid":
                ok = False
            elif reason == "CANCELLED":
                # Cancelled by the Cancel RPC, the deadline (server side), or a model swap.
                ok = fault in ("cancel", "deadline") or overlapped
                if fault == "cancel" and cancel_ok is False and not overlapped:
                    ok = False  # Cancel said NOT_FOUND, yet the stream was cancelled
            else:
                ok = reason in ("LENGTH", "STOP_TOKEN", "STOP_STRING") and not (
                    fault == "cancel" and cancel_ok)  # a successful Cancel must end the stream as cancelled
            return Result(fault, outcome, ok and shape_ok and consistent, "" if consistent else "usage mismatch",
                          tokens)
        if code is None:
            return Result(fault, "ended-without-finished", False, str(kinds[-3:]), tokens)
        outcome = f"status:{code}"
        if code == "RESOURCE_EXHAUSTED":
            # Overload: the request queue is full, or gRPC's limit on concurrent calls refused the
            # call before any handler (or validation) ran.
            ok = True
        elif fault == "invalid":
            ok = code == expect_code
        elif fault == "deadline":
            ok = code == "DEADLINE_EXCEEDED"
        elif fault in ("abandon", "disconnect"):
            ok = code in ("CANCELLED", "UNAVAILABLE") or code.startswith("client:")
        elif code == "UNAVAILABLE":  # the model changed while the request was being prepared
            ok = overlapped
        else:
            ok = False
        return Result(fault, outcome, ok and shape_ok, "", tokens)

    # -- threads
    def _client(self, idx: int) -> None:
        rng = random.Random(self.seed * 100_003 + idx)
        names, weights = zip(*WEIGHTS.items())
        while not self._stop.is_set():
            fault = rng.choices(names, weights)[0]
            try:
                r = self._one(rng, fault)
            except Exception as exc:  # a driver bug or an unexpected client exception
                r = Result(fault, f"exception:{type(exc).__name__}", False, str(exc)[:200])
            self._record(r)

    def _swapper(self) -> None:
        from orcd_grpc.proto import pb, pb_grpc

        rng = random.Random(self.seed)
        stub = pb_grpc.WorkerStub(self.channels[0])
        n = 0
        while not self._stop.wait(self.swap_interval):
            n += 1
            if n % 4 == 0:  # a path outside the model directories: refused, the model keeps serving
                try:
                    list(stub.LoadModel(pb.LoadModelRequest(path="/etc/passwd"), timeout=30))
                    self.swaps["unexpected-success"] += 1
                except grpc.RpcError as exc:
                    self.swaps[f"refused:{exc.code().name}"] += 1
                continue
            path = self.model_paths[n % len(self.model_paths)]
            with self._lock:
                self._swap_epoch += 1
            try:
                events = list(stub.LoadModel(pb.LoadModelRequest(path=path, model_id=f"tiny-{n % 2}",
                                                                 context_length=rng.choice([0, 64])),
                                             timeout=60))
                self.swaps["ok" if events and events[-1].WhichOneof("event") == "model" else "no-model-event"] += 1
            except grpc.RpcError as exc:
                self.swaps[f"failed:{exc.code().name}"] += 1
            finally:
                with self._lock:
                    self._swap_epoch += 1

    def _sampler(self) -> None:
        t0 = next_rss = time.monotonic()
        while not self._stop.wait(0.05):
            try:
                self.peak_server_live = max(self.peak_server_live, int(self.sample()))
            except Exception:
                pass
            if time.monotonic() >= next_rss:  # RSS under load, to see a trend (a leak grows, churn does not)
                self.rss_trace.append((round(time.monotonic() - t0), round(rss_bytes() / 2**20, 1)))
                next_rss += max(1.0, self.duration / 10)

    def run(self) -> dict:
        threads = [threading.Thread(target=self._client, args=(i,), name=f"soak-client-{i}", daemon=True)
                   for i in range(self.concurrency)]
        extra = [threading.Thread(target=self._swapper, name="soak-swapper", daemon=True)]
        if self.sample is not None:
            extra.append(threading.Thread(target=self._sampler, name="soak-sampler", daemon=True))
        t0 = time.monotonic()
        for t in threads + extra:
            t.start()
        time.sleep(self.duration)
        self._stop.set()
        hung = []
        for t in threads + extra:
            t.join(timeout=max(1.0, CLIENT_TIMEOUT_S + 10 - (time.monotonic() - t0 - self.duration)))
            if t.is_alive():
                hung.append(t.name)
        elapsed = time.monotonic() - t0
        for ch in self.channels:
            ch.close()
        return self.summary(elapsed, hung)

    def summary(self, elapsed: float, hung: list[str]) -> dict:
        by_fault = {f: collections.Counter() for f in FAULTS}
        bad = []
        for r in self.results:
            by_fault[r.fault][r.outcome] += 1
            if not r.ok:
                bad.append(dataclasses.asdict(r))
        n = len(self.results)
        return {
            "streams": n, "seconds": round(elapsed, 1), "streams_per_s": round(n / elapsed, 1),
            "tokens": sum(r.tokens for r in self.results),
            "tokens_per_s": round(sum(r.tokens for r in self.results) / elapsed, 1),
            "concurrency": self.concurrency, "peak_client_streams": self.peak_in_flight,
            "peak_server_requests": self.peak_server_live,
            "faults": {f: sum(c.values()) for f, c in by_fault.items()},
            "outcomes": {f: dict(sorted(c.items())) for f, c in by_fault.items()},
            "swaps": dict(self.swaps), "cancel_rpc": dict(self.cancel_rpc), "rss_under_load_mib": self.rss_trace, "violations": len(bad),
            "violation_kinds": dict(collections.Counter(f"{b['fault']} {b['outcome']} {b['detail']}" for b in bad)),
            "violation_examples": bad[:10], "hung_clients": hung,
        }


# ---- the server and the checks afterwards ---------------------------------------------------------


def start_worker(model_dir: str, model_path: str, *, max_sequences: int, max_queue: int):
    from orcd_grpc.server import ServerConfig, start_server

    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[model_dir], model_path=model_path, model_id="tiny-0",
                       backend="cpu", max_sequences=max_sequences, max_queue=max_queue, grace_seconds=2,
                       log_level="error")
    worker, port, _ = start_server(cfg)
    if not worker.wait_loaded(60):
        raise RuntimeError(f"the tiny model did not load: {worker.load_error}")
    return worker, f"127.0.0.1:{port}"


def grow_pool(worker, timeout: float = 30.0) -> int:
    """Makes the server's gRPC handler pool start all of its threads (it starts them on demand and
    keeps them), so that the baseline is taken at the pool's bound and any later growth in threads
    or memory is something else."""
    pool = worker._pool
    release = threading.Event()
    futures = [pool.submit(release.wait, timeout) for _ in range(pool._max_workers)]
    end = time.monotonic() + timeout
    while len(pool._threads) < pool._max_workers and time.monotonic() < end:
        time.sleep(0.01)
    release.set()
    for f in futures:
        f.result()
    return len(pool._threads)


def server_state(worker) -> dict:
    s = worker.scheduler
    e = s.engine
    used_gauge = worker.metrics.kv_used._value.get()
    return {"live": s.stats()["live"], "waiting": s.stats()["waiting"], "running": s.stats()["running"],
            "free_blocks": e.free_blocks() if e else None, "total_blocks": e.total_blocks() if e else None,
            "kv_blocks_used_gauge": used_gauge, "engine_alive": s.alive()}


def wait_drained(worker, timeout: float = 15.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        st = server_state(worker)
        if (st["live"] == 0 and st["free_blocks"] == st["total_blocks"] and st["kv_blocks_used_gauge"] == 0) \
                or time.monotonic() > end:
            return st
        time.sleep(0.05)


def measure(settle_s: float) -> dict:
    time.sleep(settle_s)
    rss = settle_memory()
    census = thread_census()
    return {"rss": rss, "os_threads": os_threads(), "py_threads": sum(census.values()),
            "pool_threads": census.get("orcd-rpc", 0), "census": dict(census)}


def still_serves(address: str) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from orcd_grpc.proto import pb, pb_grpc

    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        events = list(pb_grpc.WorkerStub(ch).Execute(pb.ExecuteRequest(
            text="ab cd", sampling=pb.SamplingParams(temperature=0), stopping=pb.StoppingCriteria(
                max_tokens=4, ignore_eos=True)), timeout=30))
    fin = events[-1].finished
    return {"health": health_pb2.HealthCheckResponse.ServingStatus.Name(health),
            "execute": pb.FinishReason.Name(fin.reason), "tokens": fin.usage.completion_tokens}


def run(*, duration: float, concurrency: int, warmup: float, seed: int = 1, max_sequences: int = 64,
        max_queue: int | None = None, swap_interval: float = 2.0, settle_s: float = 2.0,
        rss_tolerance: int = 64 << 20, thread_tolerance: int = 4) -> dict:
    """The whole soak: server, warm-up run, baseline, measured run, checks. Returns a report whose
    "leaks" list is empty when nothing leaked."""
    max_queue = max_queue if max_queue is not None else max(1, concurrency * 4 // 5 - max_sequences)
    with tempfile.TemporaryDirectory(prefix="orcd-soak-") as d:
        paths = write_tiny_models(d)
        worker, address = start_worker(d, paths[0], max_sequences=max_sequences, max_queue=max_queue)
        sample = lambda: worker.scheduler.stats()["live"]  # noqa: E731
        try:
            grow_pool(worker)
            if warmup > 0:
                Soak(address, paths, concurrency=concurrency, duration=warmup, seed=seed + 1000,
                     swap_interval=swap_interval).run()
            wait_drained(worker)
            before = measure(settle_s)
            report = Soak(address, paths, concurrency=concurrency, duration=duration, seed=seed,
                          swap_interval=swap_interval, sample=sample).run()
            state = wait_drained(worker)
            after = measure(settle_s)
            serves = still_serves(address)
            max_workers = worker._pool._max_workers
        finally:
            worker.stop(2)
    leaks = []
    if state["live"] or state["waiting"] or state["running"]:
        leaks.append(f"requests left in the scheduler: {state}")
    if state["free_blocks"] != state["total_blocks"] or state["kv_blocks_used_gauge"] != 0:
        leaks.append(f"KV blocks not free: {state}")
    if not state["engine_alive"]:
        leaks.append("the engine thread died")
    non_pool = lambda m: m["py_threads"] - m["pool_threads"]  # noqa: E731
    if non_pool(after) > non_pool(before) + thread_tolerance:
        leaks.append(f"threads: {before['census']} -> {after['census']}")
    if after["pool_threads"] > max_workers:
        leaks.append(f"gRPC pool threads {after['pool_threads']} > max_workers {max_workers}")
    # Threads the Python census does not see (gRPC core, BLAS): compared net of the Python ones.
    native = lambda m: m["os_threads"] - m["py_threads"]  # noqa: E731
    if native(after) > native(before) + thread_tolerance:
        leaks.append(f"native threads {native(before)} -> {native(after)}")
    if after["rss"] > before["rss"] + rss_tolerance:
        leaks.append(f"RSS {before['rss'] >> 20} MiB -> {after['rss'] >> 20} MiB "
                     f"(tolerance {rss_tolerance >> 20} MiB)")
    if serves["health"] != "SERVING" or serves["execute"] != "FINISH_REASON_LENGTH" or serves["tokens"] != 4:
        leaks.append(f"the server does not answer afterwards: {serves}")
    report.update({
        "max_sequences": max_sequences, "max_queue": max_queue, "state_after": state, "serves_after": serves,
        "rss_mib": [round(before["rss"] / 2**20, 1), round(after["rss"] / 2**20, 1)],
        "rss_tolerance_mib": rss_tolerance >> 20,
        "threads": {"before": {k: before[k] for k in ("os_threads", "py_threads", "pool_threads")},
                    "after": {k: after[k] for k in ("os_threads", "py_threads", "pool_threads")},
                    "pool_max_workers": max_workers},
        "leaks": leaks,
        "machine": f"{os.cpu_count()} CPU, {platform.machine()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    })
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=150.0, help="measured run, seconds (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=15.0, help="warm-up run before the baseline (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=400, help="client streams (default %(default)s)")
    ap.add_argument("--max-sequences", type=int, default=64)
    ap.add_argument("--max-queue", type=int, default=None, help="default: 80%% of concurrency - max_sequences")
    ap.add_argument("--swap-interval", type=float, default=5.0, help="seconds between model swaps (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = ap.parse_args(argv)
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    report = run(duration=args.duration, concurrency=args.concurrency, warmup=args.warmup, seed=args.seed,
                 max_sequences=args.max_sequences, max_queue=args.max_queue, swap_interval=args.swap_interval)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        r = report
        print(f"{r['streams']} streams in {r['seconds']} s ({r['streams_per_s']}/s, {r['tokens_per_s']} tokens/s); "
              f"{r['concurrency']} clients, peak {r['peak_client_streams']} open streams, "
              f"server held {r['peak_server_requests']} requests at most "
              f"(max_sequences {r['max_sequences']}, max_queue {r['max_queue']})")
        print("faults:", r["faults"])
        for f, c in r["outcomes"].items():
            print(f"  {f:<10} {c}")
        print("swaps:", r["swaps"], "; Cancel RPC answers:", r["cancel_rpc"])
        print(f"violations: {r['violations']} {r['violation_kinds']}; hung clients: {len(r['hung_clients'])}")
        for v in r["violation_examples"]:
            print("   ", v)
        print("RSS under load (s, MiB):", r["rss_under_load_mib"])
        print(f"RSS idle {r['rss_mib'][0]} -> {r['rss_mib'][1]} MiB (tolerance {r['rss_tolerance_mib']} MiB); "
              f"threads {r['threads']}")
        print(f"after: {r['state_after']}; {r['serves_after']}")
        print(f"leaks: {len(r['leaks'])}", *r["leaks"], sep="\n  ")
        print(f"machine: {r['machine']}; {r['date']}")
    ok = not report["leaks"] and not report["violations"] and not report["hung_clients"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
