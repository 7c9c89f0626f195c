"""One Execute call's stream, on the gRPC server's event loop: a submitted request's scheduler
events turned into ExecuteResponse messages (tool-call routing per sample, coalesced tokens when
the client asked for them), and the request abandoned if the stream ends before its last event.
"""
from __future__ import annotations

import queue

import grpc

from .errors import Internal, OrcdError
from .proto import pb
from .prompt_scoring import PromptLogprobsEvent, to_proto
from .request import CANCELLED, LENGTH, STOP_STRING, STOP_TOKEN, ErrorEvent, FinishedEvent, Request, TokenEvent
from .tool_calls import ANSWER, REASONING, TOOL_CALL, Call
from .tool_stream import TOOL_CALLS, ToolStream

_REASONS = {
    STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    LENGTH: pb.FINISH_REASON_LENGTH,
    STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    CANCELLED: pb.FINISH_REASON_CANCELLED,
    TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_CHANNELS = {ANSWER: pb.CHANNEL_ANSWER, REASONING: pb.CHANNEL_REASONING, TOOL_CALL: pb.CHANNEL_TOOL_CALL}
_CANCEL_REASONS = {name.removeprefix("CANCEL_REASON_").lower(): value for name, value in pb.CancelReason.items()}

# How often a stream waiting for its next event checks that the engine thread is alive; the
# engine always delivers a final event, so this only matters if the engine thread has died.
POLL_S = 1.0
_MAX_BATCH = 256  # tokens of one TokenBatch event at most (coalesce_tokens)


async def abort(context, err: OrcdError) -> None:
    """Ends the call with err's status (and its retry hint); raises, as grpc.aio's abort does."""
    if err.retry_after_ms is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(err.retry_after_ms))),))
    await context.abort(err.code, str(err))


def _token(ev: TokenEvent, channel: str) -> pb.ExecuteResponse:
    # Set field by field on the message's own submessage: half the time of the keyword
    # constructors (which build a Token and copy it in), on the event loop, once per token.
    r = pb.ExecuteResponse()
    t = r.token
    t.text, t.token_id, t.index, t.logprob = ev.text, ev.token_id, ev.index, ev.logprob
    t.channel, t.sample_index = _CHANNELS[channel], ev.sample
    if ev.top:
        add = t.top_logprobs.add
        for i, text, lp in ev.top:
            add(token_id=i, text=text, logprob=lp)
    return r


def _batched(batch: list) -> pb.ExecuteResponse:
    """The waiting Token messages as one event (a lone one as a plain Token event); empties batch."""
    out = pb.ExecuteResponse(token=batch[0]) if len(batch) == 1 else \
        pb.ExecuteResponse(token_batch=pb.TokenBatch(tokens=batch))
    batch.clear()
    return out


def _routed(item, sample: int = 0) -> pb.ExecuteResponse:
    """A tool_stream item (a routed token event or a complete call) as a stream message."""
    if isinstance(item, Call):
        return pb.ExecuteResponse(tool_call=pb.ToolCall(id=item.id, name=item.name, arguments=item.arguments,
                                                        sample_index=sample))
    return _token(item.event, item.channel)


def _finished(ev: FinishedEvent, reason: str) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(finished=pb.Finished(
        sample_index=ev.sample,
        reason=_REASONS[reason], matched_stop=ev.matched_stop,
        usage=pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                       cached_prompt_tokens=ev.cached_prompt_tokens,
                       draft_tokens=ev.draft_tokens, accepted_draft_tokens=ev.accepted_draft_tokens),
        timings=pb.Timings(queue_ms=ev.queue_ms, time_to_first_token_ms=ev.time_to_first_token_ms,
                           decode_tokens_per_second=ev.decode_tokens_per_second,
                           total_ms=ev.total_ms),
        cancel_reason=_CANCEL_REASONS.get(ev.cancel_reason, 0), retry_safe=ev.retry_safe))


async def stream(req: Request, context, scheduler, count, coalesce: bool = False):
    """The messages of a submitted request whose events arrive on a loop_events queue. count(code)
    records the call's outcome once. The request is abandoned (KV blocks and batch slot freed at
    the scheduler's next step) when the stream ends early: client gone, call cancelled, server stopping."""
    batch: list = []  # coalesce: Token messages ready together, sent as one event
    left = req.n  # Finished events still to come: one per sample
    use = req.tool_use
    # Each sample's tool-call markup is parsed on its own (one parser per sample index).
    tools: dict[int, ToolStream] = {}
    route = (lambda k: tools.setdefault(k, ToolStream(use.family, use.names, req.engine.tokenizer))) \
        if use and use.family else None
    # However the call ends (a finished request is not affected): a stream its client leaves may be
    # cancelled while parked at a yield and never resumed, so no finally here would run.
    context.add_done_callback(lambda _ctx: scheduler.abandon(req))
    events = req.events
    yield pb.ExecuteResponse(started=pb.Started(
        request_id=req.request_id, model_id=req.model_id, prompt_tokens=req.prompt_tokens,
        correlation_id=req.correlation_id, queue_position=req.queue_position,
        estimated_start_ms=req.estimated_start_ms))
    while True:
        try:
            ev = events.get_nowait() if batch else await events.get(POLL_S)
        except queue.Empty:
            if batch:  # nothing more is waiting: what is, goes now
                yield _batched(batch)
                continue
            if not scheduler.alive():
                err = Internal("the engine thread stopped")
                count(err.code)
                await abort(context, err)
            continue
        if isinstance(ev, TokenEvent):
            out = (_token(ev, ANSWER),) if route is None else \
                [_routed(x, ev.sample) for x in route(ev.sample).on_token(ev)]
            if not coalesce:
                for r in out:
                    yield r
                continue
            for r in out:
                if r.WhichOneof("event") == "token":
                    batch.append(r.token)
                    if len(batch) >= _MAX_BATCH:
                        yield _batched(batch)
                else:
                    if batch:
                        yield _batched(batch)
                    yield r
            continue
        if batch:  # tokens go before whatever follows them
            yield _batched(batch)
        if isinstance(ev, PromptLogprobsEvent):
            yield pb.ExecuteResponse(prompt_logprobs=to_proto(ev, pb))
        elif isinstance(ev, FinishedEvent):
            left -= 1
            if left <= 0:
                count(grpc.StatusCode.OK)
            reason = ev.reason
            if route is not None:
                tool_stream = route(ev.sample)
                for x in tool_stream.on_finish():
                    yield _routed(x, ev.sample)
                reason = tool_stream.finish_reason(reason)
            yield _finished(ev, reason)
            if left <= 0:
                return
        elif isinstance(ev, ErrorEvent):
            count(ev.error.code)
            await abort(context, ev.error)
