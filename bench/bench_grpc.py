#!/usr/bin/env python3
"""Single-stream decode through the gRPC server, next to the engine alone on the same file.

Starts a real worker on a free loopback port (in this process, its own threads), streams one
greedy completion of --gen tokens from a --prompt-token prompt through a real client channel in
a separate client process,
and times decode as the span between the first and the last token event received by the client
(so it includes scheduling, detokenization, the streaming RPC and protobuf on both sides). The
engine alone is timed on the same prompt for comparison. Prints one JSON object.

    python3 bench/bench_grpc.py MODEL.gguf [--backend cuda] [--gen 128] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orcd_grpc.proto import pb  # noqa: E402
from orcd_grpc.server import ServerConfig, start_server  # noqa: E402


def engine_decode(engine, prompt, gen):
    from orcd_grpc.overlap import Overlap
    from orcd_grpc.sampling import SamplingParams

    s = engine.new_sequence(prompt, SamplingParams(temperature=0.0))
    loop = Overlap(engine)
    follow = lambda q: len(q.output_ids) + 2 <= gen  # noqa: E731  (max_tokens, as the gRPC request has)
    try:
        while not s.output_ids:
            loop.step([s], may_follow=follow)
        t0 = time.perf_counter()
        while len(s.output_ids) < gen:
            loop.step([s], may_follow=follow)
        return (gen - 1) / (time.perf_counter() - t0)
    finally:
        engine.release(s)
        loop.drain()


def grpc_decode_in_child(port, model_id, prompt, gen, reps):
    """The client in its own process, as a real caller is: its protobuf parsing and gRPC work
    must not share the server's GIL."""
    import subprocess

    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}); "
            "import grpc, bench_grpc as b; from orcd_grpc.proto import pb_grpc; "
            f"stub = pb_grpc.WorkerStub(grpc.insecure_channel('127.0.0.1:{port}')); "
            f"b.grpc_decode(stub, {model_id!r}, {prompt!r}, 8); "
            f"print(json.dumps([b.grpc_decode(stub, {model_id!r}, {prompt!r}, {gen}) for _ in range({reps})]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"client process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def grpc_decode(stub, model_id, prompt, gen):
    req = pb.ExecuteRequest(model_id=model_id, tokens=pb.TokenIds(ids=prompt),
                            sampling=pb.SamplingParams(temperature=0.0),
                            stopping=pb.StoppingCriteria(max_tokens=gen, ignore_eos=True))
    times = []
    for ev in stub.Execute(req, timeout=600):
        if ev.HasField("token"):
            times.append(time.perf_counter())
    if len(times) != gen:
        raise RuntimeError(f"expected {gen} tokens, got {len(times)}")
    return (gen - 1) / (times[-1] - times[0])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    path = os.path.abspath(args.model)
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[os.path.dirname(path)], model_path=path,
                       model_id="bench", backend=args.backend, context_length=args.context_length,
                       max_sequences=8, log_level="warning")
    worker, port, sched = start_server(cfg)
    res = None
    try:
        deadline = time.time() + 900
        while sched.engine is None:
            if time.time() > deadline or not worker._load_thread.is_alive() and sched.engine is None:
                raise RuntimeError("the model did not load")
            time.sleep(0.1)
        engine = sched.engine
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, min(engine.info.vocab_size, 30000), args.prompt).tolist()
        via_grpc = grpc_decode_in_child(port, "bench", prompt, args.gen, args.reps)
        # The engine alone, on the scheduler's own engine while the server is idle.
        alone = [engine_decode(engine, prompt, args.gen) for _ in range(args.reps)]
        g, e = statistics.median(via_grpc), statistics.median(alone)
        res = {"model": os.path.basename(path), "backend": engine.info.backend, "decode_tok_s_grpc": round(g, 1),
               "decode_tok_s_engine": round(e, 1), "grpc_vs_engine": round(g / e, 3)}
        print(json.dumps(res), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        worker.stop(5)
    return 0 if res else 1


if __name__ == "__main__":
    sys.exit(main())
