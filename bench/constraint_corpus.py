#!/usr/bin/env python3
"""The 50-schema constraint corpus (tests/data/constraint_schemas.json) through a real worker.

For each model, every schema is sent as Execute's constraint.json_schema (chat prompt, temperature
0.7, a seed per schema, max_tokens --max-tokens), --parallel at a time, and every output is
checked: parsed as JSON and validated with the `jsonschema` library. Prints one JSON object per
model: % valid among all, % valid among those that finished with STOP_TOKEN, the failures, and,
when the worker runs in this process, the host cost of the constraint masks: wall time of the
llguidance mask fills per masked row (the fills run on the CPU while the GPU runs the forward).

    python3 bench/constraint_corpus.py                                  # SmolLM2 and Gemma 3, CPU
    python3 bench/constraint_corpus.py smollm2-135m-instruct gemma-3-270m --backend cuda
    python3 bench/constraint_corpus.py 127.0.0.1:50051                  # a running worker (its model)

ADDRESS_OR_MODEL: host:port of a running worker, a GGUF path, or a model_store name.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from orcd_grpc import constraints  # noqa: E402
from orcd_grpc.proto import pb, pb_grpc  # noqa: E402

CORPUS = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "constraint_schemas.json"
DEFAULT_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


class MaskTimer:
    """Wraps Constraint.fill_rows (what both runners call per step) to time the mask fills."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls, self.rows, self.seconds = 0, 0, []
        self._orig = constraints.Constraint.fill_rows

    def __enter__(self):
        orig = self._orig

        def timed(items, bits):
            t0 = time.perf_counter()
            orig(items, bits)
            dt = time.perf_counter() - t0
            with self.lock:
                self.calls += 1
                self.rows += len(items)
                self.seconds.append(dt / max(1, len(items)))
        constraints.Constraint.fill_rows = staticmethod(timed)
        return self

    def __exit__(self, *exc):
        constraints.Constraint.fill_rows = staticmethod(self._orig)

    def report(self) -> dict:
        if not self.seconds:
            return {}
        us = sorted(1e6 * s for s in self.seconds)
        return {"mask_fills": self.calls, "masked_rows": self.rows,
                "mask_us_per_row_mean": round(statistics.fmean(us), 1),
                "mask_us_per_row_p50": round(us[len(us) // 2], 1),
                "mask_us_per_row_p99": round(us[min(len(us) - 1, int(0.99 * len(us)))], 1)}


def _stub_for(target: str, backend: str, max_sequences: int):
    """(stub, model_id, close) for an address, or for a model served here."""
    if ":" in target and not pathlib.Path(target).exists():
        ch = grpc.insecure_channel(target)
        stub = pb_grpc.WorkerStub(ch)
        info = stub.ListModels(pb.ListModelsRequest(), timeout=30)
        model = info.models[0].model_id if info.models else "?"
        return stub, model, ch.close
    from orcd_grpc.server import ServerConfig, start_server

    path = pathlib.Path(target)
    if not path.exists():
        from orcd_grpc import model_store

        path = model_store.ensure_model(target)
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(path.parent)], backend=backend,
                       max_context=1024, max_sequences=max_sequences, max_queue=128, grace_seconds=1)
    worker, port, _ = start_server(cfg)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.WorkerStub(ch)
    model = list(stub.LoadModel(pb.LoadModelRequest(path=path.name), timeout=1200))[-1].model.model_id

    def close():
        ch.close()
        worker.stop(1)
    return stub, model, close


def _one(stub, case: dict, seed: int, max_tokens: int, use_chat: bool) -> dict:
    import jsonschema

    req = pb.ExecuteRequest(constraint=pb.Constraint(json_schema=json.dumps(case["schema"])),
                            sampling=pb.SamplingParams(temperature=0.7, seed=seed),
                            stopping=pb.StoppingCriteria(max_tokens=max_tokens))
    if use_chat:
        req.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=case["prompt"])]))
    else:
        req.text = case["prompt"] + "\n"
    t0 = time.perf_counter()
    try:
        events = list(stub.Execute(req, timeout=600))
    except grpc.RpcError as exc:
        return {"name": case["name"], "valid": False, "error": f"{exc.code().name}: {exc.details()}"}
    text = "".join(e.token.text for e in events if e.HasField("token"))
    fin = events[-1].finished
    out = {"name": case["name"], "reason": pb.FinishReason.Name(fin.reason), "tokens": fin.usage.completion_tokens,
           "seconds": round(time.perf_counter() - t0, 3)}
    try:
        jsonschema.validate(json.loads(text), case["schema"])
        out["valid"] = True
    except Exception as exc:
        out.update(valid=False, error=f"{type(exc).__name__}: {str(exc)[:160]}", text=text[:200])
    return out


def run(target: str, backend: str, max_tokens: int, parallel: int) -> dict:
    cases = json.loads(CORPUS.read_text())["schemas"]
    stub, model, close = _stub_for(target, backend, max(parallel, 1))
    try:
        has_chat = True
        try:
            has_chat = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0].has_chat_template
        except Exception:
            pass
        with MaskTimer() as timer, concurrent.futures.ThreadPoolExecutor(parallel) as ex:
            t0 = time.perf_counter()
            results = list(ex.map(lambda ic: _one(stub, ic[1], 1000 + ic[0], max_tokens, has_chat),
                                  enumerate(cases)))
            wall = time.perf_counter() - t0
        stopped = [r for r in results if r.get("reason") == "FINISH_REASON_STOP_TOKEN"]
        report = {"model": model, "target": target, "backend": backend, "schemas": len(results),
                  "valid_pct": round(100 * sum(r["valid"] for r in results) / len(results), 1),
                  "valid_of_stopped_pct": round(100 * sum(r["valid"] for r in stopped) / max(1, len(stopped)), 1),
                  "stopped": len(stopped), "tokens": sum(r.get("tokens", 0) for r in results),
                  "wall_seconds": round(wall, 2), **timer.report(),
                  "failures": [r for r in results if not r["valid"]]}
        return report
    finally:
        close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", metavar="ADDRESS_OR_MODEL", default=list(DEFAULT_MODELS))
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--parallel", type=int, default=16, help="requests at once (they share the worker's steps)")
    args = ap.parse_args()
    for t in args.targets:
        print(json.dumps(run(t, args.backend, args.max_tokens, args.parallel)), flush=True)


if __name__ == "__main__":
    main()
