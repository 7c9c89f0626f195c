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


def check_chat_sizes(messages: list[dict], limits: Limits) -> None:
    total = 0
    for i, m in enumerate(messages):
        total += limits.check_text(m["content"], f"input.chat.messages[{i}].content")
    limits.check(total, "input.chat.messages")


def _sentinels(messages: list[dict]) -> tuple[str, list[dict]]:
    while True:
        nonce = secrets.token_hex(8)
        if not any(nonce in m["content"] for m in messages):
            break
    marked = [{**m, "content": f"\ue000{nonce}.{i}\ue001"} if m["content"] else m
              for i, m in enumerate(messages)]
    return nonce, marked


def split_rendered(real: str, skeleton: str, nonce: str,
                   messages: list[dict]) -> list[tuple[str, bool]] | None:
    """`real` cut into (text, is_template) parts using the sentinel rendering `skeleton`; None
    when the template treated a content in a way that cannot be traced (it branched on it, or
    transformed it beyond trimming)."""
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
        content = messages[int(piece)]["content"]
        after = pieces[k + 1]
        for cand in dict.fromkeys((content, content.strip())):  # Jinja's trim is str.strip()
            if real.startswith(cand, pos) and real.startswith(after, pos + len(cand)):
                break
        else:
            return None
        parts.append((cand, False))
        pos += len(cand)
    return parts if pos == len(real) else None


def _control_ids(tokenizer, ids) -> list[int]:
    return [t for t in ids if tokenizer.is_special(t)]


def chat_prompt_ids(tokenizer, messages: list[dict], add_bos, limits: Limits) -> list[int]:
    return chat_prompt(tokenizer, messages, add_bos, limits)[1]


def chat_prompt(tokenizer, messages: list[dict], add_bos, limits: Limits,
                add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """The rendered prompt text and its ids (contents as plain text)."""
    check_chat_sizes(messages, limits)
    render: Any = lambda msgs: tokenizer.render_chat(  # noqa: E731
        msgs, add_generation_prompt=add_generation_prompt, max_chars=limits.render_chars,
        timeout_s=RENDER_TIMEOUT_S)
    real = render(messages)
    limits.check(_utf8_len(real, limits.render_chars * 4), "input.chat")
    nonce, marked = _sentinels(messages)
    parts = split_rendered(real, render(marked), nonce, messages)
    whole = list(tokenizer.encode_special(real, add_bos=False))
    if parts is None:
        # Untraceable: refuse a content that carries control-token text rather than let it
        # through as a control token.
        for i, m in enumerate(messages):
            if _control_ids(tokenizer, tokenizer.encode_special(m["content"], add_bos=False)):
                raise InvalidArgument("contains control-token text, which this model's chat "
                                      "template does not let the worker keep as plain text",
                                      field=f"input.chat.messages[{i}].content")
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
    lib = _libc() if text_chars >= _TRIM_AFTER_CHARS else None
    if lib is not None:
        lib.malloc_trim(0)
