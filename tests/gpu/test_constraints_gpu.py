"""Constrained output on the GPU: the sample kernel's bitmask against a float64 NumPy reference,
and constrained requests through a real server on the CUDA backend (SmolLM2, Gemma 3), whose
outputs must be in their language and, greedy, equal the CPU backend's tokens.

Run on a GPU machine: PYTHONPATH=$PWD python3 -m pytest -q tests/gpu/test_constraints_gpu.py
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from orcd_grpc.backends.base import StepMeta
from orcd_grpc.backends.runner import pack_bitmask, unpack_bitmask

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def be():
    from orcd_grpc.backends.cuda import CudaBackend

    b = CudaBackend(workspace_bytes=256 << 20)
    yield b
    b.close()


@pytest.fixture
def rng(request):
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _meta():
    return StepMeta(token_ids=np.zeros(1, np.int32), positions=np.zeros(1, np.int32),
                    q_starts=np.array([0, 1], np.int32), ctx_lens=np.array([1], np.int32),
                    slot_mapping=np.zeros(1, np.int32), block_tables=np.zeros((1, 1), np.int32), block_size=1,
                    logits_rows=np.array([0], np.int32))


def _masked_log_softmax(x, allowed):
    x = np.where(allowed, x.astype(np.float64), -np.inf)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("V", [1000, 49152, 262144 + 7])
def test_bitmask_greedy_logprobs_and_top(be, rng, V):
    """Greedy picks the best allowed token; logprob and top_logprobs are of the masked
    distribution (float64 reference, 2e-4); rows without a mask (mixed in) are untouched."""
    R = 5
    x = (rng.standard_normal((R, V)) * 3).astype(np.float32)
    allowed = rng.random((R, V)) < 0.01
    allowed[:, 3] = True
    allowed[1] = True  # a row whose mask allows everything
    bits = np.stack([pack_bitmask(a) for a in allowed])
    bits[3] = -1  # and one that carries no mask at all
    eff = unpack_bitmask(bits, V)
    be.begin_step(_meta())
    toks, lps, tid, tlp = be.sample(be.from_host(x), [{"temperature": 0.0}] * R, n_top=4, bits=bits)
    ls = _masked_log_softmax(x, eff)
    np.testing.assert_array_equal(toks, np.where(eff, x, -np.inf).argmax(-1))
    np.testing.assert_allclose(lps, ls[np.arange(R), toks], atol=2e-4)
    ref_top = np.argsort(-np.where(eff, x, -np.inf), axis=-1, kind="stable")[:, :4]
    np.testing.assert_array_equal(tid, ref_top)
    np.testing.assert_allclose(tlp, np.take_along_axis(ls, ref_top, -1), atol=2e-4)


def test_bitmask_sampling_never_leaves_the_mask(be, rng):
    """At temperature 1 with filters and penalties, every draw is an allowed token, and the
    frequencies follow the masked distribution (total variation < 0.06 at N = 20000)."""
    V, N = 1000, 20000
    row = (rng.standard_normal(V) * 2).astype(np.float32)
    allowed = rng.random(V) < 0.05
    bits = np.broadcast_to(pack_bitmask(allowed), (N, (V + 31) // 32)).copy()
    be.begin_step(_meta())
    xd = be.from_host(np.broadcast_to(row, (N, V)).copy())
    toks, _ = be.sample(xd, [dict(temperature=1.0, seed=5, counter=i) for i in range(N)], bits=bits)
    assert allowed[toks].all()
    p = np.exp(_masked_log_softmax(row[None], allowed[None])[0])
    tv = 0.5 * np.abs(np.bincount(toks, minlength=V) / N - p).sum()
    assert tv < 0.06, tv
    pen = [dict(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3, prompt_ids=[int(np.argmax(row))],
                seed=9, counter=i) for i in range(64)]
    toks, _ = be.sample(be.from_host(np.broadcast_to(row, (64, V)).copy()), pen, bits=bits[:64])
    assert allowed[toks].all()


# ---- real models through a real server on the CUDA backend -------------------------------------

def _run(srv, constraint, text, max_tokens=48, temperature=0.0, seed=None, top=0):
    from orcd_grpc.proto import pb

    sp = pb.SamplingParams(temperature=temperature)
    if seed is not None:
        sp.seed = seed
    req = pb.ExecuteRequest(text=text, constraint=constraint, sampling=sp, top_logprobs=top,
                            stopping=pb.StoppingCriteria(max_tokens=max_tokens))
    ev = list(srv.stub.Execute(req, timeout=300))
    toks = [e.token for e in ev if e.HasField("token")]
    if top:
        return toks, ev[-1].finished
    return "".join(t.text for t in toks), [t.token_id for t in toks], ev[-1].finished


def _agree_until_near_tie(ids, ref_tokens, margin=0.05):
    """The device's greedy ids equal the host's up to the first step where the host's best two
    allowed tokens are within `margin` nats (float32 vs the GPU's reductions may order them
    either way there); returns how many were compared."""
    for i, t in enumerate(ref_tokens):
        top = t.top_logprobs
        if len(top) > 1 and top[0].logprob - top[1].logprob < margin:
            return i
        assert i < len(ids) and ids[i] == t.token_id, (i, ids, [r.token_id for r in ref_tokens])
    assert len(ids) == len(ref_tokens)
    return len(ref_tokens)


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_constrained_requests_on_cuda_match_cpu(request, real_server, model):
    import jsonschema

    from orcd_grpc import constraints
    from orcd_grpc.proto import pb

    path = request.getfixturevalue(model)
    gpu = real_server(path, backend="cuda")
    cpu = real_server(path, backend="numpy", max_sequences=2)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"], "additionalProperties": False}
    cases = [(pb.Constraint(regex=r"[0-9]{3}-[a-z]{2,4}"), r"[0-9]{3}-[a-z]{2,4}"),
             (pb.Constraint(json_schema=json.dumps(schema)), None),
             (pb.Constraint(lark_grammar='start: "yes" | "no"'), "yes|no")]
    free = gpu.scheduler.engine.free_blocks()
    for c, pattern in cases:
        text, ids, fin = _run(gpu, c, "Answer:")
        assert fin.reason == pb.FINISH_REASON_STOP_TOKEN, text
        if pattern:
            assert re.fullmatch(pattern, text), text
        else:
            jsonschema.validate(json.loads(text), schema)
        # greedy: the device's masked argmax is the host's (up to a near-tie)
        ref, _ = _run(cpu, c, "Answer:", top=2)
        _agree_until_near_tie(ids, ref)
        for seed in (1, 2):  # sampled: still in the language
            text, _, fin = _run(gpu, c, "Answer:", temperature=0.9, seed=seed)
            if fin.reason != pb.FINISH_REASON_STOP_TOKEN:
                continue  # cut by max_tokens
            if pattern:
                assert re.fullmatch(pattern, text), text
            else:
                jsonschema.validate(json.loads(text), schema)
    assert gpu.scheduler.engine.free_blocks() == free and constraints.live_matchers() == 0



def test_constrained_rows_on_the_overlap_loop_match_step_by_step(tmp_path):
    """Constrained decode steps queued ahead on the CUDA graphs (the forward fed on the device,
    the sampling queued with the masks once the token in flight reached the matchers) give the
    tokens of step-by-step decoding, seeded, while the batch changes, and every output is in its
    language (tests/schedules.py's constrained_batch on the tiny llama)."""
    import sys
    from pathlib import Path

    from orcd_grpc.loader import load_engine

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from gpu.test_cuda_models import write_tiny_llama
    from schedules import constrained_batch

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    runs = {}
    for mode in ("lookahead", "plain"):
        eng = load_engine(path, backend="cuda", max_sequences=8, max_context=256)
        try:
            assert eng.capabilities.overlap
            eng.runner.lookahead = mode == "lookahead"
            fed = []
            step = eng.backend.graph_step
            eng.backend.graph_step = lambda *a, feed=None, **k: fed.append(feed is not None) or step(*a, feed=feed, **k)
            runs[mode] = constrained_batch(eng)
            assert (sum(fed) >= 5) if mode == "lookahead" else not any(fed), fed
        finally:
            eng.close()
    assert runs["lookahead"] == runs["plain"]
