"""Real files through gRPC (issue #3): SmolLM2-135M-Instruct and Gemma 3 270M, each served by a
real server on a real port (CPU backend) and driven by a real gRPC client, generate
deterministic, coherent text: greedy completions of a factual prompt contain the answer, the
same seed at temperature > 0 gives the same tokens twice, and the streamed text is valid UTF-8
with no replacement characters and equals the tokenizer's decode of the streamed ids.

CPU time: requests stay at a few tokens, as CI's machines are small and busy (the CPU backend's
speed on such a machine is in BENCHMARKS.md).
"""
from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server
from orcd_grpc.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

CONTEXT = 128


def _serve(path):
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(path.parent)], backend="cpu",
                       max_context=CONTEXT, max_sequences=4, max_queue=8, grace_seconds=1)
    worker, port, _ = start_server(cfg)
    assert port > 0
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.WorkerStub(channel)
    events = list(stub.LoadModel(pb.LoadModelRequest(path=path.name), timeout=600))
    model = events[-1].model
    return SimpleNamespace(worker=worker, channel=channel, stub=stub, model=model,
                           tokenizer=Tokenizer.from_gguf_file(path))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    s = _serve(smollm2_path)
    assert s.model.architecture == "llama" and s.model.has_chat_template
    yield s
    s.channel.close()
    s.worker.stop(1)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    s = _serve(gemma3_path)
    assert s.model.architecture == "gemma3"
    yield s
    s.channel.close()
    s.worker.stop(1)


def generate(srv, *, text=None, chat=None, max_tokens=4, temperature=0.0, seed=None, ignore_eos=False):
    sampling = pb.SamplingParams(temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    req = pb.ExecuteRequest(sampling=sampling,
                            stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=ignore_eos))
    if chat is not None:
        req.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=chat)]))
    else:
        req.text = text
    events = list(srv.stub.Execute(req, timeout=300))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds[1:-1]) <= {"token"}
    tokens = [e.token for e in events[1:-1]]
    ids = [t.token_id for t in tokens]
    out = "".join(t.text for t in tokens)
    # Nothing replaced (every piece was whole UTF-8), and the stream is exactly the decode of its ids.
    assert "\ufffd" not in out, out
    assert out == srv.tokenizer.decode(ids, skip_special=True), (out, ids)
    return SimpleNamespace(ids=ids, text=out, finished=events[-1].finished)


# ---- SmolLM2-135M-Instruct -----------------------------------------------------------------


def test_smollm2_greedy_answers_and_repeats(smollm2):
    a = generate(smollm2, text="The capital of France is", max_tokens=3)
    assert "Paris" in a.text, a.text
    b = generate(smollm2, text="The capital of France is", max_tokens=3)
    assert b.ids == a.ids


def test_smollm2_chat_template_greedy_answers(smollm2):
    r = generate(smollm2, chat="What is the capital of France?", max_tokens=12)
    assert "Paris" in r.text, r.text


def test_smollm2_same_seed_same_text(smollm2):
    runs = [generate(smollm2, text="Once upon a time", max_tokens=8, temperature=0.9, seed=7, ignore_eos=True)
            for _ in range(2)]
    assert len(runs[0].ids) == 8 and runs[0].ids == runs[1].ids and runs[0].text == runs[1].text


# ---- Gemma 3 270M (the pretrained model: its GGUF file has no chat template) ----------------


def test_gemma3_greedy_answers_and_repeats(gemma3):
    a = generate(gemma3, text="The capital of Japan is", max_tokens=2)
    assert "Tokyo" in a.text, a.text
    b = generate(gemma3, text="The capital of Japan is", max_tokens=2)
    assert b.ids == a.ids


def test_gemma3_greedy_non_ascii_text(gemma3):
    # " Wien. Sie ist die größte ...": the answer, then multi-byte UTF-8 through the stream.
    r = generate(gemma3, text="Die Hauptstadt von Österreich ist", max_tokens=7)
    assert "Wien" in r.text, r.text
    assert any(ord(c) > 127 for c in r.text), r.text


def test_gemma3_same_seed_same_text(gemma3):
    runs = [generate(gemma3, text="Once upon a time", max_tokens=5, temperature=0.9, seed=7, ignore_eos=True)
            for _ in range(2)]
    assert len(runs[0].ids) == 5 and runs[0].ids == runs[1].ids and runs[0].text == runs[1].text


def test_gemma3_chat_without_template_is_failed_precondition(gemma3):
    assert not gemma3.model.has_chat_template
    with pytest.raises(grpc.RpcError) as ei:
        generate(gemma3, chat="What is the capital of France?", max_tokens=2)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
