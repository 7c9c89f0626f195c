#!/usr/bin/env python3
"""What llama-server's own log says it did during a bench/serve_bench.py run: per client level, the
requests it finished, its output tok/s from its first launch to its last release (server side, no
HTTP), the median per-slot time per output token and the mean number of slots busy.

For a run whose client rows were lost, or to see a server's per-slot step cost, which the client
cannot. Tasks are grouped into levels in launch order (a level starts when the one before has
finished), sized as serve_bench sizes them, after its warm-up requests. A log of one server per
level (gpu_check restarts llama-server for each, appending to one file) is split at each start,
and each level skips its own warm-up.

    python3 bench/llama_server_log.py $OUT/serve-llama-qwen2.5-0.5b.log --clients 1,8,32,64,128,256
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_bench import level_requests  # noqa: E402

_START = re.compile(r".* llama_server: listening on ")  # a server (re)started: task ids and clocks restart
_LINE = re.compile(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I slot\s+(\w+): id +\d+ \| task (\d+) \|(.*)")


def tasks(lines) -> list[dict]:
    """The log's tasks in launch order: start and end (s), output tokens and decode ms of each."""
    by_id, order = {}, []
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        mi, s, ms, us, kind, tid, rest = m.groups()
        t = int(mi) * 60 + int(s) + int(ms) / 1e3 + int(us) / 1e6
        d = by_id.setdefault(int(tid), {})
        if kind == "launch_slot_":
            d["start"] = t
            order.append(d)
        elif kind == "release":
            d["end"] = t
        elif kind == "print_timing" and " eval time" in rest and "prompt eval" not in rest:
            d["ms"] = float(re.search(r"=\s+([\d.]+) ms", rest).group(1))
            d["out"] = int(re.search(r"/\s+(\d+) tokens", rest).group(1))
    return order


def level_row(clients: int, sent: list[dict]) -> dict:
    done = [d for d in sent if "end" in d]
    if not done:
        return {"clients": clients, "requests": len(sent), "done": 0}
    t0, t1 = min(d["start"] for d in sent), max(d["end"] for d in done)
    edges = sorted([(d["start"], 1) for d in done] + [(d["end"], -1) for d in done])
    busy, area, last = 0, 0.0, edges[0][0]
    for t, e in edges:
        area += busy * (t - last)
        busy, last = busy + e, t
    out = sum(d.get("out", 0) for d in done)
    per = [d["ms"] / d["out"] for d in done if d.get("out", 0) > 1]
    return {"clients": clients, "requests": len(sent), "done": len(done), "output_tok_s": round(out / (t1 - t0), 1),
            "ms_per_token_p50": round(float(np.median(per)), 2) if per else None,
            "mean_busy_slots": round(area / (edges[-1][0] - edges[0][0]), 1)}


def runs(lines) -> list[list[str]]:
    """The log split at each server start (a single run when it never restarted)."""
    out: list[list[str]] = [[]]
    for line in lines:
        if _START.match(line) and any(_LINE.match(x) for x in out[-1]):
            out.append([])
        out[-1].append(line)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log")
    ap.add_argument("--clients", default="1,8,32,64,128,256")
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args(argv)
    with open(a.log, errors="replace") as f:
        parts = [tasks(run) for run in runs(f)]
    levels = [int(x) for x in a.clients.split(",") if x]
    per_level = len(parts) > 1  # restarted: run k is level k, each with its warm-up
    order, i = parts[0], a.warmup
    print("| clients | requests done | output tok/s (server log) | per-slot ms per output token, p50 | mean busy slots |")
    print("|---:|---:|---:|---:|---:|")
    for k, c in enumerate(levels):
        if per_level:
            if k >= len(parts):
                break
            order, i = parts[k], a.warmup
        n = level_requests(c, a.min_requests, a.requests_per_client)
        r = level_row(c, order[i:i + n])
        i += n
        if not r["done"]:
            break
        print(f"| {c} | {r['done']} / {n} | {r['output_tok_s']:,} | {r['ms_per_token_p50']} | {r['mean_busy_slots']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
