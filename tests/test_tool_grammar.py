"""tool_choice grammars (orcd_grpc/tool_grammar.py) run through llguidance itself: the calls a
family writes are accepted token by token, anything else (another tool, arguments outside the
schema, broken markup, text before the call) is rejected; and what is accepted parses back into
calls (tool_calls.py)."""
from __future__ import annotations

import json

import pytest

llguidance = pytest.importorskip("llguidance")

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers  # noqa: E402

from orcd_grpc import tool_calls  # noqa: E402
from orcd_grpc.errors import InvalidArgument  # noqa: E402
from orcd_grpc.tokenizer import Tokenizer, bytes_to_unicode  # noqa: E402
from orcd_grpc.tool_grammar import check_schemas, tool_choice_grammar, validate  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "noargs", "description": "", "parameters":
                                           {"type": "object", "properties": {}}}}]
SPECIALS = ["<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|call|>", "<|return|>",
            "<|python_tag|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level BPE tokenizer with no merges plus the families' control tokens: every text
    is reachable, and control tokens are single ids that text cannot spell."""
    b2u = bytes_to_unicode()
    tok = HFTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return llguidance.LLTokenizer(tok.to_str(), eos_token=tok.token_to_id("<|eot_id|>"))


def accepts(lltok, grammar: str, text: str) -> bool:
    m = llguidance.LLMatcher(lltok, grammar)
    assert not m.is_error(), m.get_error()
    ids = lltok.tokenize_str(text, parse_special=True)
    if m.validate_tokens(ids) != len(ids):
        return False
    assert m.consume_tokens(ids)
    return m.is_accepting() or m.is_stopped()


def parsed(family, text, specials=SPECIALS):
    """The text as the stream parser sees it: control tokens as control pieces."""
    import re

    pieces = [(p, p in specials) for p in re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if p]
    return [o for o in tool_calls.parse_all(family, pieces, frozenset({"get_weather", "noargs"}))
            if isinstance(o, tool_calls.Call)]


HERMES_OK = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","days":3,"unit":"F"}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "noargs", "arguments": {}}\n</tool_call>',
]
HERMES_BAD = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"days": 3}}\n</tool_call>',          # city required
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": 3}}\n</tool_call>',          # wrong type
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a", "days": 99}}\n</tool_call>',  # maximum
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a", "wind": 1}}\n</tool_call>',  # extra key
    '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>',                          # unknown tool
    'Sure! <tool_call>\n{"name": "noargs", "arguments": {}}\n</tool_call>',                   # text first
    '<tool_call>{"name": "noargs", "arguments": {}}</tool_call>',                             # markup differs
    '',                                                                                        # no call at all
]


@pytest.mark.parametrize("text", HERMES_OK)
def test_hermes_required_accepts_calls_that_parse(byte_tok, text):
    g = tool_choice_grammar(TOOLS, "required", "hermes")
    assert accepts(byte_tok, g, text)
    assert len(parsed("hermes", text)) == text.count("<tool_call>")


@pytest.mark.parametrize("text", HERMES_BAD)
def test_hermes_required_rejects(byte_tok, text):
    assert not accepts(byte_tok, tool_choice_grammar(TOOLS, "required", "hermes"), text)


def test_named_function_allows_only_that_function(byte_tok):
    g = tool_choice_grammar(TOOLS, "function", "hermes", "noargs")
    assert accepts(byte_tok, g, '<tool_call>\n{"name": "noargs", "arguments": {}}\n</tool_call>')
    assert not accepts(byte_tok, g, HERMES_OK[0])
    # exactly one call
    assert not accepts(byte_tok, g, '<tool_call>\n{"name": "noargs", "arguments": {}}\n</tool_call>\n'
                                    '<tool_call>\n{"name": "noargs", "arguments": {}}\n</tool_call>')


def test_llama3_grammar(byte_tok):
    g = tool_choice_grammar(TOOLS, "required", "llama3")
    ok = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'
    assert accepts(byte_tok, g, ok) and parsed("llama3", ok)[0].name == "get_weather"
    assert not accepts(byte_tok, g, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert not accepts(byte_tok, g, '{"name": "get_weather", "parameters": {"unit": "K", "city": "x"}}')
    assert not accepts(byte_tok, g, 'The weather is nice.')


def test_harmony_grammar(byte_tok):
    g = tool_choice_grammar(TOOLS, "required", "harmony")
    call = ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city": "Paris", "days": 2}<|call|>')
    with_reasoning = ('<|channel|>analysis<|message|>They want the weather;\ncall it.<|end|><|start|>assistant'
                      + call)
    for text in (call, with_reasoning):
        assert accepts(byte_tok, g, text)
        assert [c.name for c in parsed("harmony", text)] == ["get_weather"]
    assert not accepts(byte_tok, g, call.replace('"days": 2', '"days": 0'))
    assert not accepts(byte_tok, g, call.replace("get_weather", "get_wether"))
    # the final channel (an answer instead of a call) is not allowed
    assert not accepts(byte_tok, g, "<|channel|>final<|message|>Sunny.<|return|>")
    # control tokens spelled as text do not count as the tokens
    m = llguidance.LLMatcher(byte_tok, g)
    ids = (byte_tok.tokenize_str(call.removesuffix("<|call|>"), parse_special=True)
           + [ord(c) for c in "<|call|>"])  # byte tokens: ids 0..255 are the bytes
    assert m.validate_tokens(ids) < len(ids)


def test_hermes_grammar_on_a_real_vocabulary(shared_dir):
    """Qwen2's own BPE vocabulary: the grammar compiles against it and accepts the call written
    with that vocabulary's tokens."""
    tok = Tokenizer.from_gguf_file(shared_dir / "vocab" / "ggml-vocab-qwen2.gguf")
    lltok = llguidance.LLTokenizer(tok._hf.to_str(), eos_token=sorted(tok.eos_ids)[0])
    g = tool_choice_grammar(TOOLS, "required", "hermes")
    m = llguidance.LLMatcher(lltok, g)
    assert not m.is_error(), m.get_error()
    text = HERMES_OK[1]
    ids = tok.encode(text, add_bos=False)
    assert m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()
    bad = tok.encode(HERMES_BAD[1], add_bos=False)
    assert llguidance.LLMatcher(lltok, g).validate_tokens(bad) < len(bad)


def test_choices_that_need_no_grammar_and_unknown_families():
    with pytest.raises(ValueError):
        tool_choice_grammar(TOOLS, "auto", "hermes")
    with pytest.raises(ValueError):
        tool_choice_grammar(TOOLS, "function", "hermes", "missing")
    with pytest.raises(ValueError):
        tool_choice_grammar(TOOLS, "required", "mistral")


def test_schema_llguidance_cannot_compile_names_the_tool():
    bad = [TOOLS[0], {"type": "function", "function": {"name": "broken", "description": "",
                                                       "parameters": {"type": "object",
                                                                      "properties": {"a": {"$ref": "#/nowhere"}}}}}]
    assert validate(tool_choice_grammar(bad[:1], "required", "hermes")) is None
    with pytest.raises(InvalidArgument) as e:
        check_schemas(bad, "required")
    assert e.value.field == "tools[1].parameters"
    check_schemas(bad, "function", "get_weather")  # only the named tool is enforced
    json.dumps(bad)  # the request's data is left as it was


@pytest.mark.parametrize("family,wrap", [
    ("hermes", lambda a: '<tool_call>\n{"name": "get_weather", "arguments": ' + a + '}\n</tool_call>'),
    ("harmony", lambda a: '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>' + a
     + '<|call|>')])
def test_call_json_whitespace_and_numbers_are_bounded(byte_tok, family, wrap):
    """A forced call's JSON gets constraints.py's bounds: whitespace gaps of at most 32 characters
    (a random model wrote whitespace until max_tokens without it) and open numbers bounded."""
    g = tool_choice_grammar(TOOLS, "function", family, "get_weather")
    assert accepts(byte_tok, g, wrap('{"city":' + " " * 32 + '"Paris"}'))
    assert not accepts(byte_tok, g, wrap('{"city":' + " " * 33 + '"Paris"}'))
    free = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}}}]
    g = tool_choice_grammar(free, "function", family, "get_weather")
    assert accepts(byte_tok, g, wrap('{"n": 1234.5}'))
    assert not accepts(byte_tok, g, wrap('{"n": ' + "9" * 17 + '}'))
