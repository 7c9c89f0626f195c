"""The Python clients (orcd_grpc.client.OrcdClient, orcd_grpc.aio_client.AsyncOrcdClient) against
a real worker on a real socket: typed errors, TLS and mutual TLS, and every method of the asyncio
client."""
from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from orcd_grpc import ratelimit
from test_cli_client import TOKEN, _non_loopback_ip, needs_openssl, pki, start_worker, tiny_model  # noqa: F401

GREEDY = dict(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_model):  # noqa: F811
    worker, port = start_worker(tiny_model)
    yield f"127.0.0.1:{port}"
    worker.stop(0)


# ---- typed errors ---------------------------------------------------------------------------------


def test_failed_calls_raise_typed_errors_that_are_still_grpc_errors(plain):
    from orcd_grpc.client import OrcdClient
    from orcd_grpc.client_errors import InvalidArgumentError, NotFoundError, OrcdRpcError

    with OrcdClient(plain, timeout=30) as client:
        with pytest.raises(NotFoundError) as nf:
            client.cancel("no-such-request")
        err = nf.value
        assert isinstance(err, OrcdRpcError) and isinstance(err, grpc.RpcError)
        assert err.code() == grpc.StatusCode.NOT_FOUND and err.details() == err.message and err.message
        assert str(err) == f"NOT_FOUND: {err.message}"
        assert isinstance(err.__cause__, grpc.RpcError) and not isinstance(err.__cause__, OrcdRpcError)
        assert err.retry_after_ms is None
        # A stream's error comes out of the iteration, typed as well.
        with pytest.raises(InvalidArgumentError, match="top_p"):
            client.generate_text("ab cd", top_p=1.5, max_tokens=2)
        with pytest.raises(NotFoundError):
            client.unload_model("no-such-model")
        assert client.generate_text("ab cd", **GREEDY).usage.completion_tokens == 3


def test_unreachable_worker_is_unavailable():
    from orcd_grpc.client import OrcdClient
    from orcd_grpc.client_errors import UnavailableError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with OrcdClient(f"127.0.0.1:{port}", timeout=5) as client, pytest.raises(UnavailableError):
        client.list_models()


def test_retry_after_comes_from_the_trailing_metadata(tiny_model):  # noqa: F811
    from orcd_grpc.client import OrcdClient
    from orcd_grpc.client_errors import ResourceExhaustedError
    from orcd_grpc.server import ServerConfig, start_server

    limited = ratelimit.build_interceptor(ratelimit.RateLimits(requests_per_s=0.01, request_burst=1))
    worker, port, _ = start_server(ServerConfig(host="127.0.0.1", port=0, grace_seconds=0, interceptors=[limited]))
    try:
        with OrcdClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.list_models()
            with pytest.raises(ResourceExhaustedError) as ei:
                client.list_models()
        assert ei.value.retry_after_ms and ei.value.retry_after_ms > 0
        assert dict(ei.value.trailing_metadata())["retry-after-ms"] == str(ei.value.retry_after_ms)
    finally:
        worker.stop(0)


# ---- TLS in the library -----------------------------------------------------------------------------


@needs_openssl
def test_sync_client_over_tls_and_mutual_tls(pki, tiny_model):  # noqa: F811
    from orcd_grpc.client import OrcdClient
    from orcd_grpc.client_errors import UnavailableError

    worker, port = start_worker(tiny_model, pki=pki, mtls=True)
    try:
        address = f"127.0.0.1:{port}"
        with OrcdClient(address, timeout=30, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                        tls_key=pki / "client.key") as client:
            assert client.generate_text("ab cd", **GREEDY).usage.completion_tokens == 3
        # PEM bytes work as paths do.
        with OrcdClient(address, timeout=30, tls_ca=(pki / "ca.pem").read_bytes(),
                        tls_cert=(pki / "client.pem").read_bytes(), tls_key=(pki / "client.key").read_bytes()) as c:
            assert [m.model_id for m in c.list_models()] == ["tiny"]
        with OrcdClient(address, timeout=5, tls_ca=pki / "ca.pem") as client, pytest.raises(UnavailableError):
            client.list_models()  # no client certificate
    finally:
        worker.stop(0)


def test_token_in_plaintext_to_another_machine_needs_insecure(tiny_model):  # noqa: F811
    from orcd_grpc.aio_client import AsyncOrcdClient
    from orcd_grpc.client import OrcdClient
    from orcd_grpc.client_errors import ClientConfigError

    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    worker, port = start_worker(tiny_model, tokens=f"{TOKEN}:ops", host="0.0.0.0")
    bearer = [("authorization", f"Bearer {TOKEN}")]
    try:
        for cls in (OrcdClient, AsyncOrcdClient):
            with pytest.raises(ClientConfigError, match="refusing to send a bearer token in plaintext"):
                cls(f"{ip}:{port}", metadata=bearer)
        with OrcdClient(f"{ip}:{port}", metadata=bearer, insecure=True, timeout=10) as client:
            assert len(client.list_models()) == 1
        with OrcdClient(f"{ip}:{port}", timeout=10) as client:  # no token: nothing to protect
            assert client.health() == "SERVING"
    finally:
        worker.stop(0)


# ---- the asyncio client --------------------------------------------------------------------------


def test_async_client_methods_against_a_real_worker(plain, tiny_model):  # noqa: F811
    from orcd_grpc.aio_client import AsyncOrcdClient
    from orcd_grpc.client_errors import InvalidArgumentError, NotFoundError

    async def main():
        async with AsyncOrcdClient(plain, timeout=30) as client:
            await client.wait_ready(timeout=10)
            assert await client.health() == "SERVING"
            assert await client.health("orcd.v1.Worker") == "SERVING"
            assert [m.model_id for m in await client.list_models()] == ["tiny"]
            info = await client.hardware_info()
            assert info.backend == "cpu"
            done = await client.generate_text("ab cd", request_id="aio-1", **GREEDY)
            assert done.request_id == "aio-1" and done.finish_reason == "LENGTH"
            assert len(done.token_ids) == done.usage.completion_tokens == 3
            kinds = [e.WhichOneof("event") async for e in client.stream_text("ab cd", **GREEDY)]
            assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("token") == 3
            with pytest.raises(NotFoundError) as nf:
                await client.cancel("no-such-request")
            assert nf.value.code() == grpc.StatusCode.NOT_FOUND and isinstance(nf.value.__cause__, grpc.RpcError)
            with pytest.raises(InvalidArgumentError, match="top_p"):
                await client.generate_text("ab cd", top_p=1.5)
            # Loading streams progress, then the model; the old one is replaced.
            events = [e async for e in client.load_model(str(tiny_model), model_id="tiny-2")]
            assert events[0].WhichOneof("event") == "progress" and events[-1].model.model_id == "tiny-2"
            assert [m.model_id for m in await client.list_models()] == ["tiny-2"]
            await client.unload_model()
            assert await client.list_models() == []
            with pytest.raises(TimeoutError):
                await client.wait_ready(timeout=0.5)  # nothing served: NOT_SERVING
            events = [e async for e in client.load_model(str(tiny_model), model_id="tiny")]
            assert events[-1].model.model_id == "tiny"

    asyncio.run(main())


@needs_openssl
def test_async_client_over_mutual_tls(pki, tiny_model):  # noqa: F811
    from orcd_grpc.aio_client import AsyncOrcdClient
    from orcd_grpc.client_errors import UnauthenticatedError

    worker, port = start_worker(tiny_model, pki=pki, mtls=True, tokens=f"{TOKEN}:ops")
    try:
        async def main():
            kw = dict(timeout=30, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem", tls_key=pki / "client.key")
            async with AsyncOrcdClient(f"127.0.0.1:{port}", **kw) as anonymous:
                with pytest.raises(UnauthenticatedError):
                    await anonymous.list_models()
            async with AsyncOrcdClient(f"127.0.0.1:{port}", metadata=[("authorization", f"Bearer {TOKEN}")],
                                       **kw) as client:
                done = await client.generate_text("ab cd", **GREEDY)
                assert done.usage.completion_tokens == 3 and done.model_id == "tiny"

        asyncio.run(main())
    finally:
        worker.stop(0)



# ---- n samples, scoring and the token services (SmolLM2, CPU backend) ---------------------------


@pytest.fixture(scope="module")
def smol(smollm2_path):
    worker, port = start_worker(smollm2_path)
    yield f"127.0.0.1:{port}"
    worker.stop(0)


def test_n_samples_return_one_completion_each(smol):
    from orcd_grpc.aio_client import AsyncOrcdClient
    from orcd_grpc.client import Completion, OrcdClient

    params = dict(seed=11, max_tokens=5, ignore_eos=True)
    with OrcdClient(smol, timeout=60) as c:
        samples = c.generate_text("Once upon a time", n=3, **params)
        assert isinstance(samples, list) and len(samples) == 3
        # n=1 (or unset) stays one Completion; sample k is the one-sample request with seed + k.
        singles = [c.generate_text("Once upon a time", n=1 if k else None, **{**params, "seed": 11 + k})
                   for k in range(3)]
        assert all(isinstance(s, Completion) for s in singles)
        for s, one in zip(samples, singles):
            assert (s.token_ids, s.text, s.finish_reason) == (one.token_ids, one.text, "LENGTH")
            assert s.usage.completion_tokens == 5 and s.request_id == samples[0].request_id

    async def main():
        async with AsyncOrcdClient(smol, timeout=60) as a:
            return await a.generate_text("Once upon a time", n=3, **params)

    assert [s.token_ids for s in asyncio.run(main())] == [s.token_ids for s in samples]


def test_score_and_async_token_services_match_the_sync_client(smol):
    from orcd_grpc.aio_client import AsyncOrcdClient
    from orcd_grpc.client import OrcdClient

    text = "The quick brown fox jumps over the lazy dog."
    chat = [{"role": "user", "content": "hi <|im_start|>"}]
    with OrcdClient(smol, timeout=60) as c:
        ids = list(c.tokenize(text).ids)
        scored = c.score(text, top_n=2)
        rendered = c.render_chat(chat)
        chat_ids = list(c.tokenize(chat).ids)
    assert scored.usage.completion_tokens == 0 and scored.text == ""
    assert [e.token_id for e in scored.prompt_logprobs] == ids[1:]
    assert all(e.logprob < 0 and len(e.top_logprobs) == 2 for e in scored.prompt_logprobs)

    async def main():
        async with AsyncOrcdClient(smol, timeout=60) as a:
            tok = await a.tokenize(text, return_offsets=True)
            back = await a.detokenize(tok.ids, skip_special_tokens=True)
            r = await a.render_chat(chat)
            s = await a.score(text, top_n=2)
            with pytest.raises(grpc.RpcError) as bad:
                await a.tokenize("")
            return tok, back, r, s, bad.value

    tok, back, r, s, bad = asyncio.run(main())
    assert list(tok.ids) == ids and len(tok.offsets) == len(ids)
    assert back.strip() == text
    assert (r.text, list(r.ids)) == (rendered.text, list(rendered.ids)) and list(r.ids) == chat_ids
    assert [e.logprob for e in s.prompt_logprobs] == pytest.approx([e.logprob for e in scored.prompt_logprobs],
                                                                     abs=1e-4)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
