"""Grammars that force a tool call (tool_choice required / function), in llguidance's Lark syntax.

The grammar spells the family's own markup (what its template shows the model in earlier turns,
so the forced output stays in the distribution the model was trained on) around the JSON of the
call, and the call's JSON is llguidance's ``%json`` of a schema whose ``arguments`` is the
tool's own parameters schema, so whatever is generated parses back (tool_calls.py) into a call
whose arguments validate against that schema. Control tokens are written ``<|name|>``: they
match only the token itself, never text that spells it.

The string is for the constraint code (orcd_grpc/constraints.py, ExecuteRequest.constraint),
which compiles a grammar with the model's tokenizer; `validate` checks one here without a
tokenizer so a schema llguidance cannot compile is refused naming the tool.
"""
from __future__ import annotations

import json

from .constraints import JSON_OPTIONS, bounded_numbers
from .errors import InvalidArgument

REQUIRED, FUNCTION = "required", "function"


def _call_schema(name: str, params: dict, args_key: str) -> dict:
    return {"type": "object",
            "properties": {"name": {"const": name}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def _json(schema: dict) -> str:
    # The bounds constraints.py gives a client's JSON schema hold for a forced call's JSON too: at
    # most 32 whitespace characters a gap and open numbers bounded, or greedy decoding can write
    # whitespace until max_tokens (a tiny gpt-oss model did, inside a harmony call's arguments).
    # A schema's own "x-guidance" options win.
    if isinstance(schema, dict):
        schema = {**bounded_numbers(schema), "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}
    return "%json " + json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _functions(tools: list[dict], choice: str, function: str) -> list[tuple[str, dict]]:
    fns = [(t["function"]["name"], t["function"].get("parameters") or {"type": "object"}) for t in tools]
    if choice == FUNCTION:
        fns = [f for f in fns if f[0] == function]
        if not fns:
            raise ValueError(f"{function!r} is not one of the tools")
    elif choice != REQUIRED:
        raise ValueError(f"tool choice {choice!r} needs no grammar")
    return fns


def tool_choice_grammar(tools: list[dict], choice: str, family: str, function: str = "") -> str:
    """A Lark grammar (llguidance) whose sentences are tool calls in `family`'s markup:
    `choice` REQUIRED: one or more calls (one where the family makes one call per turn) of any
    of `tools`; FUNCTION: exactly one call of `function`. `tools` as the template sees them
    ([{"type": "function", "function": {"name", "description", "parameters"}}])."""
    fns = _functions(tools, choice, function)
    if family == "hermes":
        body = {"anyOf": [_call_schema(n, p, "arguments") for n, p in fns]} if len(fns) > 1 else \
            _call_schema(*fns[0], "arguments")
        start = 'start: call ("\\n" call)*' if choice == REQUIRED else "start: call"
        return "\n".join([start, 'call: "<tool_call>\\n" body "\\n</tool_call>"', "body: " + _json(body)])
    if family == "llama3":
        # Llama 3.x makes one JSON call per turn, {"name": ..., "parameters": ...}.
        body = {"anyOf": [_call_schema(n, p, "parameters") for n, p in fns]} if len(fns) > 1 else \
            _call_schema(*fns[0], "parameters")
        return "\n".join(["start: body", "body: " + _json(body)])
    if family == "harmony":
        # GPT-OSS reasons on the analysis channel first; the call is a commentary message to
        # functions.NAME ended by <|call|>, which also ends the turn.
        lines = ["start: analysis? call",
                 'analysis: <|channel|> "analysis" <|message|> REASONING <|end|> <|start|> "assistant"',
                 "REASONING: /(.|\\n)*/",
                 "call: " + " | ".join(f"call_{i}" for i in range(len(fns)))]
        for i, (name, params) in enumerate(fns):
            lines.append(f'call_{i}: <|channel|> "commentary to=functions.{name} " <|constrain|> "json" '
                         f"<|message|> args_{i} <|call|>")
            lines.append(f"args_{i}: " + _json(params))
        return "\n".join(lines)
    raise ValueError(f"unknown tool-call family {family!r}")


def validate(grammar: str) -> str | None:
    """The problem llguidance finds compiling `grammar` (no tokenizer: special tokens are not
    resolved), or None; None too where llguidance is not installed (the constraint code then
    refuses the request itself)."""
    try:
        import llguidance
    except ImportError:
        return None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar))
    # without a tokenizer, special tokens cannot be resolved: that is a warning, not a problem
    messages = [m for m in messages if "no tokenizer" not in m]
    return "; ".join(m.strip() for m in messages)[:300] or None if is_error else None


def check_schemas(tools: list[dict], choice: str, function: str = "") -> None:
    """INVALID_ARGUMENT naming the tool whose parameters llguidance cannot compile."""
    for i, t in enumerate(tools):
        name = t["function"]["name"]
        if choice == FUNCTION and name != function:
            continue
        # the schema is what can fail; the hermes wrapper has no control tokens to resolve
        problem = validate(tool_choice_grammar([t], FUNCTION, "hermes", name))
        if problem:
            raise InvalidArgument(f"cannot be enforced as a grammar: {problem}", field=f"tools[{i}].parameters")
