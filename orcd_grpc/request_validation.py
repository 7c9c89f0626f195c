"""Checks requests against the limits the proto documents and turns them into engine inputs.

Checks that need no model run first, so a malformed request gets INVALID_ARGUMENT whatever the
worker's state; then come the checks against the loaded model (vocabulary, chat template,
context length). Each error names the proto field path.
"""
from __future__ import annotations

import errno
import math
import os
import pathlib
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

from . import constraints, logit_controls, prompt_guard, prompt_scoring, speculation, tool_prompt
from .errors import FailedPrecondition, InvalidArgument, NotFound, OrcdError, OutOfRange, PermissionDenied
from .sampling import as_sent
from .request import Stopping

MAX_REQUEST_ID = 128
MAX_MODEL_ID = 128
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_SAMPLES = 16  # ExecuteRequest.n without --max-samples
MAX_PRIORITY = 1000  # |ExecuteRequest.priority| (security.MIN_PRIORITY..MAX_PRIORITY)
# Linux's PATH_MAX and NAME_MAX, in bytes: longer paths fail in the kernel anyway, and refusing
# them up front keeps the OS error (which names the joined server-side path) out of the answer.
MAX_PATH_BYTES = 4096
MAX_PATH_COMPONENT_BYTES = 255
PATH_ECHO_CHARS = 96  # how much of a client's path an error message quotes back
# The smallest LoadModel context_length other than 0. A context holds the prompt and the reply;
# at 64 tokens (4 KV blocks of 16) a short chat turn and a few tokens of answer fit, while below
# it nearly every request ends OUT_OF_RANGE or after a handful of tokens. 0 still selects the
# model's trained length, so a model trained for fewer tokens loads with 0.
MIN_CONTEXT_LENGTH = 64


@dataclass
class PreparedExecute:
    request_id: str
    prompt_ids: list[int]
    sampling: Any
    stopping: Stopping
    tools: Any = None  # tool_prompt.ToolUse: how to parse the output, and the grammar, if any


def _printable_ascii(s: str) -> bool:
    return all(0x20 <= ord(c) <= 0x7E for c in s)


def check_request_id(request_id: str, *, allow_empty: bool = True) -> str:
    if not request_id:
        if allow_empty:
            return str(uuid.uuid4())
        raise InvalidArgument("must not be empty", field="request_id")
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"at most {MAX_REQUEST_ID} characters, got {len(request_id)}", field="request_id")
    if not _printable_ascii(request_id):
        raise InvalidArgument("must be printable ASCII", field="request_id")
    return request_id


def check_model_id(model_id: str) -> None:
    if len(model_id) > MAX_MODEL_ID:
        raise InvalidArgument(f"at most {MAX_MODEL_ID} characters, got {len(model_id)}", field="model_id")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in model_id):
        raise InvalidArgument("must not contain control characters", field="model_id")


def _range(value: float, field: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = float(value)
    ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise InvalidArgument(f"must be in {bracket}{lo:g}, {hi:g}], got {as_sent(value)}", field=field)
    return value


def check_static(req) -> tool_prompt.ToolSpec | None:
    """Model-independent checks of an ExecuteRequest; returns its tools and tool choice."""
    check_model_id(req.model_id)
    check_input(req)
    return _check_options(req)


def check_input(req) -> None:
    """The `input` oneof (text, tokens or chat), of an ExecuteRequest or a ProbeRequest."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgument("one of text, tokens or chat must be set", field="input")
    if which == "text" and not req.text:
        raise InvalidArgument("text is empty", field="input")
    if which == "tokens" and not req.tokens.ids:
        raise InvalidArgument("tokens is empty", field="input")
    if which == "chat":
        if not req.chat.messages:
            raise InvalidArgument("chat has no messages", field="input")
        for i, msg in enumerate(req.chat.messages):
            if not msg.role:
                raise InvalidArgument("role must not be empty", field=f"input.chat.messages[{i}].role")
            prompt_guard.check_role(msg.role, f"input.chat.messages[{i}].role")


def _check_options(req) -> "tool_prompt.ToolSpec | None":
    if req.HasField("sampling"):
        s = req.sampling
        if s.HasField("temperature"):
            _range(s.temperature, "sampling.temperature", 0.0, 100.0)
        if s.HasField("top_p"):
            _range(s.top_p, "sampling.top_p", 0.0, 1.0, lo_open=True)
        _range(s.min_p, "sampling.min_p", 0.0, 1.0)
        if s.HasField("repetition_penalty"):
            _range(s.repetition_penalty, "sampling.repetition_penalty", 0.0, 10.0, lo_open=True)
        _range(s.presence_penalty, "sampling.presence_penalty", -2.0, 2.0)
        _range(s.frequency_penalty, "sampling.frequency_penalty", -2.0, 2.0)

    if req.HasField("priority") and not -MAX_PRIORITY <= req.priority <= MAX_PRIORITY:
        raise InvalidArgument(f"must be in [{-MAX_PRIORITY}, {MAX_PRIORITY}], got {req.priority}", field="priority")
    if req.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}", field="top_logprobs")
    prompt_scoring.check_static(req)

    st = req.stopping
    if len(st.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(st.stop)}", field="stopping.stop")
    for i, s in enumerate(st.stop):
        n = len(s.encode("utf-8"))
        if not 1 <= n <= MAX_STOP_BYTES:
            raise InvalidArgument(f"each stop string must be 1..{MAX_STOP_BYTES} bytes, got {n}",
                                  field=f"stopping.stop[{i}]")
    if len(st.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(st.stop_token_ids)}",
                              field="stopping.stop_token_ids")
    logit_controls.check_static(req.sampling, int(st.min_tokens), int(st.max_tokens))
    constraints.check_static(req)
    spec = tool_prompt.check_tools(req)
    if req.WhichOneof("input") == "chat":
        tool_prompt.message_dicts(req.chat.messages)  # tool calls, ids and names in the history
    return spec


def check_samples(n: int, max_samples: int, max_sequences: int) -> int:
    """ExecuteRequest.n as a count of samples (0 is 1): at most the worker's --max-samples and the
    sequences the model can run at once (a request's samples run together)."""
    n = max(1, int(n))
    if n > max_samples:
        raise InvalidArgument(f"at most {max_samples} samples (the worker's --max-samples), got {n}", field="n")
    if max_sequences and n > max_sequences:
        raise InvalidArgument(f"at most {max_sequences} samples (the sequences the model runs at once), got {n}",
                              field="n")
    return n


def _sampling_params(req, vocab_size: int):
    from .sampling import SamplingParams

    s = req.sampling
    has = req.HasField("sampling")
    if has and s.top_k > vocab_size:
        raise InvalidArgument(f"must be at most the vocabulary size {vocab_size}, got {s.top_k}",
                              field="sampling.top_k")
    params = SamplingParams(
        temperature=float(s.temperature) if has and s.HasField("temperature") else 1.0,
        top_k=int(s.top_k) if has else 0,
        top_p=float(s.top_p) if has and s.HasField("top_p") else 1.0,
        min_p=float(s.min_p) if has else 0.0,
        seed=int(s.seed) if has and s.HasField("seed") else None,
        repetition_penalty=float(s.repetition_penalty) if has and s.HasField("repetition_penalty") else 1.0,
        presence_penalty=float(s.presence_penalty) if has else 0.0,
        frequency_penalty=float(s.frequency_penalty) if has else 0.0,
        top_logprobs=int(req.top_logprobs),
        prompt_logprobs=prompt_scoring.top_n(req),
    )
    params.validate(vocab_size)
    return params


def _check_ids(ids: Iterable[int], vocab_size: int, field: str) -> None:
    for i, t in enumerate(ids):
        if t >= vocab_size:
            raise InvalidArgument(f"id {t} at position {i} is not below the vocabulary size {vocab_size}",
                                  field=field)


def prompt_ids(req, tokenizer, has_chat_template: bool, limits: prompt_guard.Limits | None = None):
    """The request's prompt as token ids. Text is sized against `limits` before it is tokenized,
    and client text (plain `text`, chat contents, tools) never becomes a control token."""
    spec = tool_prompt.check_tools(req) if "tools" in req.DESCRIPTOR.fields_by_name else None
    return _prompt_ids(req, tokenizer, has_chat_template, limits, spec)[0]


def _prompt_ids(req, tokenizer, has_chat_template: bool, limits: prompt_guard.Limits | None = None,
                spec: tool_prompt.ToolSpec | None = None, tool_format: str | None = None):
    """(prompt ids, tool_prompt.ToolUse or None)."""
    which = req.WhichOneof("input")
    add_bos = req.add_bos if req.HasField("add_bos") else None
    limits = limits or prompt_guard.Limits(tokenizer, 0, prompt_guard.DEFAULT_MAX_PROMPT_BYTES)
    if which == "text":
        return prompt_guard.text_prompt_ids(tokenizer, req.text, add_bos, limits), None
    if which == "tokens":
        ids = list(req.tokens.ids)
        _check_ids(ids, tokenizer.vocab_size, "input.tokens")
        return ids, None
    _check_template(tokenizer, has_chat_template)
    messages = tool_prompt.message_dicts(req.chat.messages)
    use = tool_prompt.tool_use(spec, tokenizer.chat_template, messages, tool_format)
    return chat_prompt(tokenizer, messages, add_bos, limits, has_chat_template, use=use)[1], use


def _check_template(tokenizer, has_chat_template: bool) -> None:
    if not has_chat_template:
        raise FailedPrecondition("the model has no chat template", field="input.chat")
    problem = getattr(tokenizer, "template_error", None)
    if problem:
        raise FailedPrecondition(f"the model's chat template does not compile ({problem}); "
                                 "text and token input still work", field="input.chat")


def chat_prompt(tokenizer, messages: list[dict], add_bos, limits: prompt_guard.Limits, has_chat_template: bool,
                add_generation_prompt: bool = True, use=None) -> tuple[str, list[int]]:
    """(rendered text, ids) of chat messages whose roles were checked, with the tools of `use`
    (tool_prompt.ToolUse) if any; errors name input.chat."""
    _check_template(tokenizer, has_chat_template)
    if not hasattr(tokenizer, "encode_parts"):  # a stand-in tokenizer without segment encoding
        prompt_guard.check_chat_sizes(messages, limits)
        text = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return text, list(tokenizer.encode_special(text, add_bos=add_bos))
    try:
        if use is None:
            return prompt_guard.chat_prompt(tokenizer, messages, add_bos, limits, add_generation_prompt)
        return prompt_guard.chat_prompt(tokenizer, use.messages, add_bos, limits, add_generation_prompt,
                                        tools=use.template_tools, fields=use.fields, extra_bytes=use.extra_bytes)
    except OrcdError as exc:
        if exc.field == "chat":  # the template's own errors: name the request field
            raise type(exc)(str(exc).removeprefix("chat: "), field="input.chat") from exc
        raise
    except Exception as exc:  # anything else a template can raise is still the request's answer
        raise InvalidArgument(f"the chat template failed: {type(exc).__name__}: {exc}",
                              field="input.chat") from exc


def prepare_execute(req, info, tokenizer, *,
                    max_prompt_bytes: int = prompt_guard.DEFAULT_MAX_PROMPT_BYTES,
                    tool_format: str | None = None, speculation_default=None) -> PreparedExecute:
    """Validates an ExecuteRequest against the loaded model (`info`: ModelInfo) and tokenizes it;
    `max_prompt_bytes` (0: none) caps prompt text before it is tokenized; `tool_format` overrides
    the tool-call format detected from the chat template."""
    request_id = check_request_id(req.request_id)
    spec = check_static(req)
    if req.model_id and req.model_id != info.model_id:
        raise NotFound(f"no model {req.model_id!r} is loaded (serving {info.model_id!r})", field="model_id")
    vocab = int(tokenizer.vocab_size or info.vocab_size)
    _check_ids(req.stopping.stop_token_ids, vocab, "stopping.stop_token_ids")
    sampling = _sampling_params(req, vocab)
    sampling.speculation = speculation.from_proto(req.speculation, req.HasField("speculation"), speculation_default)
    if getattr(sampling.speculation, "mode", None) == speculation.DRAFT and not getattr(info, "draft_model", ""):
        raise InvalidArgument(f"draft needs a draft model loaded with the model; {info.model_id!r} has none",
                              field="speculation.mode")
    st = req.stopping
    # what min_tokens holds back: every token that would end the output
    stop_ids = frozenset(int(t) for t in st.stop_token_ids) | (
        frozenset() if st.ignore_eos else frozenset(int(t) for t in getattr(tokenizer, "eos_ids", ()) or ()))
    sampling.controls = logit_controls.check_vocab(req.sampling, vocab, int(st.min_tokens), stop_ids)
    limits = prompt_guard.Limits(tokenizer, info.context_length, max_prompt_bytes)
    ids, use = _prompt_ids(req, tokenizer, info.has_chat_template, limits, spec, tool_format)
    if not ids:
        raise InvalidArgument("the input tokenizes to no tokens", field="input")
    if len(ids) >= info.context_length:
        raise OutOfRange(f"prompt is {len(ids)} tokens, context length is {info.context_length}", field="input")
    # last: the costliest check, once everything cheaper has passed
    sampling.constraint = constraints.from_request(req, tokenizer, int(info.vocab_size))
    if use is not None and use.grammar is not None:  # tool_choice required / a named function
        if sampling.constraint is not None:
            sampling.constraint.close()
            raise InvalidArgument("cannot be combined with tool_choice required or function", field="constraint")
        sampling.constraint = constraints.compile_lark(use.grammar, tokenizer, int(info.vocab_size))
    stopping = Stopping(max_tokens=int(st.max_tokens), stop=list(st.stop),
                        stop_token_ids=frozenset(int(t) for t in st.stop_token_ids),
                        ignore_eos=bool(st.ignore_eos), min_tokens=int(st.min_tokens),
                        score_only=sampling.prompt_logprobs is not None and not st.max_tokens)
    return PreparedExecute(request_id, ids, sampling, stopping, use)


# ---------------------------------------------------------------------------------------------
# LoadModel


def quote_path(path: str) -> str:
    """The client's own path for a message, cut to PATH_ECHO_CHARS characters."""
    if len(path) <= PATH_ECHO_CHARS:
        return repr(path)
    return f"{path[:PATH_ECHO_CHARS]!r}... ({len(path)} characters)"


def check_model_path(path: str) -> None:
    """The checks of a LoadModel path that need no file system."""
    if not path:
        raise InvalidArgument("must not be empty", field="path")
    if "\x00" in path:
        raise InvalidArgument("must not contain NUL", field="path")
    n = len(path.encode("utf-8", "surrogateescape"))
    if n > MAX_PATH_BYTES:
        raise InvalidArgument(f"at most {MAX_PATH_BYTES} bytes, got {n}", field="path")
    longest = max(len(part.encode("utf-8", "surrogateescape")) for part in path.split("/"))
    if longest > MAX_PATH_COMPONENT_BYTES:
        raise InvalidArgument(f"each component at most {MAX_PATH_COMPONENT_BYTES} bytes, got one of {longest}",
                              field="path")


def resolve_draft_path(path: str, model_dirs: list[str]) -> pathlib.Path:
    """LoadModelRequest.draft_path, resolved and checked as `path` is; errors name draft_path."""
    try:
        return resolve_model_path(path, model_dirs)
    except OrcdError as err:
        msg = str(err)
        if err.field and msg.startswith(f"{err.field}: "):
            msg = msg[len(err.field) + 2:]
        raise type(err)(msg, field="draft_path") from None


def resolve_model_path(path: str, model_dirs: list[str]) -> pathlib.Path:
    """Resolves a LoadModel path; it must name a regular file inside one of `model_dirs`.

    Symlinks are resolved before the containment check, so a link inside a model directory that
    points outside it is refused just like a `..` path. Messages quote only the client's own
    string (cut short), never the resolved path: the model directory is the server's business.
    """
    check_model_path(path)
    if not model_dirs:
        raise PermissionDenied("the worker has no model directories configured", field="path")
    quoted = quote_path(path)
    try:
        roots = [pathlib.Path(os.path.realpath(d)) for d in model_dirs]
        raw = pathlib.Path(path)
        candidate = raw if raw.is_absolute() else roots[0] / raw
        real = pathlib.Path(os.path.realpath(candidate))
        if not any(real == r or r in real.parents for r in roots):
            raise PermissionDenied(f"{quoted} is outside the model directories", field="path")
        if not real.exists():
            raise NotFound(f"{quoted} does not exist", field="path")
        if not real.is_file():
            raise InvalidArgument(f"{quoted} is not a regular file", field="path")
    except OSError as exc:
        # str(exc) carries the joined absolute path; strerror alone does not.
        reason = exc.strerror or type(exc).__name__
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(f"{quoted} cannot be read: {reason}", field="path") from None
        raise InvalidArgument(f"{quoted} cannot be opened: {reason}", field="path") from None
    return real


def kv_cache_type(value: int, names: dict[int, str], default: str = "") -> str:
    """LoadModelRequest.kv_cache_type as the loader's name (names: enum value -> name; 0: default,
    "" for the backend's own)."""
    if value == 0:
        return default
    if value not in names:
        known = ", ".join(f"{v} {n.upper()}" for v, n in sorted(names.items()))
        raise InvalidArgument(f"unknown KV cache type {value} ({known})", field="kv_cache_type")
    return names[value]


def check_context_length(ctx: int, max_context: int = 0) -> None:
    """LoadModel's context_length: 0 (the trained length) or MIN_CONTEXT_LENGTH..--max-context."""
    if 0 < ctx < MIN_CONTEXT_LENGTH:
        raise OutOfRange(f"must be 0 (the model's trained length) or at least {MIN_CONTEXT_LENGTH}, got {ctx}",
                         field="context_length")
    if max_context and ctx > max_context:
        raise OutOfRange(f"{ctx} exceeds the worker's --max-context {max_context}", field="context_length")


def check_unload_model_id(model_id: str) -> None:
    """UnloadModel must name the model: an empty id once unloaded whatever was being served."""
    if not model_id:
        raise InvalidArgument("must name the model to unload (ListModels lists it)", field="model_id")
    check_model_id(model_id)


def default_model_id(path: pathlib.Path) -> str:
    name = path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name

