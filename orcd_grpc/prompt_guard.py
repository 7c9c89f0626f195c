"""Prompt inputs bounded before any work is spent on them, and chat prompts whose client text
can never become a control token.

* Size. A text is refused before it is tokenized when it is over the worker's
  ``--max-prompt-bytes`` or provably cannot fit the context: no token of the vocabulary stands
  for more than ``Tokenizer.max_token_bytes`` bytes of input, so n bytes need at least
  ceil(n / max_token_bytes) tokens. Tokenizing costs heap and time in proportion to the input,
  so an unchecked message near gRPC's cap would cost gigabytes and most of a minute.
* Control tokens. The template's own markup is tokenized with control-token parsing; message
  content only as plain text. The template is rendered a second time with each content replaced
  by a random sentinel, which shows where the contents sit in the real rendering. When the whole
  text, tokenized as before, yields exactly the control tokens the template's own segments
  yield, those ids are used unchanged (benign prompts are token-identical to plain
  ``encode_special``); otherwise client text forged one, and the prompt is tokenized segment by
  segment, contents as plain text.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import re
import secrets
from typing import Any

from .errors import InvalidArgument, OutOfRange

DEFAULT_MAX_PROMPT_BYTES = 2 * 1024 * 1024
# Roles the chat templates of the supported families branch on (ipython: Llama 3.1's tool
# results). Anything else reaches the template as text it never expected.
ROLES = ("system", "user", "assistant", "tool", "developer", "ipython")
RENDER_TIMEOUT_S = 2.0
# Template markup around the contents (system prompts, tool boilerplate) on top of their bytes.
_RENDER_SLACK = 64 * 1024


def check_role(role: str, field: str) -> None:
    if role not in ROLES:
        raise InvalidArgument(f"{role[:32]!r} is not a known role (one of {', '.join(ROLES)})",
                              field=field)


def _utf8_len(text: str, cap: int) -> int:
    # characters <= bytes: a text over the cap in characters is refused without encoding it
    return len(text) if len(text) > cap else len(text.encode("utf-8", "surrogatepass"))


class Limits:
    """The byte bounds for one model and worker."""

    def __init__(self, tokenizer, context_length: int, max_prompt_bytes: int):
        self.context_length = int(context_length)
        self.max_prompt_bytes = int(max_prompt_bytes) if max_prompt_bytes and max_prompt_bytes > 0 else 0
        self.max_token_bytes = getattr(tokenizer, "max_token_bytes", None)
        # Most bytes that could still be fewer than context_length tokens.
        self.fit_bytes = ((self.context_length - 1) * self.max_token_bytes
                          if self.max_token_bytes and self.context_length > 0 else None)

    def check(self, n_bytes: int, field: str) -> None:
        if self.max_prompt_bytes and n_bytes > self.max_prompt_bytes:
            raise OutOfRange(f"{n_bytes} bytes exceeds the worker's limit of {self.max_prompt_bytes} "
                             f"(--max-prompt-bytes)", field=field)
        if self.fit_bytes is not None and n_bytes > self.fit_bytes:
            need = -(-n_bytes // self.max_token_bytes)
            raise OutOfRange(f"{n_bytes} bytes is at least {need} tokens (no token of this model "
                             f"covers more than {self.max_token_bytes} bytes); context length is "
                             f"{self.context_length}", field=field)

    def check_text(self, text: str, field: str) -> int:
        n = _utf8_len(text, max(self.max_prompt_bytes, self.fit_bytes or 0) or len(text))
        self.check(n, field)
        return n

    @property
    def render_chars(self) -> int:
        caps = [c for c in (self.fit_bytes, self.max_prompt_bytes and self.max_prompt_bytes + _RENDER_SLACK)
                if c]
        return min(caps) if caps else 64 * 1024 * 1024


def text_prompt_ids(tokenizer, text: str, add_bos, limits: Limits) -> list[int]:
    limits.check_text(text, "input.text")
    # Plain text: control-token text in it stays text (the proto's contract for `text`).
    return list(tokenizer.encode(text, add_bos=add_bos))


def check_chat_sizes(messages: list[dict], limits: Limits, extra_bytes: int = 0) -> None:
    """Each content and all client text together (contents plus `extra_bytes` of tool
    definitions, calls and ids) against the limits."""
    total = extra_bytes
    for i, m in enumerate(messages):
        total += limits.check_text(m["content"], f"input.chat.messages[{i}].content")
    limits.check(total, "input.chat.messages")


def _nonce(messages: list[dict], tools: Any) -> str:
    blob = repr(tools) + "".join(repr(m) for m in messages)
    while True:
        nonce = secrets.token_hex(8)
        if nonce not in blob:
            return nonce


def _sentinel(nonce: str, k: int) -> str:
    return f"\ue000{nonce}.{k}\ue001"


@functools.lru_cache(maxsize=8)
def _control_edges(texts: frozenset) -> tuple[str, frozenset, frozenset, int]:
    """(first characters, proper prefixes, proper suffixes, longest length) of control texts."""
    return ("".join(sorted({t[0] for t in texts})),
            frozenset(t[:k] for t in texts for k in range(1, len(t))),
            frozenset(t[k:] for t in texts for k in range(1, len(t))),
            max(map(len, texts), default=0))


def _could_spell_control(tokenizer, s: str) -> bool:
    """Whether `s` holds a control token's text, or could complete one with the text around it
    (it starts with the end of one, or ends with the start of one)."""
    texts = getattr(tokenizer, "control_texts", None)
    if texts is None:  # a stand-in tokenizer: ask it
        return bool(_control_ids(tokenizer, tokenizer.encode_special(s, add_bos=False)))
    if not texts or not s:
        return False
    firsts, prefixes, suffixes, longest = _control_edges(texts)
    n = min(longest - 1, len(s))
    if any(s[:k] in suffixes or s[-k:] in prefixes for k in range(1, n + 1)):
        return True
    if not any(c in s for c in firsts):  # the common case, in C: no control text can start here
        return False
    return any(t in s for t in texts)


def _mark(value: Any, field: str, danger, texts: list[str], fields: list[str], nonce: str) -> Any:
    """`value` with every string (dict keys too) that could spell a control token replaced by a
    sentinel; the originals go to `texts`, their fields to `fields`."""
    if isinstance(value, str):
        if danger(value):
            texts.append(value)
            fields.append(field)
            return _sentinel(nonce, len(texts) - 1)
        return value
    if isinstance(value, dict):
        return {_mark(k, field, danger, texts, fields, nonce): _mark(v, field, danger, texts, fields, nonce)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, field, danger, texts, fields, nonce) for v in value]
    return value


def _skeleton(tokenizer, messages: list[dict], tools: list | None, content_fields: list[str]):
    """(nonce, marked messages, marked tools, texts, fields): contents always replaced by
    sentinels (sentinel i is message i's content), other client strings only where they could
    spell a control token."""
    nonce = _nonce(messages, tools)
    texts = [m["content"] for m in messages]
    fields = list(content_fields)
    danger = functools.partial(_could_spell_control, tokenizer)
    mark = lambda v, f: _mark(v, f, danger, texts, fields, nonce)  # noqa: E731
    marked = []
    for i, m in enumerate(messages):
        mm = {**m, "content": _sentinel(nonce, i) if m["content"] else m["content"]}
        field = f"input.chat.messages[{i}]"
        for key in ("tool_call_id", "name"):
            if key in m:
                mm[key] = mark(m[key], f"{field}.{key}")
        if "tool_calls" in m:
            mm["tool_calls"] = [
                {**c, "id": mark(c["id"], f"{field}.tool_calls[{j}].id"),
                 "function": {k: mark(v, f"{field}.tool_calls[{j}].{k}") for k, v in c["function"].items()}}
                for j, c in enumerate(m["tool_calls"])]
        marked.append(mm)
    marked_tools = None
    if tools:
        marked_tools = [{**t, "function": {k: mark(v, f"tools[{j}].{k}") for k, v in t["function"].items()}}
                        for j, t in enumerate(tools)]
    return nonce, marked, marked_tools, texts, fields


def _forms(text: str):
    """How a template may have written a client string: as is, trimmed, or JSON-escaped (tojson)."""
    return dict.fromkeys((text, text.strip(), json.dumps(text, ensure_ascii=False)[1:-1],
                          json.dumps(text)[1:-1]))


def split_rendered(real: str, skeleton: str, nonce: str,
                   texts: list) -> list[tuple[str, bool]] | None:
    """`real` cut into (text, is_template) parts using the sentinel rendering `skeleton` (sentinel
    k stands for texts[k]; message dicts are taken as their content); None when the template
    treated a client string in a way that cannot be traced (it branched on it, or transformed it
    beyond trimming and JSON escaping)."""
    texts = [t["content"] if isinstance(t, dict) else t for t in texts]
    pieces = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", skeleton)
    parts: list[tuple[str, bool]] = []
    pos = 0
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if not real.startswith(piece, pos):
                return None
            parts.append((piece, True))
            pos += len(piece)
            continue
        after = pieces[k + 1]
        for cand in _forms(texts[int(piece)]):
            if real.startswith(cand, pos) and real.startswith(after, pos + len(cand)):
                break
        else:
            return None
        parts.append((cand, False))
        pos += len(cand)
    return parts if pos == len(real) else None


def _control_ids(tokenizer, ids) -> list[int]:
    return [t for t in ids if tokenizer.is_special(t)]


def chat_prompt_ids(tokenizer, messages: list[dict], add_bos, limits: Limits, **kw) -> list[int]:
    return chat_prompt(tokenizer, messages, add_bos, limits, **kw)[1]


def chat_prompt(tokenizer, messages: list[dict], add_bos, limits: Limits, add_generation_prompt: bool = True, *,
                tools: list | None = None, fields: list[str] | None = None,
                extra_bytes: int = 0) -> tuple[str, list[int]]:
    """The rendered prompt text and its ids (contents as plain text) of `messages` (and `tools`,
    passed to the template as transformers does); `fields` names the request field each
    message's content came from (default input.chat.messages[i].content), `extra_bytes` the
    client text beyond contents."""
    check_chat_sizes(messages, limits, extra_bytes)
    fields = fields or [f"input.chat.messages[{i}].content" for i in range(len(messages))]
    extra = {"tools": tools} if tools else {}
    render: Any = lambda msgs, **kw: tokenizer.render_chat(  # noqa: E731
        msgs, add_generation_prompt=add_generation_prompt, max_chars=limits.render_chars,
        timeout_s=RENDER_TIMEOUT_S, **kw)
    real = render(messages, **extra)
    limits.check(_utf8_len(real, limits.render_chars * 4), "input.chat")
    nonce, marked, marked_tools, texts, text_fields = _skeleton(tokenizer, messages, tools, fields)
    parts = split_rendered(real, render(marked, **({"tools": marked_tools} if tools else {})), nonce, texts)
    whole = list(tokenizer.encode_special(real, add_bos=False))
    if parts is None:
        # Untraceable: refuse client text that carries control-token text rather than let it
        # through as a control token.
        for text, field in zip(texts, text_fields):
            if _control_ids(tokenizer, tokenizer.encode_special(text, add_bos=False)):
                raise InvalidArgument("contains control-token text, which this model's chat "
                                      "template does not let the worker keep as plain text",
                                      field=field)
        if len(texts) > len(messages):  # strings that could complete one with the template's text
            raise InvalidArgument("contains part of a control token's text, which this model's chat "
                                  "template does not let the worker keep as plain text",
                                  field=text_fields[len(messages)])
        return real, tokenizer.bos_unless_present(whole, add_bos)
    template_controls = [t for text, is_tpl in parts if is_tpl and text
                         for t in _control_ids(tokenizer, tokenizer.encode_special(text, add_bos=False))]
    if _control_ids(tokenizer, whole) == template_controls:
        return real, tokenizer.bos_unless_present(whole, add_bos)
    return real, list(tokenizer.encode_parts(parts, add_bos=add_bos))


# Tokenizing a large text takes transient heap many times its size (bench/tokenize_cost.py);
# glibc keeps the freed pages unless asked, so a worker would hold its largest prompt's peak.
_TRIM_AFTER_CHARS = 256 * 1024


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_heap(text_chars: int) -> None:
    """Returns freed heap to the system after a text of `text_chars` was tokenized, if large."""
    if text_chars >= _TRIM_AFTER_CHARS:
        trim_heap()


def trim_heap() -> None:
    """Returns the heap's free pages to the system (glibc's malloc_trim; nothing elsewhere)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
