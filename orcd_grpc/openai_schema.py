"""The OpenAI-compatible request bodies, their translation into an ExecuteRequest, and the reply
shapes (issue #21).

The HTTP front door validates nothing of its own beyond JSON types: a body becomes the same
ExecuteRequest a gRPC client would send, and request_validation judges it, so a bad value gets
the same error on either transport. Only the name of the field changes: `param_of` maps the proto
path an OrcdError names (`sampling.temperature`) back to the body's (`temperature`).
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidArgument, OrcdError
from .prompt_scoring import MAX_PROMPT_LOGPROBS
from .proto import pb

UINT32_MAX = 2**32 - 1
# Prompts one completions request may batch: each is a request of its own in the scheduler's queue
# (a batch that does not fit the queue's room is refused whole, 429).
MAX_PROMPTS = 128
# OpenAI documents seed as a (signed) integer; proto's is uint64. Negative seeds wrap modulo 2**64,
# which keeps every int64 seed distinct and reproducible.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class NotSupportedYet(InvalidArgument):
    """A field OpenAI defines that this worker accepts in the body but cannot serve yet."""


# ---- request bodies ----------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown fields are refused by name (as OpenAI does) instead of being silently ignored: a
    # misspelt "max_token" must not quietly mean "no limit".
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted; the caller is accounted by its token, not by this
    n: int | None = None
    # orcd extensions (also vLLM's names), sent with the OpenAI SDK as extra_body
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str = ""  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # refusal, audio...: what a client echoes back unread
    role: str
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: Union[dict[str, Any], bool, None] = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always follows the schema: strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments follow the schema when the call is forced; else as written


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None  # accepted; a reply may hold several calls either way


# ---- fields accepted but not served yet -----------------------------------------------------------
#
# One table, so that each feature is switched on in one place once its branch is merged: a row is
# (param, applies to "completions"/"chat"/"both", test of the body that means "asked for it").
# Delete the row to let the field through to the conversion below.
NOT_SUPPORTED_YET: list[tuple[str, str, Any]] = [
    ("best_of", "completions", lambda b: b.best_of is not None and b.best_of != 1),
    ("suffix", "completions", lambda b: bool(b.suffix)),
]


def check_supported(body, kind: str) -> None:
    for param, applies, asked in NOT_SUPPORTED_YET:
        if applies in (kind, "both") and asked(body):
            raise NotSupportedYet("is not supported yet by this worker", field=param)


# ---- body -> ExecuteRequest ----------------------------------------------------------------------


def _uint(value: int, param: str, hi: int = UINT32_MAX) -> int:
    if not 0 <= value <= hi:
        raise InvalidArgument(f"must be in [0, {hi}], got {value}", field=param)
    return value


def prompts(body: CompletionRequest) -> list:
    """The body's prompts: one string or token-id list each (a batch is a list of them)."""
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) > MAX_PROMPTS:
            raise InvalidArgument(f"at most {MAX_PROMPTS} prompts a request, got {len(p)}", field="prompt")
        return p
    return [p]


def _set_prompt(req, p, field: str = "prompt") -> None:
    req.ClearField("input")
    if isinstance(p, str):
        req.text = p
    else:
        req.tokens.ids.extend(_uint(int(t), f"{field}[{i}]") for i, t in enumerate(p))


def batch(base, body: CompletionRequest) -> list:
    """`base` (to_execute's, which holds the first prompt) and a copy of it for each further prompt
    of a batch: choice i * n + k of the reply is prompt i's sample k."""
    out = [base]
    for j, p in enumerate(prompts(body)[1:], 1):
        req = pb.ExecuteRequest()
        req.CopyFrom(base)
        _set_prompt(req, p, f"prompt[{j}]")
        out.append(req)
    return out


def chat_messages(body, req) -> None:
    """body.messages (ChatMessage) into req.chat (an ExecuteRequest's)."""
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise NotSupportedYet(f"content parts of type {part.type!r} are not supported "
                                          "(text only)", field=f"messages[{i}].content[{j}]")
                texts.append(part.text)
            content = "".join(texts)
        msg = pb.ChatMessage(role=m.role, content=content or "", tool_call_id=m.tool_call_id or "", name=m.name or "")
        for call in m.tool_calls or ():
            msg.tool_calls.append(pb.ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments))
        req.chat.messages.append(msg)


def _response_format(body: ChatRequest, req) -> None:
    """response_format as ExecuteRequest.constraint: the output is then one JSON value (any object,
    or one the schema accepts), generated under the constraint, never checked after the fact."""
    rf = body.response_format
    if rf is None or rf.type == "text":
        if rf is not None and rf.json_schema is not None:
            raise InvalidArgument("only with type json_schema", field="response_format.json_schema")
        return
    if rf.type == "json_object":
        req.constraint.json_object = True
        return
    if rf.json_schema is None:
        raise InvalidArgument("is required with type json_schema", field="response_format.json_schema")
    schema = rf.json_schema.schema_
    if schema is None or schema is True:  # no schema: any JSON object, as OpenAI takes it
        req.constraint.json_object = True
    else:
        req.constraint.json_schema = json.dumps(schema)


def _tools(body: ChatRequest, req) -> None:
    for t in body.tools or ():
        f = t.function
        req.tools.append(pb.Tool(name=f.name, description=f.description or "",
                                 parameters=json.dumps(f.parameters) if f.parameters is not None else ""))
    choice = body.tool_choice
    if choice is None:
        return
    if isinstance(choice, str):
        mode = {"none": pb.ToolChoice.TOOL_CHOICE_MODE_NONE, "auto": pb.ToolChoice.TOOL_CHOICE_MODE_AUTO,
                "required": pb.ToolChoice.TOOL_CHOICE_MODE_REQUIRED}[choice]
        req.tool_choice.CopyFrom(pb.ToolChoice(mode=mode))
    else:
        req.tool_choice.CopyFrom(pb.ToolChoice(mode=pb.ToolChoice.TOOL_CHOICE_MODE_FUNCTION,
                                               function_name=choice.function.name))


def _echo(body: CompletionRequest, req, max_tokens: int) -> None:
    """echo: the reply's text starts with the prompt; with logprobs its tokens are scored (OpenAI's
    first entries are the prompt's). max_tokens 0 is the prompt alone: a scoring request, which
    generates nothing (what lm-evaluation-harness sends to ask for a loglikelihood)."""
    if body.logprobs is not None and body.logprobs > MAX_PROMPT_LOGPROBS:
        raise InvalidArgument(f"must be in [0, {MAX_PROMPT_LOGPROBS}] with echo, got {body.logprobs}",
                              field="logprobs")
    if body.logprobs is not None or max_tokens == 0:
        req.prompt_logprobs.enabled = True
        req.prompt_logprobs.top_n = body.logprobs or 0


def to_execute(body, kind: str):
    """The ExecuteRequest `body` asks for (kind: "completions" or "chat"). Raises OrcdError naming
    the body's field for what proto cannot even hold (negative counts); the rest is judged by
    request_validation like any gRPC request."""
    check_supported(body, kind)
    req = pb.ExecuteRequest(model_id=body.model or "")
    if kind == "completions":
        first = prompts(body)[0]
        _set_prompt(req, first, "prompt[0]" if first is not body.prompt else "prompt")
        # OpenAI's legacy completions default to 16 tokens; chat runs until the model stops.
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        max_param = "max_tokens"
        if body.logprobs is not None:
            req.top_logprobs = _uint(body.logprobs, "logprobs")
        if body.echo:
            _echo(body, req, max_tokens)
        elif max_tokens == 0:  # proto's 0 is "until the context is full"; OpenAI's is nothing
            raise InvalidArgument("must be at least 1 (0 only with echo)", field="max_tokens")
    else:
        chat_messages(body, req)
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens == 0:
            raise InvalidArgument("must be at least 1 (omit it to generate until the model stops)", field=max_param)
        max_tokens = max_tokens or 0
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidArgument("needs logprobs: true", field="top_logprobs")
        if body.logprobs and body.top_logprobs:
            req.top_logprobs = _uint(body.top_logprobs, "top_logprobs")
        _response_format(body, req)
        _tools(body, req)
    req.stopping.max_tokens = _uint(max_tokens, max_param)
    if body.n is not None:
        if body.n < 1:
            raise InvalidArgument(f"must be at least 1, got {body.n}", field="n")
        req.n = _uint(body.n, "n")
    if body.stop is not None:
        req.stopping.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.min_tokens is not None:
        req.stopping.min_tokens = _uint(body.min_tokens, "min_tokens")
    if body.ignore_eos is not None:
        req.stopping.ignore_eos = body.ignore_eos
    if body.stop_token_ids is not None:
        req.stopping.stop_token_ids.extend(_uint(t, f"stop_token_ids[{i}]") for i, t in enumerate(body.stop_token_ids))

    s = req.sampling
    for name in ("temperature", "top_p", "repetition_penalty"):  # optional in proto: unset means default
        v = getattr(body, name)
        if v is not None:
            setattr(s, name, v)
    for name in ("min_p", "presence_penalty", "frequency_penalty"):
        v = getattr(body, name)
        if v is not None:
            setattr(s, name, v)
    if body.top_k is not None:
        s.top_k = _uint(body.top_k, "top_k")
    if body.seed is not None:
        if not SEED_MIN <= body.seed <= SEED_MAX:
            raise InvalidArgument(f"must be a 64-bit integer, got {body.seed}", field="seed")
        s.seed = body.seed % 2**64
    if body.logit_bias:
        for key, bias in body.logit_bias.items():
            if not re.fullmatch(r"\s*\d{1,10}\s*", key) or int(key) > UINT32_MAX:
                raise InvalidArgument(f"keys must be token ids (decimal strings), got {key[:32]!r}", field="logit_bias")
            s.logit_bias[int(key)] = bias
    return req


def param_of(field: str | None, kind: str, max_param: str = "max_tokens") -> str | None:
    """The body's name for a proto field path an OrcdError names."""
    if not field:
        return None
    if field == "model_id":
        return "model"
    if field == "request_id":
        return None
    if field == "input" or field.startswith(("input.text", "input.tokens", "input.chat")):
        rest = field.removeprefix("input.chat.messages").removeprefix("input.chat")
        if kind == "chat":
            rest = re.sub(r"(\.tool_calls\[\d+\])\.(name|arguments)$", r"\1.function.\2", rest)
            return "messages" + rest if rest.startswith("[") else "messages"
        return "prompt"
    if field.startswith("constraint"):
        return "response_format.json_schema.schema" if field == "constraint.json_schema" else "response_format"
    if field.startswith("tool_choice"):
        return "tool_choice.function.name" if field == "tool_choice.function_name" else "tool_choice"
    m = re.fullmatch(r"tools\[(\d+)\]\.(name|description|parameters)", field)
    if m:
        return f"tools[{m[1]}].function.{m[2]}"
    if field == "top_logprobs" or field.startswith("prompt_logprobs"):
        return "logprobs" if kind == "completions" else "top_logprobs"
    if field == "stopping.max_tokens":
        return max_param
    for prefix in ("sampling.", "stopping."):
        if field.startswith(prefix):
            rest = field[len(prefix):]
            return re.sub(r"^logit_bias\[(\d+)\]$", r'logit_bias["\1"]', rest)
    return field


def rename(err: OrcdError, kind: str, body=None) -> tuple[str, str | None]:
    """(message, param) of `err` as the HTTP body names its fields."""
    max_param = "max_tokens"
    if kind == "chat" and body is not None and getattr(body, "max_completion_tokens", None) is not None:
        max_param = "max_completion_tokens"
    msg = str(err)
    param = param_of(err.field, kind, max_param)
    if err.field and msg.startswith(err.field + ": "):
        msg = msg[len(err.field) + 2:]
        if param:
            msg = f"{param}: {msg}"
    return msg, param


Kind = Literal["completions", "chat"]
