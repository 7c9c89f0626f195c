"""Rendering a model's HF-style Jinja2 chat template into a prompt string, under limits.

The environment mirrors the one transformers uses (sandboxed, trim_blocks + lstrip_blocks,
loop controls, a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`) so that
templates written for it render identically here.

The template comes from the model file, so it is not trusted any more than a request is: a
render runs on its own daemon thread with a deadline and an output cap, and the operators and
calls that can build a huge string in one C-level step (``*``, ``%``, ``+``, ``center``,
``replace``, ``ljust`` ...) are checked before they run. A render past its deadline gets an
exception raised inside its thread, which stops a Python-level loop at its next bytecode; the
caller has its answer by then either way.
"""
from __future__ import annotations

import ctypes
import datetime
import functools
import json
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import FailedPrecondition, InvalidArgument

# Defaults for callers that give no limits (tests, tools); the servicer passes the request's.
DEFAULT_MAX_CHARS = 4 * 1024 * 1024
DEFAULT_TIMEOUT_S = 2.0
# Integers beyond this passed to template calls are sizes/widths/counts in practice
# ("x".ljust(10**9)); no real chat template needs one.
_MAX_INT_ARG = 1 << 20


class TemplateRaised(jinja2.TemplateError):
    """raise_exception() called by the template itself (e.g. roles out of order)."""


class TemplateLimit(jinja2.TemplateError):
    """The render went past its output cap or built an oversized value."""


class TemplateTimeout(BaseException):
    """Raised asynchronously inside a render thread past its deadline. A BaseException, so the
    template's own error handling (and Jinja's) cannot swallow it."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes <, >, & and ' for HTML, which would change prompts.
    if isinstance(indent, int) and indent > 64:
        raise TemplateLimit(f"tojson indent {indent} is too large")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


_state = threading.local()  # the output cap of the render running on this thread


def _cap() -> int:
    return getattr(_state, "max_chars", DEFAULT_MAX_CHARS)


def _sized(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > _cap():
        raise TemplateLimit(f"a value of {len(value)} items exceeds the template's limit {_cap()}")
    return value


def _check_args(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > _MAX_INT_ARG:
            raise TemplateLimit(f"argument {v} is too large for a chat template")


def _guard_filter(fn):
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        _check_args(args, kwargs)
        if fn is _replace_filter_target and len(args) >= 4:  # (eval_ctx, s, old, new[, count])
            _check_replace(*args[1:4])
        return _sized(fn(*args, **kwargs))
    return guarded


def _check_replace(s, old, new) -> None:
    # str.replace builds its whole result in C before anything could look at it.
    s, old, new = str(s), str(old), str(new)
    grow = len(new) - len(old)
    if grow > 0 and (s.count(old) if old else len(s) + 1) * grow + len(s) > _cap():
        raise TemplateLimit("replace() would exceed the template's output limit")


_replace_filter_target = jinja2.filters.FILTERS["replace"]


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    # Intercepted operators also stop Jinja from folding `'a' * 10**9` at compile time.
    intercepted_binops = frozenset({"*", "**", "%", "+", "//"})

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            if isinstance(right, int) and abs(right) > 64 or isinstance(left, (str, list, tuple)):
                raise TemplateLimit(f"{left!r:.20} ** {right!r:.20} is too large")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n * len(seq) > _cap():
                    raise TemplateLimit("a repeated value would exceed the template's output limit")
        elif operator == "%" and isinstance(left, str):
            # printf-style widths ('%999999999s') allocate before returning
            if any(ch.isdigit() for ch in left):
                for width in re.findall(r"%[-#0 +]*(\d+)", left):
                    if int(width) > _MAX_INT_ARG:
                        raise TemplateLimit(f"format width {width} is too large")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                    and len(left) + len(right) > _cap():
                raise TemplateLimit("a concatenation would exceed the template's output limit")
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        _check_args(args, kwargs)
        name = getattr(__obj, "__name__", "")
        if name == "replace" and isinstance(getattr(__obj, "__self__", None), str) and len(args) >= 2:
            _check_replace(__obj.__self__, args[0], args[1])
        return _sized(super().call(__context, __obj, *args, **kwargs))


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[jinja2.ext.loopcontrols])
    env.filters = {k: _guard_filter(v) for k, v in env.filters.items()}
    env.filters["tojson"] = _guard_filter(_tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def check_template(template: str | None) -> str | None:
    """Compiles a model's template when the model loads; the problem as text, or None when it
    compiles (or there is none). Rendering problems can still only show per request."""
    if not template:
        return None
    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    except (jinja2.TemplateError, RecursionError, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


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


def _interrupt(thread: threading.Thread) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                               ctypes.py_object(TemplateTimeout))


def _render_bounded(tpl: jinja2.Template, context: dict, max_chars: int, timeout_s: float) -> str:
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        _state.max_chars = max_chars
        try:
            parts, n = [], 0
            for chunk in tpl.generate(**context):
                n += len(chunk)
                if n > max_chars:
                    raise TemplateLimit(f"output passed the limit of {max_chars} characters")
                parts.append(chunk)
            box["text"] = "".join(parts)
        except BaseException as exc:  # handed to the caller, TemplateTimeout included
            box["error"] = exc
        finally:
            done.set()

    # A daemon thread: a render that ignores its interruption (stuck in C) cannot hold up the
    # process's exit, and the request thread answers at the deadline regardless.
    thread = threading.Thread(target=work, name="orcd-render", daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        _interrupt(thread)
        raise InvalidArgument(f"chat template did not finish within {timeout_s:g} s", field="chat")
    if "error" in box:
        raise box["error"]
    return box["text"]


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                max_chars: int = DEFAULT_MAX_CHARS, timeout_s: float = DEFAULT_TIMEOUT_S,
                **extra: Any) -> str:
    """The prompt text for `messages`; control tokens appear as text (encode with
    Tokenizer.encode_special). Template problems raise InvalidArgument(field="chat"); a template
    that does not compile, FailedPrecondition."""
    if not template:
        raise FailedPrecondition("the model has no chat template (tokenizer.chat_template)",
                                 field="chat")
    msgs = _check_messages(messages)
    problem = check_template(template)
    if problem is not None:
        raise FailedPrecondition(f"the model's chat template does not compile: {problem}",
                                 field="chat")
    try:
        return _render_bounded(_compile(template), dict(
            messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, **extra), max_chars, timeout_s)
    except TemplateRaised as exc:
        raise InvalidArgument(f"chat template rejected the messages: {exc}", field="chat") from exc
    except TemplateLimit as exc:
        raise InvalidArgument(f"chat template exceeded a limit: {exc}", field="chat") from exc
    except (SecurityError, OverflowError) as exc:  # e.g. the sandbox's range() cap
        raise InvalidArgument(f"chat template refused: {exc}", field="chat") from exc
    except jinja2.TemplateError as exc:
        raise InvalidArgument(f"chat template failed: {type(exc).__name__}: {exc}",
                              field="chat") from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError,
            MemoryError) as exc:
        # Templates index into messages freely; a malformed message surfaces here.
        raise InvalidArgument(f"chat template failed on these messages: {type(exc).__name__}: {exc}",
                              field="chat") from exc
    except TemplateTimeout as exc:  # delivered just as the render ended
        raise InvalidArgument("chat template did not finish in time", field="chat") from exc
