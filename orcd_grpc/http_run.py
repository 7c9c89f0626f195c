"""One submitted request of the HTTP front door: its scheduler events turned into OpenAI choices,
sent as server-sent events or as one reply.

A request of n samples is n choices, indexed by the events' sample index. Every event becomes
the chunks it means (stream) and is added to its choice (whole reply) by one path, `_on`, so
the streamed and the whole reply cannot disagree. Tool-call markup is parsed per choice by the
same ToolStream the gRPC servicer uses; completions' echo puts the prompt (and, with logprobs, its
scored positions) ahead of each choice's text.
"""
from __future__ import annotations

import asyncio
import json
import queue

import grpc
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse

from . import openai_reply as rp, prompt_scoring
from .errors import Internal, OrcdError
from .loop_events import LoopEvents
from .http_errors import error_response, openai_error
from .request import CANCELLED, ErrorEvent, FinishedEvent, Request, TokenEvent, Unavailable
from .tool_calls import ANSWER, REASONING, Call
from .tool_stream import ToolStream

_POLL_S = 1.0  # how often a request waiting on its queue checks that the engine thread is alive


class SSEResponse(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends: finished, failed, or
    cancelled because the client disconnected (Starlette cancels the stream on http.disconnect)."""

    def __init__(self, content, on_close, headers=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def on_disconnect(request: HttpRequest, gone) -> None:
    """Calls gone() when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone()
            return


class _Choice:
    """One sample's part of the reply."""

    def __init__(self, index: int, run: "Run", req: Request, echo: tuple[str, bool] | None):
        self.index = index
        self.req, self.echo = req, echo
        self.texts: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] = []
        self.logprobs = rp.LogprobsBuilder(run.kind, req.engine.tokenizer) if run.wants_logprobs else None
        use = req.tool_use
        self.tools = ToolStream(use.family, use.names, req.engine.tokenizer) if use and use.family else None
        self.echoed = echo is None
        self.finish: str | None = None


class Run:
    """One call's submitted requests (one, or one per prompt of a completions batch), their events
    (tagged with the request's place on `events`) as a stream of SSE chunks or as one reply.
    `echoes`: per request, completions' (prompt text, whether it was text input), or None."""

    def __init__(self, door, reqs: list[Request], kind: str, body, client: str, reserved: int, path: str,
                 events: LoopEvents, echoes: list):
        self.door, self.reqs, self.kind, self.body = door, reqs, kind, body
        self.client, self.reserved, self.path = client, reserved, path
        self.queue = events
        self.reply = rp.Reply(kind, reqs[0].request_id, reqs[0].model_id)
        self.wants_logprobs = bool(body.logprobs) if kind == "chat" else body.logprobs is not None
        opts = body.stream_options
        self.with_usage = bool(body.stream and opts and opts.include_usage)
        n = reqs[0].n
        # choice i * n + k: request i's sample k (OpenAI's order for a batch of prompts)
        self.choices = [_Choice(i * n + k, self, req, echoes[i]) for i, req in enumerate(reqs) for k in range(n)]
        self.prompt_entries: list = [[] for _ in reqs]  # per request, scored positions 1.. (echo with logprobs)
        self.left = len(self.choices)  # choices not finished yet
        self.used = [0, 0, 0]  # prompt, completion, cached prompt tokens
        self.generated = 0
        self._closed = False
        self._gone = False
        usage = door.usage
        self._label = usage.label(client) if usage is not None else None
        if usage is not None:
            usage.prompt_tokens.labels(self._label).inc(sum(req.prompt_tokens for req in reqs))

    def gone(self) -> None:
        self._gone = True
        for req in self.reqs:
            self.door.scheduler.abandon(req)

    def close(self) -> None:
        """However the call ended: a request still live is abandoned, the reservation settled."""
        if self._closed:
            return
        self._closed = True
        for req in self.reqs:
            self.door.scheduler.abandon(req)
        self.door.settle(self.client, self.reserved, self.generated)

    async def _next(self):
        while True:
            try:
                i, ev = await self.queue.get(_POLL_S)
                break
            except queue.Empty:
                if not self.door.scheduler.alive():
                    i, ev = 0, ErrorEvent(Internal("the engine thread stopped"))
                    break
        if isinstance(ev, TokenEvent):
            self.generated += 1
            if self.door.usage is not None:
                self.door.usage.generated_tokens.labels(self._label).inc()
        return i, ev

    def _failure(self, ev) -> OrcdError:
        if isinstance(ev, ErrorEvent):
            return ev.error
        return Unavailable(f"the request was cancelled: {ev.detail or 'the worker is stopping'}")

    # ---- events -> choices and chunks ----------------------------------------------------------

    def _echo(self, c: _Choice) -> list[dict]:
        """The prompt ahead of choice c's first text (completions' echo)."""
        if c.echoed:
            return []
        c.echoed = True
        text, plain = c.echo
        lp = None
        if c.logprobs is not None:
            lp = c.logprobs.add_prompt(c.req.prompt_ids, self.prompt_entries[self.reqs.index(c.req)], echo_text=text,
                                       plain_text=plain)
        c.texts.append(text)
        return [self.reply.chunk(c.index, text=text, logprobs=lp, with_usage=self.with_usage)]

    def _token(self, c: _Choice, ev: TokenEvent, channel: str) -> list[dict]:
        lp = c.logprobs.add(ev) if c.logprobs is not None else None
        if channel == REASONING:
            c.reasoning.append(ev.text)
            if not ev.text:
                return []
            out = self.reply.chunk(c.index, logprobs=lp, with_usage=self.with_usage)
            out["choices"][0]["delta"]["reasoning_content"] = ev.text
            return [out]
        text = ""  # tool-call markup: the call is sent whole (_call); only its logprobs travel here
        if channel == ANSWER:
            c.texts.append(ev.text)
            text = ev.text
        if not text and lp is None:
            return []
        return [self.reply.chunk(c.index, text=text, logprobs=lp, with_usage=self.with_usage)]

    def _call(self, c: _Choice, call: Call) -> list[dict]:
        entry = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        c.tool_calls.append(entry)
        return [self.reply.chunk(c.index, tool_calls=[{"index": len(c.tool_calls) - 1, **entry}],
                                 with_usage=self.with_usage)]

    def _routed(self, c: _Choice, items) -> list[dict]:
        out = []
        for item in items:
            out += self._call(c, item) if isinstance(item, Call) else self._token(c, item.event, item.channel)
        return out

    def _on(self, i: int, ev) -> list[dict]:
        """Adds one event of request i to its choice; returns the stream chunks it makes."""
        if isinstance(ev, prompt_scoring.PromptLogprobsEvent):
            self.prompt_entries[i] += ev.entries
            return []
        c = self.choices[i * self.reqs[i].n + ev.sample]
        out = self._echo(c)
        if isinstance(ev, TokenEvent):
            if c.tools is None:
                return out + self._token(c, ev, ANSWER)
            return out + self._routed(c, c.tools.on_token(ev))
        reason = ev.reason  # a FinishedEvent
        if c.tools is not None:
            out += self._routed(c, c.tools.on_finish())
            reason = c.tools.finish_reason(reason)
        c.finish = rp.FINISH_REASONS[reason]
        self.left -= 1
        if ev.sample == 0:  # the samples of a request share its prompt: counted once
            self.used[0] += ev.prompt_tokens
            self.used[2] += ev.cached_prompt_tokens
        self.used[1] += ev.completion_tokens
        return out + [self.reply.chunk(c.index, text=None if self.kind == "chat" else "", finish=c.finish,
                                       with_usage=self.with_usage)]

    def _usage(self) -> dict:
        return rp.usage(*self.used)

    def _choice(self, c: _Choice) -> dict:
        lp = c.logprobs.result() if c.logprobs is not None else None
        out = self.reply.choice(c.index, "".join(c.texts), c.finish, lp, c.tool_calls)
        if c.reasoning and self.kind == "chat":
            out["message"]["reasoning_content"] = "".join(c.reasoning)
        return out

    def _ended(self, ev) -> bool:
        """Whether ev ends the call in failure (an error, or a sample cancelled)."""
        return isinstance(ev, ErrorEvent) or (isinstance(ev, FinishedEvent) and ev.reason == CANCELLED)

    async def collect(self, headers: dict):
        while True:
            i, ev = await self._next()
            if self._ended(ev):
                err = self._failure(ev)
                # a client that went away is counted as gRPC counts a cancelled call, not as an outage
                self.door.count(self.path, grpc.StatusCode.CANCELLED if self._gone else err.code)
                resp = error_response(err, self.kind, self.body)
                resp.headers.update(headers)
                return resp
            if not isinstance(ev, (TokenEvent, FinishedEvent, prompt_scoring.PromptLogprobsEvent)):
                continue
            self._on(i, ev)
            if self.left == 0:
                self.door.count(self.path, grpc.StatusCode.OK)
                body = self.reply.complete([self._choice(c) for c in self.choices], self._usage())
                return JSONResponse(body, headers=headers)

    async def events(self):
        if self.kind == "chat":
            for c in self.choices:
                yield sse(self.reply.chunk(c.index, role=True, text="", with_usage=self.with_usage))
        while True:
            i, ev = await self._next()
            if self._ended(ev):
                err = self._failure(ev)
                self.door.count(self.path, err.code)
                yield sse(openai_error(err, self.kind, self.body)[1])
                break
            if not isinstance(ev, (TokenEvent, FinishedEvent, prompt_scoring.PromptLogprobsEvent)):
                continue
            for chunk in self._on(i, ev):
                yield sse(chunk)
            if self.left == 0:
                self.door.count(self.path, grpc.StatusCode.OK)
                if self.with_usage:
                    yield sse(self.reply.usage_chunk(self._usage()))
                break
        yield "data: [DONE]\n\n"


async def respond(run: Run, request: HttpRequest, headers: dict):
    """The response of a submitted run: a stream, or the whole reply once it has finished (the
    request is abandoned if the client goes away first)."""
    if run.body.stream:
        return SSEResponse(run.events(), run.close, headers=headers)
    watcher = asyncio.create_task(on_disconnect(request, run.gone))
    try:
        return await run.collect(headers)
    finally:
        watcher.cancel()
        run.close()
