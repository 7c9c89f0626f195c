#!/usr/bin/env python3
"""The event loop's cost of delivering engine events to waiting streams (loop_events.LoopEvents):
--streams queues each awaited by a stream's get(), every "step" putting one event on each and
waking them through one mailbox drain, as the engine thread's step does. Prints µs per delivered
event (the loop's whole turn: wake, get, the stream's resumption), best of --repeats.

    python3 bench/loop_events_cost.py [--streams 64] [--steps 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orcd_grpc.loop_events import LoopEvents  # noqa: E402


async def run(streams: int, steps: int) -> float:
    qs = [LoopEvents() for _ in range(streams)]
    delivered = 0

    async def stream(q):
        nonlocal delivered
        for _ in range(steps):
            await q.get(1.0)
            delivered += 1

    tasks = [asyncio.ensure_future(stream(q)) for q in qs]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    for step in range(steps):
        for q in qs:
            q.put(step)
        while delivered < (step + 1) * streams:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return (time.perf_counter() - t0) / (steps * streams) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    best = min(asyncio.run(run(a.streams, a.steps)) for _ in range(a.repeats))
    print(json.dumps({"streams": a.streams, "us_per_event": round(best, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
