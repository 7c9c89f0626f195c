"""n = 8 parallel samples hold their shared prompt's KV blocks once, as /metrics shows while they
run: a real worker on a real port with SmolLM2 on the CPU backend, scraped mid-request."""
from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server

pytestmark = pytest.mark.slow

N = 8
MAX_TOKENS = 16


def _gauges(port) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(body) for s in fam.samples
            if s.name.startswith("orcd_kv_blocks")}


def test_n8_holds_the_prompt_blocks_once(smollm2_path):
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(smollm2_path.parent)], backend="cpu",
                       max_context=256, max_sequences=N, max_queue=8, grace_seconds=1, max_samples=N,
                       metrics_port=0)
    worker, port, scheduler = start_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.WorkerStub(channel)
        list(stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name), timeout=600))
        engine = scheduler.engine
        bs = engine.allocator.block_size
        tok = engine.tokenizer
        words = "the quick brown fox jumps over a lazy dog while seven owls watch from an old oak tree".split()
        prompt = [int(t) for t in tok.encode(" ".join(words * 6))][:90]
        assert len(prompt) == 90
        idle = _gauges(worker.metrics_port)
        assert idle["orcd_kv_blocks_used"] == 0 and idle["orcd_kv_blocks_shared"] == 0

        # the samples share the blocks of the prompt but its last token (each computes that one)
        full = (len(prompt) - 1) // bs
        prompt_blocks = -(-len(prompt) // bs)
        own_max = -(-(len(prompt) + MAX_TOKENS) // bs) - full  # a sample's own blocks at its end
        own_min = prompt_blocks - full
        req = pb.ExecuteRequest(n=N, tokens=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(temperature=0.8, seed=5),
                                stopping=pb.StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True))
        seen, mid, finished = set(), None, 0
        for ev in stub.Execute(req, timeout=300):
            if ev.HasField("token"):
                seen.add(ev.token.sample_index)
                if mid is None and len(seen) == N:  # every sample has started decoding
                    mid = _gauges(worker.metrics_port)
            elif ev.HasField("finished"):
                finished += 1
        assert finished == N and mid is not None
        used, shared = mid["orcd_kv_blocks_used"], mid["orcd_kv_blocks_shared"]
        assert shared == full, mid
        assert full + N * own_min <= used <= full + N * own_max, (mid, full, own_min, own_max)
        assert used < N * prompt_blocks  # not a copy of the prompt per sample
        end = time.monotonic() + 10  # the gauges are set after the step that sent the last Finished
        while (after := _gauges(worker.metrics_port))["orcd_kv_blocks_used"] and time.monotonic() < end:
            time.sleep(0.05)
        assert after["orcd_kv_blocks_used"] == 0 and after["orcd_kv_blocks_shared"] == 0
        assert engine.free_blocks() == engine.total_blocks()
    finally:
        channel.close()
        worker.stop(1)
