"""The scheduler's token events run through a tool_calls.StreamParser on their way to the client.

Each token keeps its event (one Token per generated token, as the proto promises); what
changes is its text (markup and call bodies carry none, text held as possible markup is carried
into a later token) and its channel. A ToolCall event follows the token that completes the
call. While the parser holds text, the latest token event is held back too, so that text the
end of generation settles (a call never closed, JSON that turned out not to be a call) has a
token to travel on before Finished.
"""
from __future__ import annotations

import dataclasses

from . import tool_calls
from .request import STOP_TOKEN, TokenEvent

TOOL_CALLS = "tool_calls"
TOOL_CALL_CH = tool_calls.TOOL_CALL  # the finish reason after calls (FINISH_REASON_TOOL_CALLS)


@dataclasses.dataclass
class Routed:
    """A token event as the client sees it."""
    event: TokenEvent
    channel: str


class ToolStream:
    def __init__(self, family: str, names: frozenset[str] | None, tokenizer):
        self.parser = tool_calls.StreamParser(family, names)
        self.tokenizer = tokenizer
        self.held: list = []  # a token event and the calls it completed, held back
        self.calls = 0

    def _control_text(self, token_id: int) -> str | None:
        tok = self.tokenizer
        if not tok.is_special(token_id):
            return None
        return tok.token_bytes(token_id).decode("utf-8", "replace")

    def on_token(self, ev: TokenEvent) -> list:
        """Routed token events and tool_calls.Call, in stream order."""
        outs = self.parser.feed(ev.text)
        control = self._control_text(ev.token_id)
        if control:
            outs += self.parser.feed(control, control=True)
        texts = [o for o in outs if isinstance(o, tool_calls.Text) and o.text]
        calls = [o for o in outs if isinstance(o, tool_calls.Call)]
        # One token's text is one channel's; text only mixes channels when the decoder held
        # text across a channel change, and then the later channel takes it all.
        channel = texts[-1].channel if texts else TOOL_CALL_CH if calls else self.parser.channel
        routed = Routed(dataclasses.replace(ev, text="".join(t.text for t in texts)), channel)
        self.calls += len(calls)
        out, self.held = self.held, []
        if self.parser.busy:
            self.held = [routed, *calls]
            return out
        return out + [routed, *calls]

    def on_finish(self) -> list:
        """What the end of generation settles, before Finished."""
        outs = self.parser.finish()
        text = "".join(o.text for o in outs if isinstance(o, tool_calls.Text))
        calls = [o for o in outs if isinstance(o, tool_calls.Call)]
        self.calls += len(calls)
        out, self.held = self.held, []
        if text and out:
            first = out[0]
            out[0] = Routed(dataclasses.replace(first.event, text=first.event.text + text), tool_calls.ANSWER)
        return out + calls

    def finish_reason(self, reason: str) -> str:
        return TOOL_CALLS if self.calls and reason == STOP_TOKEN else reason
