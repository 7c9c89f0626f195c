#!/usr/bin/env python3
"""How many streamed messages per second grpcio carries, sync server against asyncio (grpc.aio),
with nothing else in the way: a Worker service whose Execute yields --msgs Token events per stream,
one every --every-ms (a decode step's pace), to --streams concurrent streams read by client threads
over --procs processes. What bench/host_ceiling.py's gap at many clients would be without orcd's
scheduler, servicer and detokenizer: the transport's own ceiling, for choosing between the two.

    python3 bench/stream_rate.py [--streams 64] [--msgs 1500] [--every-ms 4] [--procs 2]
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _token(pb, i):
    return pb.ExecuteResponse(token=pb.Token(text="x", token_id=i, index=i, logprob=-0.5))


def serve(mode: str, port: int, msgs: int, every: float) -> None:
    import grpc

    from orcd_grpc.proto import pb, pb_grpc

    if mode == "sync":
        class Sync(pb_grpc.WorkerServicer):
            def Execute(self, request, context):
                for i in range(msgs):
                    time.sleep(every)
                    yield _token(pb, i)

        s = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=512))
        pb_grpc.add_WorkerServicer_to_server(Sync(), s)
        s.add_insecure_port(f"127.0.0.1:{port}")
        s.start()
        s.wait_for_termination()
        return

    class Aio(pb_grpc.WorkerServicer):
        async def Execute(self, request, context):
            for i in range(msgs):
                await asyncio.sleep(every)
                yield _token(pb, i)

    async def main():
        s = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(Aio(), s)
        s.add_insecure_port(f"127.0.0.1:{port}")
        await s.start()
        await s.wait_for_termination()

    asyncio.run(main())


def _client(port: int, streams: int, barrier, out) -> None:
    import grpc

    from orcd_grpc.proto import pb, pb_grpc

    stub = pb_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    counts = []

    def run():
        counts.append(sum(1 for _ in stub.Execute(pb.ExecuteRequest(text="x"))))

    threads = [threading.Thread(target=run) for _ in range(streams)]
    barrier.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(sum(counts))


def measure(port: int, streams: int, procs: int) -> float:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_client, args=(port, streams // procs, barrier, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    barrier.wait()  # the clients' interpreters are up: time the streams alone
    t = time.perf_counter()
    total = sum(out.get() for _ in ps)
    wall = time.perf_counter() - t
    for p in ps:
        p.join()
    return total / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--msgs", type=int, default=1500)
    ap.add_argument("--every-ms", type=float, default=4.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--port", type=int, default=50461)
    ap.add_argument("--serve", choices=("sync", "aio"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve, a.port, a.msgs, a.every_ms / 1e3)
        return 0
    ideal = a.streams * 1e3 / a.every_ms
    print(f"| server | streams | every ms | msgs/s | of the pace's {ideal:.0f} |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("sync", "aio"):
        child = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port", str(a.port), "--msgs",
                                  str(a.msgs), "--every-ms", str(a.every_ms)])
        try:
            time.sleep(3)  # the server's interpreter and port
            rate = measure(a.port, a.streams, a.procs)
        finally:
            child.kill()
            child.wait()
        print(f"| {mode} | {a.streams} | {a.every_ms:g} | {rate:.0f} | {rate / ideal:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
