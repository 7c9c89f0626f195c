"""Numerics and status codes (issue #15) through a real server on a real port.

A tiny random llama (written here, F32, logits of order 10 like a real model's) served on the CPU
backend; the CUDA variant of the sampling tests runs where a GPU is present. Sampling edge values
against greedy decoding and a float64 NumPy reference, malformed request bytes, LoadModel paths
and context lengths, UnloadModel ids, and range messages quoting the value as sent.
"""
from __future__ import annotations

import os
import secrets

import grpc
import numpy as np
import pytest

from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server

VOCAB, TRAINED = 256, 512


def write_model(path, *, seed=0, vocab=VOCAB, d=64, d_ff=128, n_heads=4, n_kv=2, out_scale=6.0):
    """A one-layer random llama whose logits spread like a real model's (std ~out_scale)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(TRAINED)
    w.add_embedding_length(d)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    hd = d // n_heads

    def mat(name, n, k, scale):
        w.add_tensor(name, (rng.standard_normal((n, k)) * scale).astype(np.float32))

    mat("token_embd.weight", vocab, d, 1.0)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    mat("output.weight", vocab, d, out_scale / np.sqrt(d))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(d, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(d, np.float32))
    mat("blk.0.attn_q.weight", n_heads * hd, d, 1 / np.sqrt(d))
    mat("blk.0.attn_k.weight", n_kv * hd, d, 1 / np.sqrt(d))
    mat("blk.0.attn_v.weight", n_kv * hd, d, 1 / np.sqrt(d))
    mat("blk.0.attn_output.weight", d, n_heads * hd, 0.5 / np.sqrt(d))
    mat("blk.0.ffn_gate.weight", d_ff, d, 1 / np.sqrt(d))
    mat("blk.0.ffn_up.weight", d_ff, d, 1 / np.sqrt(d))
    mat("blk.0.ffn_down.weight", d, d_ff, 0.5 / np.sqrt(d_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def srv(request, tmp_path_factory):
    from types import SimpleNamespace

    models = tmp_path_factory.mktemp("models")
    path = write_model(models / "tiny.gguf")
    (models / "sub").mkdir()
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(models)], backend=request.param,
                       model_path=str(path), max_sequences=4, max_queue=8, grace_seconds=1)
    worker, port, scheduler = start_server(cfg)
    assert worker.wait_loaded(120), worker.load_error
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield SimpleNamespace(worker=worker, channel=channel, stub=pb_grpc.WorkerStub(channel), path=path,
                          models=models, backend=request.param)
    channel.close()
    worker.stop(1)


def fresh_rng():
    seed = secrets.randbits(32)
    return np.random.default_rng(seed), seed


def generate(stub, ids, n, **sampling):
    events = list(stub.Execute(pb.ExecuteRequest(tokens=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**sampling),
                                                 stopping=pb.StoppingCriteria(max_tokens=n, ignore_eos=True)),
                               timeout=60))
    return [e.token.token_id for e in events if e.WhichOneof("event") == "token"]


def error_of(call):
    with pytest.raises(grpc.RpcError) as ei:
        r = call()
        if not isinstance(r, pb.UnloadModelResponse | pb.CancelResponse):
            list(r)
    return ei.value.code(), ei.value.details()


# ---------------------------------------------------------------------------------------------
# sampling edge values run as their limit


def test_tiny_temperature_gives_exactly_the_greedy_tokens(srv):
    rng, seed = fresh_rng()
    for _ in range(3):
        ids = rng.integers(3, VOCAB, 12).tolist()
        greedy = generate(srv.stub, ids, 12, temperature=0.0)
        for temp in (1e-38, 1e-45, 9e-6):  # float32 subnormal, its smallest, just under the cut-off
            got = generate(srv.stub, ids, 12, temperature=temp, seed=int(rng.integers(2**63)))
            assert got == greedy, (seed, temp, ids)
        # top_p at most 1/vocabulary keeps only the most likely token: greedy too
        got = generate(srv.stub, ids, 12, temperature=1.0, top_p=1e-38, seed=int(rng.integers(2**63)))
        assert got == greedy, (seed, "top_p", ids)


def _reference_logits(path, prompt, generated):
    """Teacher-forced float32 logits of every sampling step, from the engine loaded in-process."""
    from orcd_grpc.loader import load_engine
    from orcd_grpc.sampling import SamplingParams

    eng = load_engine(path, backend="numpy", max_sequences=1, max_context=TRAINED)
    try:
        s = eng.new_sequence(list(prompt), SamplingParams(temperature=0.0))
        rows = [eng.score(s)[-1]] + [eng.score(s, [t])[-1] for t in generated[:-1]]
        return np.asarray(rows, np.float64)
    finally:
        eng.close()


def test_tiny_repetition_penalty_follows_the_float64_reference(srv):
    """Repetition penalty 1e-38 (a float32 subnormal) divides the positive logits of seen tokens
    by it. In float64 nothing overflows, and the exact distribution puts all its mass (to within
    1e-9) on the seen token with the largest positive logit: the server must draw that token at
    every step, never the arbitrary token a NaN softmax gave."""
    rng, seed = fresh_rng()
    rp32 = float(np.float32(1e-38))
    one_hot_steps = 0
    for _ in range(2):
        prompt = rng.integers(3, VOCAB, 10).tolist()
        temp = float(np.float32(rng.uniform(0.5, 1.5)))
        got = generate(srv.stub, prompt, 8, temperature=temp, repetition_penalty=rp32,
                       seed=int(rng.integers(2**63)))
        assert len(got) == 8
        logits = _reference_logits(srv.path, prompt, got)
        for step, (row, tok) in enumerate(zip(logits, got)):
            seen = np.unique(prompt + got[:step])
            x = row.copy()
            x[seen] = np.where(x[seen] > 0, x[seen] / rp32, x[seen] * rp32)
            z = (x - x.max()) / temp
            p = np.exp(z) / np.exp(z).sum()
            assert p[tok] > 1e-9, (seed, step, tok, p.max())  # never a token the reference excludes
            if p.max() > 1 - 1e-9:
                one_hot_steps += 1
                assert tok == int(p.argmax()), (seed, step)
    assert one_hot_steps >= 8, (seed, one_hot_steps)  # the limit regime was actually exercised


# ---------------------------------------------------------------------------------------------
# malformed request bytes


@pytest.mark.parametrize("method,streaming,data", [
    ("Execute", True, b"\xff\xff\xff\xff"),               # not protobuf wire format
    ("Execute", True, b"\x0a\x02\xc3\x28"),               # request_id with invalid UTF-8
    ("LoadModel", True, b"\x0a\x05ab"),                    # a string running past the end
    ("Cancel", False, b"\x0a\x80"),                       # a truncated length varint
    ("UnloadModel", False, b"\x0a\x03\xff\xfe\xfd"),
])
def test_malformed_request_is_invalid_argument(srv, method, streaming, data):
    make = srv.channel.unary_stream if streaming else srv.channel.unary_unary
    call = make(f"/orcd.v1.Worker/{method}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as ei:
        r = call(data, timeout=10)
        if streaming:
            list(r)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert ei.value.details().startswith(f"request: not a valid orcd.v1.{method}Request message")
    assert generate(srv.stub, [5, 6, 7], 2, temperature=0.0)  # the worker carries on


def test_malformed_request_is_checked_after_the_bearer_token():
    token = "t" * 24
    worker, port, _ = start_server(ServerConfig(host="127.0.0.1", port=0, auth_token=token, grace_seconds=0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/orcd.v1.Worker/Cancel", request_serializer=None, response_deserializer=None)
            for md, want in ((None, grpc.StatusCode.UNAUTHENTICATED),
                             ((("authorization", f"Bearer {token}"),), grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.RpcError) as ei:
                    call(b"\x0a\x80", metadata=md, timeout=10)
                assert ei.value.code() == want, ei.value.details()
    finally:
        worker.stop(0)


# ---------------------------------------------------------------------------------------------
# LoadModel paths and context lengths


def _load(srv, path, **kw):
    return error_of(lambda: srv.stub.LoadModel(pb.LoadModelRequest(path=path, **kw), timeout=60))


def _server_dirs(srv):
    return {str(srv.models), os.path.realpath(srv.models), str(srv.models.parent)}


def test_overlong_and_bad_paths_get_the_right_code_and_no_server_path(srv):
    try:
        os.symlink("/etc/hostname", srv.models / "out.gguf")
    except FileExistsError:
        pass
    cases = [
        ("a" * 5000, grpc.StatusCode.INVALID_ARGUMENT),            # over PATH_MAX
        ("b" * 300 + ".gguf", grpc.StatusCode.INVALID_ARGUMENT),   # a component over NAME_MAX
        ("d/" * 2040 + "x.gguf", grpc.StatusCode.INVALID_ARGUMENT),  # fits alone, not under the model dir
        ("c" * 200 + ".gguf", grpc.StatusCode.NOT_FOUND),
        ("nope.gguf", grpc.StatusCode.NOT_FOUND),
        ("../../etc/passwd", grpc.StatusCode.PERMISSION_DENIED),
        ("out.gguf", grpc.StatusCode.PERMISSION_DENIED),           # a link leading outside
        ("sub", grpc.StatusCode.INVALID_ARGUMENT),                 # a directory
        ("", grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for path, want in cases:
        code, details = _load(srv, path)
        assert code == want, (path[:40], code, details)
        assert details.startswith("path: "), details
        assert not any(d in details for d in _server_dirs(srv)), details
        assert len(details) < 300, details  # the client's path is quoted cut short


@pytest.mark.parametrize("ctx", [1, 2, 16, 63])
def test_load_context_length_below_the_minimum_is_refused(srv, ctx):
    code, details = _load(srv, "tiny.gguf", context_length=ctx)
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert details == f"context_length: must be 0 (the model's trained length) or at least 64, got {ctx}"
    assert generate(srv.stub, [5, 6, 7], 2, temperature=0.0)  # the served model is untouched


def test_load_context_length_at_the_minimum_loads(srv):
    try:
        events = list(srv.stub.LoadModel(pb.LoadModelRequest(path="tiny.gguf", context_length=64), timeout=60))
        assert events[-1].model.context_length == 64
        assert len(generate(srv.stub, [5, 6, 7], 4, temperature=0.0)) == 4
    finally:
        list(srv.stub.LoadModel(pb.LoadModelRequest(path="tiny.gguf"), timeout=60))


def test_model_descriptions_name_the_file_as_a_client_loads_it_not_the_server_path(srv):
    """ListModels is open to every token holder: the path it reports is the one LoadModel takes
    (relative to the model directory), never the worker's directory layout."""
    listed = srv.stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0]
    assert listed.path == "tiny.gguf", listed.path
    try:
        (srv.models / "sub" / "again.gguf").write_bytes((srv.models / "tiny.gguf").read_bytes())
        loaded = list(srv.stub.LoadModel(pb.LoadModelRequest(path="sub/again.gguf"), timeout=60))[-1].model
        assert loaded.path == "sub/again.gguf", loaded.path
        assert not any(d in loaded.path for d in _server_dirs(srv))
        # what was reported loads again as it is
        assert list(srv.stub.LoadModel(pb.LoadModelRequest(path=loaded.path), timeout=60))[-1].model.path == loaded.path
    finally:
        list(srv.stub.LoadModel(pb.LoadModelRequest(path="tiny.gguf"), timeout=60))


# ---------------------------------------------------------------------------------------------
# UnloadModel ids


def test_unload_needs_the_served_model_id(srv):
    def unload(mid):
        return error_of(lambda: srv.stub.UnloadModel(pb.UnloadModelRequest(model_id=mid), timeout=10))

    code, details = unload("")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("model_id: "), details
    code, details = unload("not-the-served-one")
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("model_id: "), details
    served = srv.stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [m.model_id for m in served] == ["tiny"]
    assert generate(srv.stub, [5, 6, 7], 2, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# range messages quote the value as sent


@pytest.mark.parametrize("field,value,bounds", [
    ("temperature", 100.0001, "[0, 100]"),
    ("temperature", -1e-45, "[0, 100]"),
    ("top_p", 1.0000001, "(0, 1]"),
    ("min_p", 1.0000001, "[0, 1]"),
    ("repetition_penalty", 10.000001, "(0, 10]"),
    ("presence_penalty", 2.0000002, "[-2, 2]"),
    ("frequency_penalty", -2.0000002, "[-2, 2]"),
])
def test_range_messages_quote_the_value_as_sent(srv, field, value, bounds):
    code, details = error_of(lambda: srv.stub.Execute(pb.ExecuteRequest(
        text="hi", sampling=pb.SamplingParams(**{field: value})), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"sampling.{field}: must be in {bounds}, got {value!r}"


def test_startup_context_length_below_the_minimum_is_refused(tmp_path):
    """`orcd serve --context-length 8` gets the same floor as LoadModel."""
    path = write_model(tmp_path / "tiny.gguf")
    worker, _, _ = start_server(ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(tmp_path)], backend="cpu",
                                             model_path=str(path), context_length=8, grace_seconds=0))
    try:
        assert not worker.wait_loaded(60)
        assert str(worker.load_error).startswith("context_length: must be 0 (the model's trained length) or at least 64")
    finally:
        worker.stop(0)
