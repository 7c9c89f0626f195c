"""Streams one greedy completion from an orcd worker and prints it as it arrives.

    python3 clients/python/stream.py [host:port] [prompt] [max_tokens]

The same example as clients/ts/examples/stream.ts and clients/go/src/orcd/cmd/orcd-example, on
the Python client the CLI uses (orcd_grpc.client.OrcdClient; `pip install -e .` provides it).
"""
from __future__ import annotations

import os
import sys

from orcd_grpc.client import OrcdClient, finish_reason_name


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else os.environ.get("ORCD_ADDRESS", "127.0.0.1:50051")
    prompt = argv[2] if len(argv) > 2 else "The capital of France is"
    max_tokens = int(argv[3]) if len(argv) > 3 else 16
    with OrcdClient(address, timeout=300) as client:
        client.wait_ready(timeout=30)  # grpc.health.v1 until SERVING
        for ev in client.stream_text(prompt, temperature=0, max_tokens=max_tokens):
            kind = ev.WhichOneof("event")
            if kind == "started":
                print(f"[request {ev.started.request_id}, {ev.started.prompt_tokens} prompt tokens]",
                      file=sys.stderr)
                print(prompt, end="", flush=True)
            elif kind == "token":
                print(ev.token.text, end="", flush=True)
            elif kind == "finished":
                f = ev.finished
                print()
                print(f"[{finish_reason_name(f.reason)}: {f.usage.completion_tokens} tokens, "
                      f"{f.timings.decode_tokens_per_second:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
