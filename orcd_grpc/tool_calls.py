"""Tool calls in generated text: the families' markup, parsed whole or as it streams.

Three formats cover the families served:

* ``hermes`` (Qwen2.5, and the worker's own prompt for templates without tool support):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number, text around them.
* ``llama3`` (Llama 3.1-3.3 JSON tool calling): the whole reply is one or more JSON objects
  ``{"name": ..., "parameters": {...}}`` (``;``-separated), possibly after ``<|python_tag|>``.
* ``harmony`` (GPT-OSS): messages ``<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>json]
  <|message|>BODY`` ended by ``<|end|>``, ``<|call|>`` or ``<|return|>``; a body addressed
  ``to=functions.NAME`` is a call, the analysis channel is reasoning, final (and commentary to
  no one) the answer.

The stream parser takes the output as pieces, each plain text or the text of one control token
(only the model can produce those: a client's text is never a control token, and neither is
text the model spells out), and returns text routed to a channel and complete calls. A call is
one of the request's tools with arguments that parse as a JSON object; anything else written as
a call (bad JSON, an unknown name, markup never closed) is returned as answer text, raw.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import string
from typing import Callable, Iterable, Union

ANSWER, REASONING, TOOL_CALL = "answer", "reasoning", "tool_call"
FAMILIES = ("hermes", "llama3", "harmony")

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclasses.dataclass(frozen=True)
class Text:
    channel: str
    text: str


@dataclasses.dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str  # JSON text of an object


Out = Union[Text, Call]


def detect_family(template: str | None) -> str | None:
    """The tool format a chat template speaks, from its text; None when it renders no tools (the
    worker then describes the tools itself, in the hermes format: tool_prompt.py)."""
    t = template or ""
    if "<|channel|>" in t and "<|message|>" in t:
        return "harmony"
    if "tools" not in t:
        return None
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or "<|start_header_id|>" in t:
        return "llama3"
    return None


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def loads_object(text: str):
    """A JSON object from `text` (strict JSON: no NaN/Infinity), or None."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def call_from_json(obj, names: frozenset[str] | None, *, args_keys=("arguments", "parameters"),
                   make_id: Callable[[], str] = new_call_id) -> Call | None:
    """A Call from a parsed {"name": .., "arguments"|"parameters": {..}} object, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    name = obj["name"]
    if names is not None and name not in names:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = loads_object(args)
    if not isinstance(args, dict):
        return None
    return Call(make_id(), name, _compact(args))


def parse_hermes(text: str, names: frozenset[str] | None = None) -> list[Out]:
    """Whole-output parse (the stream parser fed at once)."""
    return parse_all("hermes", [(text, False)], names)


def parse_all(family: str, pieces: Iterable[tuple[str, bool]], names: frozenset[str] | None,
              make_id: Callable[[], str] = new_call_id) -> list[Out]:
    p = StreamParser(family, names, make_id=make_id)
    out: list[Out] = []
    for text, control in pieces:
        out += p.feed(text, control)
    return merge(out + p.finish())


def merge(outs: list[Out]) -> list[Out]:
    """Adjacent texts of one channel joined (for comparisons; streaming never needs it)."""
    res: list[Out] = []
    for o in outs:
        if isinstance(o, Text) and not o.text:
            continue
        if isinstance(o, Text) and res and isinstance(res[-1], Text) and res[-1].channel == o.channel:
            res[-1] = Text(o.channel, res[-1].text + o.text)
        else:
            res.append(o)
    return res


def _held_prefix(buf: str, marker: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:k]):
            return k
    return 0


class StreamParser:
    """Incremental parser for one generation. feed() and finish() return what is settled; text
    that may still turn out to be markup is held (``busy``) until it is decided."""

    def __init__(self, family: str, names: frozenset[str] | None, *,
                 make_id: Callable[[], str] = new_call_id):
        if family not in FAMILIES:
            raise ValueError(f"unknown tool-call family {family!r}")
        # names None: calls are off (no tools, or tool_choice none); markup is then plain text,
        # but harmony's channels are still routed.
        self.names = None if names is None else frozenset(names)
        self._impl = {"hermes": _Hermes, "llama3": _Llama3, "harmony": _Harmony}[family](self, make_id)

    def feed(self, text: str, control: bool = False) -> list[Out]:
        return self._impl.feed(text, control) if text else []

    def finish(self) -> list[Out]:
        return self._impl.finish()

    @property
    def busy(self) -> bool:
        return self._impl.busy

    @property
    def channel(self) -> str:
        """The channel the output is in now (TOOL_CALL inside a call's markup)."""
        return self._impl.channel


class _Hermes:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, parser: StreamParser, make_id):
        self.p, self.make_id = parser, make_id
        self.buf = ""
        self.inside = False

    @property
    def busy(self) -> bool:
        return bool(self.buf) or self.inside

    @property
    def channel(self) -> str:
        return TOOL_CALL if self.inside else ANSWER

    def feed(self, text: str, control: bool) -> list[Out]:
        if control and (text not in (self.OPEN, self.CLOSE) or self.p.names is None):
            return []  # end-of-turn and other control tokens carry no text
        if self.p.names is None:
            return [Text(ANSWER, text)]
        # inside a call only the new text (and a closing tag's start held before it) can hold
        # the closing tag: no rescanning of a long body on every token
        seen = max(0, len(self.buf) - len(self.CLOSE) + 1) if self.inside else 0
        self.buf += text
        out: list[Out] = []
        while True:
            if not self.inside:
                i = self.buf.find(self.OPEN)
                if i < 0:
                    hold = _held_prefix(self.buf, self.OPEN)
                    out.append(Text(ANSWER, self.buf[:len(self.buf) - hold]))
                    self.buf = self.buf[len(self.buf) - hold:]
                    return out
                out.append(Text(ANSWER, self.buf[:i]))
                self.buf = self.buf[i + len(self.OPEN):]
                self.inside = True
            else:
                j = self.buf.find(self.CLOSE, seen)
                seen = 0
                if j < 0:
                    return out
                out.append(self._close(self.buf[:j], closed=True))
                self.buf = self.buf[j + len(self.CLOSE):]
                self.inside = False

    def _close(self, body: str, closed: bool) -> Out:
        call = call_from_json(loads_object(body.strip()), self.p.names, make_id=self.make_id)
        if call is not None:
            return call
        return Text(ANSWER, self.OPEN + body + (self.CLOSE if closed else ""))

    def finish(self) -> list[Out]:
        body, self.buf = self.buf, ""
        if not self.inside:
            return [Text(ANSWER, body)] if body else []
        self.inside = False
        # A call whose closing tag never came (the model ended its turn, or the length limit)
        # still counts when its JSON is complete.
        return [self._close(body, closed=False)]


class _JsonScanner:
    """Finds where a top-level JSON value that opened with '{' ends, as text arrives."""

    def __init__(self):
        self.depth = 0
        self.in_str = False
        self.esc = False

    def end_in(self, text: str) -> int:
        """Index just past the closing brace, or -1 if the object does not end in `text`."""
        for i, ch in enumerate(text):
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
        return -1


_SEPARATORS = " \t\r\n;"


class _Llama3:
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, parser: StreamParser, make_id):
        self.p, self.make_id = parser, make_id
        self.mode = "start"  # start -> calls | text
        self.raw = ""        # unsettled text: since the start, or since the last call
        self.pos = 0         # how far raw has been scanned
        self.start = 0       # where the object being scanned begins in raw
        self.scan: _JsonScanner | None = None
        self.ncalls = 0

    @property
    def busy(self) -> bool:
        return self.mode != "text" and bool(self.raw)

    @property
    def channel(self) -> str:
        return TOOL_CALL if self.mode == "calls" else ANSWER

    def feed(self, text: str, control: bool) -> list[Out]:
        if self.mode == "text" or self.p.names is None:
            return [] if control else [Text(ANSWER, text)]
        if control:
            if text == self.PYTHON_TAG and self.mode == "start" and not self.raw.strip():
                self.mode, self.raw = "calls", ""
            return []
        self.raw += text
        if self.mode == "start":
            head = self.raw.lstrip()
            if not head:
                return []
            if not head.startswith("{"):
                return self._to_text()
            self.mode = "calls"
        return self._scan()

    def _scan(self) -> list[Out]:
        out: list[Out] = []
        while self.pos < len(self.raw):
            if self.scan is None:  # between objects: only separators may come
                m = self.pos
                while m < len(self.raw) and self.raw[m] in _SEPARATORS:
                    m += 1
                if m == len(self.raw):
                    self.pos = m
                    return out
                if self.raw[m] != "{":
                    return out + self._to_text()
                self.start = self.pos = m
                self.scan = _JsonScanner()
            end = self.scan.end_in(self.raw[self.pos:])
            if end < 0:
                self.pos = len(self.raw)
                return out
            stop = self.pos + end
            self.scan = None
            call = call_from_json(loads_object(self.raw[self.start:stop]), self.p.names,
                                  make_id=self.make_id)
            if call is None:
                return out + self._to_text()
            out.append(call)
            self.ncalls += 1
            self.raw, self.pos = self.raw[stop:], 0
        return out

    def _to_text(self) -> list[Out]:
        """Not (or no longer) calls: the unsettled text is answer text. Calls already sent stay
        sent; the separators after them are dropped."""
        self.mode, raw, self.raw, self.scan = "text", self.raw, "", None
        if self.ncalls:
            raw = raw.lstrip(_SEPARATORS)
        return [Text(ANSWER, raw)] if raw else []

    def finish(self) -> list[Out]:
        if self.mode == "text":
            return []
        if self.scan is not None or self.ncalls == 0:
            return self._to_text()
        self.raw = ""  # separators after the last call
        return []


class _Harmony:
    START, CHANNEL, CONSTRAIN, MESSAGE = "<|start|>", "<|channel|>", "<|constrain|>", "<|message|>"
    ENDS = ("<|end|>", "<|call|>", "<|return|>")

    def __init__(self, parser: StreamParser, make_id):
        self.p, self.make_id = parser, make_id
        self.state = "body"      # header | body
        self.header = ""
        self.recipient = ""
        self.msg_channel = ANSWER  # where body text goes; TOOL_CALL: buffered as a call
        self.body = ""

    @property
    def busy(self) -> bool:
        return self.msg_channel == TOOL_CALL and self.state == "body"

    @property
    def channel(self) -> str:
        return self.msg_channel if self.state == "body" else ANSWER

    def feed(self, text: str, control: bool) -> list[Out]:
        if not control:
            if self.state == "header":
                self.header += text
                return []
            if self.msg_channel == TOOL_CALL:
                self.body += text
                return []
            return [Text(self.msg_channel, text)]
        if text in (self.START, self.CHANNEL):
            out = self._end_message() if self.state == "body" else []
            if self.state == "body" or text == self.START:
                self.header = ""
            self.state = "header"
            if text == self.CHANNEL:
                self.header += f" {text} "
            return out
        if text == self.CONSTRAIN:
            if self.state == "header":
                self.header += f" {text} "
            return []
        if text == self.MESSAGE and self.state == "header":
            self._open(self.header)
            return []
        if text in self.ENDS:
            out = self._end_message() if self.state == "body" else []
            self.state, self.msg_channel = "body", ANSWER
            return out
        return []  # other control tokens carry no text

    def _open(self, header: str) -> None:
        # "assistant to=functions.f <|channel|> commentary json" or
        # " <|channel|> commentary to=functions.f  <|constrain|> json": the recipient may sit in
        # the role part or the channel part; the channel is the first word after <|channel|>.
        words = header.replace(self.CONSTRAIN, " ").replace(self.CHANNEL, " ").split()
        self.recipient = next((w[3:] for w in words if w.startswith("to=")), "")
        after = header.split(self.CHANNEL, 1)[1] if self.CHANNEL in header else ""
        ch = next((w for w in after.split() if not w.startswith("to=")), "")
        self.state, self.body = "body", ""
        if self.recipient and self.p.names is not None:
            self.msg_channel = TOOL_CALL
        elif ch == "analysis":
            self.msg_channel = REASONING
        else:  # final, commentary to the user, or a call while calls are off
            self.msg_channel = ANSWER

    def _end_message(self) -> list[Out]:
        if self.msg_channel != TOOL_CALL:
            return []
        body, self.body = self.body, ""
        self.msg_channel = ANSWER
        name = self.recipient[len("functions."):] if self.recipient.startswith("functions.") else None
        args = loads_object(body.strip())
        if name is not None and args is not None and name in self.p.names:
            return [Call(self.make_id(), name, _compact(args))]
        return [Text(ANSWER, body)] if body else []

    def finish(self) -> list[Out]:
        out = self._end_message() if self.state == "body" else []
        self.state = "body"
        return out
