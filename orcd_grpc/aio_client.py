"""The asyncio client of the orcd.v1.Worker service (grpc.aio): OrcdClient's methods as coroutines.

    async with AsyncOrcdClient("127.0.0.1:50051", tls_ca="ca.pem") as client:
        await client.wait_ready()
        async for event in client.stream_text("Hello", max_tokens=16):
            ...
        done = await client.generate_text("Hello", max_tokens=16)

Streams (execute, stream_text, load_model) are async iterators; leaving one early (break, or
`async with` around it) cancels the call and so the request. Failed calls raise the same typed
errors as OrcdClient (orcd_grpc.client_errors). Create the client inside the event loop that
uses it: a grpc.aio channel belongs to one loop.
"""
from __future__ import annotations

import asyncio
import time
from typing import Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import channels
from .client import (Completion, CompletionBuilder, SamplesBuilder, build_request, render_chat_request,
                     tls_options, tokenize_request)
from .client_errors import OrcdRpcError, typed_errors
from .proto import pb, pb_grpc


class ResponseStream:
    """The events of one streaming call; `cancel()` (or leaving `async with`) ends it."""

    def __init__(self, call):
        self._call = call

    def __aiter__(self) -> "ResponseStream":
        return self

    async def __anext__(self):
        with typed_errors():
            event = await self._call.read()
        if event is grpc.aio.EOF:
            raise StopAsyncIteration
        return event

    def cancel(self) -> bool:
        return self._call.cancel()

    async def __aenter__(self) -> "ResponseStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def __del__(self):
        # An abandoned stream must not keep a request running on the worker.
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            call.cancel()


class AsyncOrcdClient:
    """Client of one orcd worker, for asyncio. Arguments as OrcdClient's (channel: a grpc.aio
    channel)."""

    def __init__(self, address: str, *, timeout: float | None = None,
                 metadata: Iterable[tuple[str, str]] | None = None, channel: grpc.aio.Channel | None = None,
                 tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None,
                 tls_server_name: str | None = None, insecure: bool = False):
        self.address = address
        self.timeout = timeout
        self.metadata = tuple(metadata or ())
        opts = tls_options(channel, tls, tls_ca, tls_cert, tls_key, tls_server_name)
        if channel is None:
            channels.check_token_transport(address, self.metadata, opts, insecure)
        self._channel = channel or channels.open_channel(address, opts, aio=True)
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # --- plumbing ----------------------------------------------------------------------------

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncOrcdClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _kw(self, timeout: float | None, metadata) -> dict:
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.metadata + tuple(metadata or ())}

    # --- Worker RPCs -------------------------------------------------------------------------

    def execute(self, request: pb.ExecuteRequest, *, timeout: float | None = None,
                metadata=None) -> ResponseStream:
        """The events of one request, as an async iterator."""
        return ResponseStream(self._stub.Execute(request, **self._kw(timeout, metadata)))

    def stream_text(self, prompt=None, *, timeout: float | None = None, metadata=None,
                    **params) -> ResponseStream:
        """execute() with the request built from keyword arguments (see client.build_request)."""
        return self.execute(build_request(prompt, **params), timeout=timeout, metadata=metadata)

    async def generate_text(self, prompt=None, *, timeout: float | None = None, metadata=None,
                            n: int | None = None, **params) -> Completion | list[Completion]:
        """One Completion; with n > 1 a list of the n samples' Completions (see OrcdClient)."""
        done = SamplesBuilder() if n is not None and n > 1 else CompletionBuilder()
        async with self.stream_text(prompt, timeout=timeout, metadata=metadata, n=n, **params) as events:
            async for event in events:
                done.add(event)
        return done.result(n) if isinstance(done, SamplesBuilder) else done.result()

    async def score(self, prompt, *, top_n: int = 0, timeout: float | None = None, metadata=None,
                    **params) -> Completion:
        """The prompt's log-probs with nothing generated (see OrcdClient.score)."""
        return await self.generate_text(prompt, timeout=timeout, metadata=metadata, prompt_logprobs=top_n,
                                        max_tokens=0, **params)

    async def cancel(self, request_id: str, *, timeout: float | None = None, metadata=None) -> bool:
        with typed_errors():
            resp = await self._stub.Cancel(pb.CancelRequest(request_id=request_id), **self._kw(timeout, metadata))
        return resp.cancelled

    def load_model(self, path: str, model_id: str = "", context_length: int = 0, *,
                   timeout: float | None = None, metadata=None) -> ResponseStream:
        """LoadProgress events, then one event carrying the ModelDescription."""
        req = pb.LoadModelRequest(path=str(path), model_id=model_id, context_length=context_length)
        return ResponseStream(self._stub.LoadModel(req, **self._kw(timeout, metadata)))

    async def list_models(self, *, timeout: float | None = None, metadata=None) -> list[pb.ModelDescription]:
        with typed_errors():
            resp = await self._stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout, metadata))
        return list(resp.models)

    async def unload_model(self, model_id: str = "", *, timeout: float | None = None, metadata=None) -> None:
        """Unloads model_id; empty: the only loaded model (an error when there is not exactly one)."""
        if not model_id:
            loaded = await self.list_models(timeout=timeout, metadata=metadata)
            if len(loaded) != 1:
                raise ValueError(f"model_id: {len(loaded)} models are loaded; name the one to unload")
            model_id = loaded[0].model_id
        with typed_errors():
            await self._stub.UnloadModel(pb.UnloadModelRequest(model_id=model_id), **self._kw(timeout, metadata))

    async def hardware_info(self, *, timeout: float | None = None, metadata=None) -> pb.HardwareInfoResponse:
        with typed_errors():
            return await self._stub.HardwareInfo(pb.HardwareInfoRequest(), **self._kw(timeout, metadata))

    # --- token services ---------------------------------------------------------------------

    async def tokenize(self, prompt: str | Sequence[dict], *, add_bos: bool | None = None,
                       return_offsets: bool = False, model_id: str = "", timeout: float | None = None,
                       metadata=None) -> pb.TokenizeResponse:
        """Ids of a text (with return_offsets: byte spans) or of chat messages (see OrcdClient)."""
        req = tokenize_request(prompt, add_bos, return_offsets, model_id)
        with typed_errors():
            return await self._stub.Tokenize(req, **self._kw(timeout, metadata))

    async def detokenize(self, ids: Sequence[int], *, skip_special_tokens: bool = False, model_id: str = "",
                         timeout: float | None = None, metadata=None) -> str:
        req = pb.DetokenizeRequest(model_id=model_id, ids=list(ids), skip_special_tokens=skip_special_tokens)
        with typed_errors():
            return (await self._stub.Detokenize(req, **self._kw(timeout, metadata))).text

    async def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                          add_bos: bool | None = None, model_id: str = "", timeout: float | None = None,
                          metadata=None) -> pb.RenderChatResponse:
        """The chat template's prompt text for messages, and its ids."""
        req = render_chat_request(messages, add_generation_prompt, add_bos, model_id)
        with typed_errors():
            return await self._stub.RenderChat(req, **self._kw(timeout, metadata))

    # --- health ------------------------------------------------------------------------------

    async def health(self, service: str = "", *, timeout: float | None = None, metadata=None) -> str:
        with typed_errors():
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                            **self._kw(timeout, metadata))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Waits until the server answers SERVING; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f}s (last: {last})")
            try:
                status = await self.health(service, timeout=min(left, 2.0))
                if status == "SERVING":
                    return
                last = status
            except OrcdRpcError as exc:
                last = str(exc)
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
