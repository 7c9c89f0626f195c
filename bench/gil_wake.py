#!/usr/bin/env python3
"""How long a thread that waited with the GIL released (the engine thread on a GPU sync, the
gRPC loop in epoll) takes to run again while another thread runs Python, at several thread
switch intervals (sys.setswitchinterval; ORCD_GIL_SWITCH_US sets the worker's). One thread
spins in Python; the measured one sleeps --wait-ms, as a step's wait would, and records how
late it resumes. Prints one JSON object per interval: median, p90 and max of the lateness, ms.

    python3 bench/gil_wake.py [--intervals-us 5000,1000,500,200] [--wait-ms 2] [--reps 300]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time


def lateness(interval_s: float, wait_s: float, reps: int) -> list[float]:
    sys.setswitchinterval(interval_s)
    stop = threading.Event()

    def spin():  # pure Python, never blocking: holds the GIL until the interval forces a switch
        x = 0
        while not stop.is_set():
            x += 1

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    out = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            time.sleep(wait_s)
            out.append((time.perf_counter() - t0 - wait_s) * 1e3)
    finally:
        stop.set()
        t.join()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--intervals-us", default="5000,1000,500,200")
    ap.add_argument("--wait-ms", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=300)
    a = ap.parse_args(argv)
    before = sys.getswitchinterval()
    try:
        for us in (int(x) for x in a.intervals_us.split(",")):
            late = sorted(lateness(us / 1e6, a.wait_ms / 1e3, a.reps))
            print(json.dumps({"switch_us": us, "wait_ms": a.wait_ms, "late_ms_p50": round(statistics.median(late), 3),
                              "late_ms_p90": round(late[int(0.9 * (len(late) - 1))], 3),
                              "late_ms_max": round(late[-1], 3)}), flush=True)
    finally:
        sys.setswitchinterval(before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
