"""Rendering a model's HF-style Jinja2 chat template into a prompt string.

The environment mirrors the one transformers uses (sandboxed, trim_blocks + lstrip_blocks,
loop controls, a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`) so that
templates written for it render identically here.
"""
from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FailedPrecondition, InvalidArgument


class TemplateRaised(jinja2.TemplateError):
    """raise_exception() called by the template itself (e.g. roles out of order)."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes <, >, & and ' for HTML, which would change prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InvalidArgument("messages must be a list", field="chat.messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InvalidArgument("each message must be a mapping", field=f"chat.messages[{i}]")
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            raise InvalidArgument("role must be a non-empty string",
                                  field=f"chat.messages[{i}].role")
        out.append(dict(msg))
    return out


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                **extra: Any) -> str:
    """The prompt text for `messages`; control tokens appear as text (encode with
    Tokenizer.encode_special). Template problems raise InvalidArgument(field="chat")."""
    if not template:
        raise FailedPrecondition("the model has no chat template (tokenizer.chat_template)",
                                 field="chat")
    msgs = _check_messages(messages)
    try:
        return _compile(template).render(
            messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, **extra)
    except TemplateRaised as exc:
        raise InvalidArgument(f"chat template rejected the messages: {exc}", field="chat") from exc
    except jinja2.TemplateError as exc:
        raise InvalidArgument(f"chat template failed: {type(exc).__name__}: {exc}",
                              field="chat") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # Templates index into messages freely; a malformed message surfaces here.
        raise InvalidArgument(f"chat template failed on these messages: {exc}",
                              field="chat") from exc
