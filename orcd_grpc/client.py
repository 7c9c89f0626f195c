"""A small Python client for the orcd.v1.Worker service, used by the CLI and the tests.

It is a thin layer over the generated stub: it builds requests from keyword arguments, applies a
default deadline and metadata to every call, opens a plaintext, TLS or mutual-TLS channel
(orcd_grpc.channels), and raises failed calls as typed errors (orcd_grpc.client_errors:
OrcdRpcError, a grpc.RpcError, and one subclass per common status code). orcd_grpc.aio_client
has the same methods for asyncio.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import channels
from .client_errors import (ClientConfigError, NotFoundError, OrcdRpcError,  # noqa: F401 (re-exported)
                            typed_errors)
from .proto import pb, pb_grpc

SERVICE_NAME = "orcd.v1.Worker"

# Keyword arguments of generate_text / build_request, by the message they fill.
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "logit_bias", "allowed_token_ids",
                    "banned_token_ids", "banned_token_sequences")
_STOPPING_FIELDS = ("max_tokens", "stop", "stop_token_ids", "ignore_eos", "min_tokens")


def build_request(prompt: str | Sequence[int] | Sequence[dict] | None = None, *,
                  chat: Sequence[dict] | None = None, request_id: str = "", model_id: str = "",
                  top_logprobs: int = 0, add_bos: bool | None = None, constraint: dict | None = None,
                  prompt_logprobs: int | None = None, tools: Sequence[dict] | None = None,
                  tool_choice: str | None = None, n: int | None = None, speculation: str | dict | None = None,
                  **params) -> pb.ExecuteRequest:
    """An ExecuteRequest from plain Python values.

    prompt: text, or a list of token ids. chat: a list of {"role", "content"} dicts (instead of
    prompt), optionally with "tool_calls" ([{"id", "name", "arguments"}], arguments a dict or JSON
    text), "tool_call_id" and "name". tools: [{"name", "description", "parameters"}] (parameters
    a JSON Schema dict or JSON text). tool_choice: "auto", "none", "required" or a tool's name.
    params: the SamplingParams and StoppingCriteria fields by name; None means unset
    (logit_bias a {token id: bias} dict, banned_token_sequences a list of id lists).
    constraint: one Constraint field by name, e.g. {"regex": "[0-9]+"} or {"json_schema": {...}}
    (a schema as a dict or as its JSON text).
    prompt_logprobs: score the prompt with this many alternatives per position (None: no scoring;
    with max_tokens=0 nothing is generated).
    n: parallel samples of the one prompt (ExecuteRequest.n; None: one).
    speculation: "off", "ngram" or "draft", or a dict of Speculation's fields by name with "mode"
    one of those (e.g. {"mode": "ngram", "num_draft_tokens": 8}); None: the worker's default.
    """
    unknown = set(params) - set(_SAMPLING_FIELDS) - set(_STOPPING_FIELDS)
    if unknown:
        raise TypeError(f"unknown request parameter(s): {', '.join(sorted(unknown))}")
    if (prompt is None) == (chat is None):
        raise ValueError("input: give exactly one of prompt and chat")
    req = pb.ExecuteRequest(request_id=request_id, model_id=model_id, top_logprobs=top_logprobs)
    if chat is not None:
        req.chat.CopyFrom(pb.ChatMessages(messages=[_chat_message(m) for m in chat]))
    elif isinstance(prompt, str):
        req.text = prompt
    else:
        req.tokens.CopyFrom(pb.TokenIds(ids=list(prompt)))
    for t in tools or ():
        req.tools.append(pb.Tool(name=t["name"], description=t.get("description", ""),
                                 parameters=_json_text(t.get("parameters", ""))))
    if tool_choice is not None:
        modes = {"auto": pb.ToolChoice.TOOL_CHOICE_MODE_AUTO, "none": pb.ToolChoice.TOOL_CHOICE_MODE_NONE,
                 "required": pb.ToolChoice.TOOL_CHOICE_MODE_REQUIRED}
        req.tool_choice.CopyFrom(pb.ToolChoice(mode=modes[tool_choice]) if tool_choice in modes else
                                 pb.ToolChoice(mode=pb.ToolChoice.TOOL_CHOICE_MODE_FUNCTION, function_name=tool_choice))
    if add_bos is not None:
        req.add_bos = add_bos
    if n is not None:
        req.n = n
    if constraint is not None:
        if len(constraint) != 1:
            raise ValueError("constraint: give exactly one of " + ", ".join(pb.Constraint.DESCRIPTOR.fields_by_name))
        (kind, spec), = constraint.items()
        if kind == "json_schema" and not isinstance(spec, str):
            import json

            spec = json.dumps(spec)
        req.constraint.CopyFrom(pb.Constraint(**{kind: spec}))
    if speculation is not None:
        fields = dict(speculation) if isinstance(speculation, dict) else {"mode": speculation}
        mode = str(fields.pop("mode", "default")).upper()
        req.speculation.CopyFrom(pb.Speculation(mode=pb.Speculation.Mode.Value(f"SPECULATION_MODE_{mode}"), **fields))
    if prompt_logprobs is not None:
        req.prompt_logprobs.CopyFrom(pb.PromptLogprobsOptions(enabled=True, top_n=prompt_logprobs))
    sampling = {k: params[k] for k in _SAMPLING_FIELDS if params.get(k) is not None}
    if "banned_token_sequences" in sampling:
        sampling["banned_token_sequences"] = [pb.TokenIds(ids=list(q)) for q in sampling["banned_token_sequences"]]
    stopping = {k: params[k] for k in _STOPPING_FIELDS if params.get(k) is not None}
    if sampling:
        req.sampling.CopyFrom(pb.SamplingParams(**sampling))
    if stopping:
        req.stopping.CopyFrom(pb.StoppingCriteria(**stopping))
    return req


def _json_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _chat_message(m: dict) -> pb.ChatMessage:
    calls = [c if isinstance(c, pb.ToolCall) else
             pb.ToolCall(id=c["id"], name=c["name"], arguments=_json_text(c.get("arguments", {})))
             for c in m.get("tool_calls") or ()]
    return pb.ChatMessage(role=m["role"], content=m.get("content", ""), tool_calls=calls,
                          tool_call_id=m.get("tool_call_id", ""), name=m.get("name", ""))


@dataclasses.dataclass
class Completion:
    """The outcome of one Execute call, collected."""

    text: str
    token_ids: list[int]
    request_id: str
    model_id: str
    finish_reason: str  # e.g. "STOP_TOKEN", "LENGTH"
    matched_stop: str
    usage: pb.Usage
    timings: pb.Timings
    # with prompt_logprobs: an entry per prompt position from 1 on (PromptTokenLogprob)
    prompt_logprobs: list = dataclasses.field(default_factory=list)
    # Tool calls the model made (pb.ToolCall events), and its reasoning (CHANNEL_REASONING text,
    # e.g. GPT-OSS's analysis channel), which `text` leaves out.
    tool_calls: list = dataclasses.field(default_factory=list)
    reasoning: str = ""


def _chat(messages: Sequence[dict]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[_chat_message(m) for m in messages])


def tokenize_request(prompt: str | Sequence[dict], add_bos: bool | None, return_offsets: bool,
                     model_id: str) -> pb.TokenizeRequest:
    """A TokenizeRequest of a text or of chat messages (both clients send it)."""
    req = pb.TokenizeRequest(model_id=model_id, return_offsets=return_offsets)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.chat.CopyFrom(_chat(prompt))
    if add_bos is not None:
        req.add_bos = add_bos
    return req


def render_chat_request(messages: Sequence[dict], add_generation_prompt: bool, add_bos: bool | None,
                        model_id: str) -> pb.RenderChatRequest:
    req = pb.RenderChatRequest(model_id=model_id, chat=_chat(messages), add_generation_prompt=add_generation_prompt)
    if add_bos is not None:
        req.add_bos = add_bos
    return req


def finish_reason_name(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_")


class CompletionBuilder:
    """Collects the events of one Execute stream into a Completion (shared by both clients)."""

    def __init__(self):
        self.parts: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list = []
        self.ids: list[int] = []
        self.started = pb.Started()
        self.finished = None
        self.prompt_logprobs: list = []

    def add(self, event: pb.ExecuteResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "started":
            self.started = event.started
        elif kind == "token":
            self.add_token(event.token)
        elif kind == "token_batch":  # ExecuteRequest.coalesce_tokens: the same tokens, several a message
            for t in event.token_batch.tokens:
                self.add_token(t)
        elif kind == "prompt_logprobs":
            self.prompt_logprobs.extend(event.prompt_logprobs.entries)
        elif kind == "tool_call":
            self.tool_calls.append(event.tool_call)
        elif kind == "finished":
            self.finished = event.finished

    def add_token(self, token: pb.Token) -> None:
        (self.reasoning if token.channel == pb.CHANNEL_REASONING else self.parts).append(token.text)
        self.ids.append(token.token_id)

    def result(self) -> Completion:
        f = self.finished
        if f is None:
            raise RuntimeError("Execute stream ended without a Finished event")
        return Completion(text="".join(self.parts), token_ids=self.ids, request_id=self.started.request_id,
                          model_id=self.started.model_id, finish_reason=finish_reason_name(f.reason),
                          matched_stop=f.matched_stop, usage=f.usage, timings=f.timings,
                          prompt_logprobs=self.prompt_logprobs, tool_calls=self.tool_calls,
                          reasoning="".join(self.reasoning))


class SamplesBuilder:
    """Collects the events of an Execute stream with n samples into one Completion per sample
    (by Token/ToolCall/Finished.sample_index); Started and the prompt's log-probs belong to all."""

    def __init__(self):
        self.samples: dict[int, CompletionBuilder] = {}
        self.shared: list[pb.ExecuteResponse] = []

    def add(self, event: pb.ExecuteResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "token_batch":  # its tokens may belong to several samples
            for t in event.token_batch.tokens:
                self._sample(t.sample_index).add_token(t)
        elif kind in ("token", "tool_call", "finished"):
            self._sample(getattr(event, kind).sample_index).add(event)
        else:
            self.shared.append(event)
            for b in self.samples.values():
                b.add(event)

    def _sample(self, index: int) -> CompletionBuilder:
        """Sample `index`'s builder, made on its first event with the shared events so far."""
        if index not in self.samples:
            self.samples[index] = CompletionBuilder()
            for e in self.shared:
                self.samples[index].add(e)
        return self.samples[index]

    def result(self, n: int) -> list[Completion]:
        """The n completions in sample order (a sample with no Finished event raises)."""
        return [self._sample(i).result() for i in range(n)]


def tls_options(channel, tls, tls_ca, tls_cert, tls_key, tls_server_name) -> channels.TlsOptions:
    opts = channels.TlsOptions(tls=tls, ca=tls_ca, cert=tls_cert, key=tls_key, server_name=tls_server_name)
    if channel is not None and (opts.enabled or tls_server_name):
        raise ClientConfigError("give either a channel or TLS options, not both")
    return opts


class OrcdClient:
    """Client of one orcd worker.

    address: "host:port". timeout: default deadline in seconds of every call (None: none).
    metadata: (key, value) pairs sent with every call, e.g. [("authorization", "Bearer ...")].
    tls: TLS with the system's roots; tls_ca: trust this CA instead (a PEM path or PEM bytes;
    implies TLS); tls_cert/tls_key: a client certificate and key (mutual TLS); tls_server_name:
    the name the server certificate carries when it is not the address's host. Without TLS a
    bearer token is only sent to a loopback address unless insecure=True (ClientConfigError).
    channel: a ready channel instead (then no TLS options).
    """

    def __init__(self, address: str, *, timeout: float | None = None,
                 metadata: Iterable[tuple[str, str]] | None = None,
                 channel: grpc.Channel | None = None, tls: bool = False, tls_ca=None, tls_cert=None,
                 tls_key=None, tls_server_name: str | None = None, insecure: bool = False):
        self.address = address
        self.timeout = timeout
        self.metadata = tuple(metadata or ())
        opts = tls_options(channel, tls, tls_ca, tls_cert, tls_key, tls_server_name)
        if channel is None:
            channels.check_token_transport(address, self.metadata, opts, insecure)
        self._channel = channel or channels.open_channel(address, opts)
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # --- plumbing ----------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "OrcdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _kw(self, timeout: float | None, metadata) -> dict:
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.metadata + tuple(metadata or ())}

    # --- Worker RPCs -------------------------------------------------------------------------

    def execute(self, request: pb.ExecuteRequest, *, timeout: float | None = None,
                metadata=None) -> Iterator[pb.ExecuteResponse]:
        """Streams the events of one request. Closing the generator early cancels the call (and
        with it the request on the server)."""
        call = self._stub.Execute(request, **self._kw(timeout, metadata))
        try:
            with typed_errors():
                yield from call
        finally:
            call.cancel()

    def stream_text(self, prompt=None, *, timeout: float | None = None, metadata=None,
                    **params) -> Iterator[pb.ExecuteResponse]:
        """execute() with the request built from keyword arguments (see build_request)."""
        return self.execute(build_request(prompt, **params), timeout=timeout, metadata=metadata)

    def generate_text(self, prompt=None, *, timeout: float | None = None, metadata=None,
                      n: int | None = None, **params) -> Completion | list[Completion]:
        """Runs one request to the end and returns its text and statistics. With n > 1: a list of
        the n samples' Completions, in sample_index order (n None or 1: one Completion)."""
        done = SamplesBuilder() if n is not None and n > 1 else CompletionBuilder()
        for event in self.stream_text(prompt, timeout=timeout, metadata=metadata, n=n, **params):
            done.add(event)
        return done.result(n) if isinstance(done, SamplesBuilder) else done.result()

    def score(self, prompt, *, top_n: int = 0, timeout: float | None = None, metadata=None,
              **params) -> Completion:
        """The prompt's log-probs, nothing generated (prompt_logprobs with max_tokens 0):
        .prompt_logprobs has one PromptTokenLogprob per prompt position from 1 on."""
        return self.generate_text(prompt, timeout=timeout, metadata=metadata, prompt_logprobs=top_n,
                                  max_tokens=0, **params)

    def cancel(self, request_id: str, *, timeout: float | None = None, metadata=None) -> bool:
        with typed_errors():
            resp = self._stub.Cancel(pb.CancelRequest(request_id=request_id), **self._kw(timeout, metadata))
        return resp.cancelled

    def load_model(self, path: str, model_id: str = "", context_length: int = 0, *,
                   timeout: float | None = None, metadata=None) -> Iterator[pb.LoadModelResponse]:
        """Streams LoadProgress events, then one event carrying the ModelDescription."""
        req = pb.LoadModelRequest(path=str(path), model_id=model_id, context_length=context_length)
        call = self._stub.LoadModel(req, **self._kw(timeout, metadata))
        try:
            with typed_errors():
                yield from call
        finally:
            call.cancel()

    def list_models(self, *, timeout: float | None = None, metadata=None) -> list[pb.ModelDescription]:
        with typed_errors():
            return list(self._stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout, metadata)).models)

    def unload_model(self, model_id: str = "", *, timeout: float | None = None, metadata=None) -> None:
        """Unloads model_id; empty: the only loaded model (an error when there is not exactly one)."""
        if not model_id:
            loaded = self.list_models(timeout=timeout, metadata=metadata)
            if len(loaded) != 1:
                raise ValueError(f"model_id: {len(loaded)} models are loaded; name the one to unload")
            model_id = loaded[0].model_id
        with typed_errors():
            self._stub.UnloadModel(pb.UnloadModelRequest(model_id=model_id), **self._kw(timeout, metadata))

    def drain(self, *, wait_s: float | None = None, resume: bool = False, timeout: float | None = None,
              metadata=None) -> pb.DrainResponse:
        """Stops the worker admitting requests (health NOT_SERVING); with wait_s, waits up to that
        long for the running and queued ones to end. resume: admit again."""
        req = pb.DrainRequest(resume=resume)
        if wait_s is not None:
            req.wait, req.wait_timeout_ms = True, max(1, int(wait_s * 1000))
            timeout = timeout if timeout is not None else wait_s + 10
        with typed_errors():
            return self._stub.Drain(req, **self._kw(timeout, metadata))

    def probe(self, prompt: str | list[int], model_id: str = "", *, timeout: float | None = None,
              metadata=None) -> pb.ProbeResponse:
        """Cached prompt tokens and load for a text prompt or token ids (a router's question)."""
        req = pb.ProbeRequest(model_id=model_id)
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.tokens.ids.extend(prompt)
        with typed_errors():
            return self._stub.Probe(req, **self._kw(timeout, metadata))

    def hardware_info(self, *, timeout: float | None = None, metadata=None) -> pb.HardwareInfoResponse:
        with typed_errors():
            return self._stub.HardwareInfo(pb.HardwareInfoRequest(), **self._kw(timeout, metadata))

    # --- token services (the served model's tokenizer and chat template) ---------------------

    def tokenize(self, prompt: str | Sequence[dict], *, add_bos: bool | None = None, return_offsets: bool = False,
                 model_id: str = "", timeout: float | None = None, metadata=None) -> pb.TokenizeResponse:
        """Ids of a text (with return_offsets: each token's byte span) or of chat messages
        ([{"role", "content"}], rendered as Execute renders them)."""
        req = tokenize_request(prompt, add_bos, return_offsets, model_id)
        with typed_errors():
            return self._stub.Tokenize(req, **self._kw(timeout, metadata))

    def detokenize(self, ids: Sequence[int], *, skip_special_tokens: bool = False, model_id: str = "",
                   timeout: float | None = None, metadata=None) -> str:
        req = pb.DetokenizeRequest(model_id=model_id, ids=list(ids), skip_special_tokens=skip_special_tokens)
        with typed_errors():
            return self._stub.Detokenize(req, **self._kw(timeout, metadata)).text

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    add_bos: bool | None = None, model_id: str = "", timeout: float | None = None,
                    metadata=None) -> pb.RenderChatResponse:
        """The chat template's prompt text for messages, and its ids."""
        req = render_chat_request(messages, add_generation_prompt, add_bos, model_id)
        with typed_errors():
            return self._stub.RenderChat(req, **self._kw(timeout, metadata))

    # --- health ------------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None, metadata=None) -> str:
        """The standard gRPC health status of `service` ("" = the whole server), e.g. "SERVING"."""
        with typed_errors():
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                      **self._kw(timeout, metadata))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Blocks until the server answers SERVING, raising TimeoutError after `timeout` seconds
        with the last status or error seen."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f}s (last: {last})")
            try:
                status = self.health(service, timeout=min(left, 2.0))
                if status == "SERVING":
                    return
                last = status
            except OrcdRpcError as exc:
                last = str(exc)
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

