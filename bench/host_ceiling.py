#!/usr/bin/env python3
"""What the serving host alone can deliver: the real gRPC server and scheduler over a scripted
engine whose every step takes a fixed time (--step-ms, as a GPU step would), driven by
serve_bench.py's clients with the worker's metrics. No model, no GPU: the engine is the
scheduler tests' FakeEngine (tests/test_scheduler.py), which gives every sequence one token per
step. Compare the client's time to first token with the worker's own (server_ttft_mean_ms), and
output tok/s with what the steps could give (sequences running x steps per second). The last
line is the worker process's own CPU per 1,000 output tokens (its gRPC loop and engine thread);
--frontends N runs N front-end processes on the worker's port (`orcd serve --frontends`), which
then carry every call.

    python3 bench/host_ceiling.py [--step-ms 5] [--clients 16,64] [--procs 2] [--requests-per-client 3]
        [--frontends N]
    python3 bench/host_ceiling.py --serve --port P [--log-steps FILE]   (the worker alone, for serve_bench)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(step_s: float, port: int, metrics_port: int, tmp: str, frontends: int = 0, log_steps: str = "") -> None:
    """Runs in the child: the worker over the scripted engine, until killed. log_steps: a file that gets
    one line per step, "rows tokens rows_with_prompt_tokens" (bench/step_shapes.py reads it)."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from orcd_grpc.server import apply_switch_interval
    from orcd_grpc.tuning import Tuning

    apply_switch_interval(Tuning.from_env())  # ORCD_GIL_SWITCH_US, as `orcd serve` applies it
    import orcd_grpc.scheduler as scheduler
    from orcd_grpc.server import ServerConfig, start_server
    from test_scheduler import FakeEngine, FakeTokenizer

    FakeTokenizer.is_special = lambda self, t: t in (0, 1)  # BOS, EOS (what StreamDecoder asks)

    class Logged(FakeEngine):
        def launch(self, seqs, token_budget=2048, after=None):
            before = [(s.num_cached, s.prefill_remaining > 0) for s in seqs]
            out = super().launch(seqs, token_budget, after)
            if out is not None:  # the tokens each row took are what its cache grew by
                tokens = sum(s.num_cached - n for s, (n, _) in zip(seqs, before))
                log.write(f"{len(seqs)} {tokens} {sum(p for _, p in before)}\n")
            return out

    log = open(log_steps, "w", buffering=1) if log_steps else None
    engine = Logged if log else FakeEngine
    scheduler.default_loader = lambda path, **kw: engine(
        script=list(range(40, 240)), blocks=1 << 20, context_length=4096, max_sequences=256, step_delay=step_s)
    path = os.path.join(tmp, "scripted.gguf")
    open(path, "wb").write(b"GGUF")  # never read: the loader above ignores it
    start_server(ServerConfig(host="127.0.0.1", port=port, model_dirs=[tmp], model_path=path, backend="cpu",
                              max_sequences=256, max_queue=512, metrics_port=metrics_port, frontends=frontends))
    while True:
        time.sleep(3600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--clients", default="16,64")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--port", type=int, default=50361)
    ap.add_argument("--coalesce", action="store_true", help="the clients ask for coalesce_tokens")
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--frontends", type=int, default=0, help="front-end processes on the worker's port (--frontends)")
    ap.add_argument("--serve", action="store_true",
                    help="only the worker, until killed (drive it with serve_bench.py on --port)")
    ap.add_argument("--log-steps", default="", help="with --serve: each step's rows and tokens to this file")
    a = ap.parse_args()
    if a.serve:
        with tempfile.TemporaryDirectory() as tmp:
            serve(a.step_ms / 1e3, a.port, a.port + 1, tmp, a.frontends, a.log_steps)
        return 0
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--step-ms", str(a.step_ms), "--port", str(a.port),
                              "--frontends", str(a.frontends)])
    try:
        cpu0 = _cpu_s(child.pid)
        bench = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "serve_bench.py"), "grpc",
                                  f"127.0.0.1:{a.port}", "--vocab", "250",
                                  "--clients", a.clients, "--procs", str(a.procs),
                                  "--metrics", f"http://127.0.0.1:{a.port + 1}/metrics",
                                  "--prompt-mean", "64", "--output-mean", "64", "--max-prompt", "200",
                                  "--max-output", "200", "--requests-per-client", str(a.requests_per_client)]
                                 + ["--coalesce"] * a.coalesce, stdout=subprocess.PIPE, text=True)
        tokens = 0
        for line in bench.stdout:
            print(line, end="", flush=True)
            try:
                tokens += json.loads(line).get("output_tokens", 0)
            except ValueError:
                pass
        rc = bench.wait()
        # the worker process's own CPU (its threads: the gRPC loop, the engine; not its front ends)
        # per output token of the whole run, warm-up included
        cpu = _cpu_s(child.pid) - cpu0
        print(json.dumps({"worker_cpu_s": round(cpu, 2), "output_tokens": tokens, "frontends": a.frontends,
                          "worker_cpu_ms_per_1k_tokens": round(1e6 * cpu / tokens, 1) if tokens else None}))
        return rc
    finally:
        child.kill()
        child.wait()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process pid so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
