"""Tool definitions, tool choice and tool-call history of an ExecuteRequest: checked, and shaped
the way transformers hands them to a chat template.

Everything here is client text and is bounded before any of it reaches a template: counts,
bytes, JSON nesting. Errors are INVALID_ARGUMENT naming the field (``tools[2].parameters``).

A template that renders no tools (SmolLM2's, Gemma 3's) would drop them silently; for those the
worker describes the tools itself in the hermes format (a system message, ``<tool_call>``
markup in earlier assistant turns, ``<tool_response>`` user turns for results), all of it as
message content, so it is tokenized as plain text like any content.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from . import tool_calls
from .errors import InvalidArgument

MAX_TOOLS = 128
MAX_TOOL_CALLS = 128          # per assistant message
MAX_DESCRIPTION_BYTES = 8192
MAX_SCHEMA_BYTES = 65536      # Tool.parameters and ToolCall.arguments
MAX_JSON_DEPTH = 32
MAX_ID_CHARS = 128
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")

AUTO, NONE, REQUIRED, FUNCTION = "auto", "none", "required", "function"
_EMPTY_SCHEMA = {"type": "object", "properties": {}}


@dataclasses.dataclass
class ToolSpec:
    tools: list[dict]           # as the template sees them
    schemas: dict[str, dict]    # name -> parameters schema
    choice: str                 # AUTO, NONE, REQUIRED, FUNCTION
    function: str = ""          # with FUNCTION

    @property
    def names(self) -> frozenset[str] | None:
        """The names calls may use, or None when no output is parsed as a call."""
        return None if not self.tools or self.choice == NONE else frozenset(self.schemas)


def _depth_ok(text: str) -> bool:
    # json.loads recurses per level; a deep enough document is a RecursionError, and any depth
    # costs the template and the grammar compiler later. Count brackets outside strings.
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def json_object(text: str, field: str, *, empty: Any = None) -> dict:
    """`text` parsed as a JSON object, bounded; INVALID_ARGUMENT naming `field` otherwise."""
    if not text and empty is not None:
        return dict(empty)
    n = len(text.encode("utf-8", "surrogatepass")) if len(text) <= MAX_SCHEMA_BYTES else len(text)
    if n > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"at most {MAX_SCHEMA_BYTES} bytes, got {n}", field=field)
    if not _depth_ok(text):
        raise InvalidArgument(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", field=field)
    try:
        value = json.loads(text, parse_constant=tool_calls._no_constants)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers past Python's digit cap
        raise InvalidArgument(f"not valid JSON: {str(exc)[:120]}", field=field) from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"must be a JSON object, got {type(value).__name__}", field=field)
    return value


def check_name(name: str, field: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{name[:70]!r} must be 1..64 characters of [a-zA-Z0-9_-]", field=field)


def check_id(value: str, field: str) -> None:
    if not 1 <= len(value) <= MAX_ID_CHARS or not all(0x20 <= ord(c) <= 0x7E for c in value):
        raise InvalidArgument(f"must be 1..{MAX_ID_CHARS} printable ASCII characters", field=field)


def check_tools(req) -> ToolSpec | None:
    """The request's tools and tool choice, checked; None when it has neither."""
    has_choice = req.HasField("tool_choice")
    if not req.tools and not has_choice:
        return None
    if req.tools and req.WhichOneof("input") != "chat":
        raise InvalidArgument("tools need chat input", field="tools")
    if len(req.tools) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools, got {len(req.tools)}", field="tools")
    tools, schemas = [], {}
    for i, t in enumerate(req.tools):
        check_name(t.name, f"tools[{i}].name")
        if t.name in schemas:
            raise InvalidArgument(f"{t.name!r} is defined twice", field=f"tools[{i}].name")
        n = len(t.description.encode("utf-8", "surrogatepass"))
        if n > MAX_DESCRIPTION_BYTES:
            raise InvalidArgument(f"at most {MAX_DESCRIPTION_BYTES} bytes, got {n}", field=f"tools[{i}].description")
        params = json_object(t.parameters, f"tools[{i}].parameters", empty=_EMPTY_SCHEMA)
        schemas[t.name] = params
        fn = {"name": t.name, "description": t.description, "parameters": params}
        tools.append({"type": "function", "function": fn})
    mode = {0: AUTO, 1: NONE, 2: REQUIRED, 3: FUNCTION}.get(int(req.tool_choice.mode))
    if mode is None:
        raise InvalidArgument(f"unknown mode {int(req.tool_choice.mode)}", field="tool_choice.mode")
    fname = req.tool_choice.function_name
    if mode == FUNCTION:
        if fname not in schemas:
            raise InvalidArgument(f"{fname[:70]!r} is not one of the request's tools",
                                  field="tool_choice.function_name")
    elif fname:
        raise InvalidArgument("only with mode TOOL_CHOICE_MODE_FUNCTION", field="tool_choice.function_name")
    if mode in (REQUIRED, FUNCTION) and not tools:
        raise InvalidArgument(f"tool choice {mode} needs tools", field="tool_choice.mode")
    return ToolSpec(tools, schemas, mode, fname)


def message_dicts(messages) -> list[dict]:
    """Chat messages as the template sees them, tool calls and tool results included."""
    out = []
    for i, m in enumerate(messages):
        field = f"input.chat.messages[{i}]"
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidArgument("only assistant messages carry tool calls", field=f"{field}.tool_calls")
            if len(m.tool_calls) > MAX_TOOL_CALLS:
                raise InvalidArgument(f"at most {MAX_TOOL_CALLS}, got {len(m.tool_calls)}", field=f"{field}.tool_calls")
            calls = []
            for j, c in enumerate(m.tool_calls):
                cf = f"{field}.tool_calls[{j}]"
                check_id(c.id, f"{cf}.id")
                check_name(c.name, f"{cf}.name")
                args = json_object(c.arguments, f"{cf}.arguments", empty={})
                calls.append({"type": "function", "id": c.id,
                              "function": {"name": c.name, "arguments": args}})
            d["tool_calls"] = calls
        if m.tool_call_id:
            check_id(m.tool_call_id, f"{field}.tool_call_id")
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            check_name(m.name, f"{field}.name")
            d["name"] = m.name
        out.append(d)
    return out


def client_bytes(messages: list[dict], spec: ToolSpec | None) -> int:
    """Bytes of client text beyond message contents (tool definitions, calls, ids), counted
    against --max-prompt-bytes with the contents."""
    extra = [{k: v for k, v in m.items() if k not in ("role", "content")} for m in messages]
    n = sum(len(json.dumps(e, ensure_ascii=False)) for e in extra if e)
    if spec is not None and spec.tools:
        n += len(json.dumps(spec.tools, ensure_ascii=False))
    return n


# ---------------------------------------------------------------------------------------------
# The worker's own tool prompt, for templates that render no tools (hermes format).

_PREAMBLE = (
    "# Tools\n\nYou can call functions to help with the user's request. Their signatures, one JSON "
    "object per line:\n<tools>\n{tools}\n</tools>\n\nTo call a function, reply with a JSON object "
    "holding its name and arguments between <tool_call></tool_call> tags, one per call:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <arguments-json-object>}}\n</tool_call>"
)


def _call_markup(call: dict) -> str:
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def fallback_messages(messages: list[dict], spec: ToolSpec | None) -> tuple[list[dict], list[str]]:
    """(messages with tools, calls and results written as hermes text in the contents, the field
    each new message's content stands for)."""
    out: list[dict] = []
    fields: list[str] = []
    tools = spec.tools if spec is not None else []
    if tools:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        preamble = _PREAMBLE.format(tools=lines)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + preamble})
            fields.append("input.chat.messages[0].content")
            messages = messages[1:]
            offset = 1
        else:
            out.append({"role": "system", "content": preamble})
            fields.append("tools")
            offset = 0
    else:
        offset = 0
    for k, m in enumerate(messages):
        i = k + offset
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_results"):  # results of one turn go in one user message
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_results": True})
                fields.append(f"input.chat.messages[{i}].content")
            continue
        content = m["content"]
        if m.get("tool_calls"):
            content = "\n".join([content] * bool(content) + [_call_markup(c) for c in m["tool_calls"]])
        out.append({"role": m["role"], "content": content})
        fields.append(f"input.chat.messages[{i}].content")
    for m in out:
        m.pop("_results", None)
    return out, fields


# ---------------------------------------------------------------------------------------------
# What the request's tools mean for this model: the prompt to render and the output to parse.

@dataclasses.dataclass
class ToolUse:
    messages: list[dict]            # to render
    fields: list[str] | None        # the request field each message's content came from
    template_tools: list | None     # `tools` for the template, None where it renders none
    extra_bytes: int                # client text beyond the contents (sized with them)
    family: str | None              # output parser (tool_calls.FAMILIES), None: plain text
    names: frozenset[str] | None    # tool names a call may use, None: calls are not parsed
    grammar: str | None = None      # Lark grammar forcing a call (tool_choice required/function)


def tool_use(spec: ToolSpec | None, template: str | None, messages: list[dict],
             tool_format: str | None = None) -> ToolUse:
    """How a chat request with `spec` (None: no tools) is rendered and parsed for a model with
    `template`; `tool_format` (a tool_calls family) overrides the one detected from it."""
    from .tool_grammar import check_schemas, tool_choice_grammar

    history = any(k in m for m in messages for k in ("tool_calls", "tool_call_id", "name"))
    has_tools = spec is not None and bool(spec.tools)
    detected = tool_calls.detect_family(template)
    renders_tools = detected is not None or "tools" in (template or "")
    if (has_tools or history) and not renders_tools:
        msgs, fields = fallback_messages(messages, spec)
        use = ToolUse(msgs, fields, None, 0, tool_format or "hermes", None)
    else:
        use = ToolUse(messages, None, spec.tools if has_tools else None, client_bytes(messages, spec),
                      tool_format or detected, None)
    names = spec.names if spec is not None else None
    if use.family is not None and (names is not None or use.family == "harmony"):
        use.names = names  # harmony's channels are routed even when calls are off
    else:
        use.family = None
    if spec is not None and spec.choice in (REQUIRED, FUNCTION):
        if use.family is None:
            raise InvalidArgument("the model's tool-call format is unknown (the worker's --tool-format "
                                  "names it), so a call cannot be enforced", field="tool_choice.mode")
        check_schemas(spec.tools, spec.choice, spec.function)
        use.grammar = tool_choice_grammar(spec.tools, spec.choice, use.family, spec.function)
    return use
