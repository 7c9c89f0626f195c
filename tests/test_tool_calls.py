"""Tool-call parsers (orcd_grpc/tool_calls.py) and the stream adapter (tool_stream.py): whole
outputs, the same outputs split at every character boundary, nested JSON, several calls,
malformed markup returned as text."""
from __future__ import annotations

import itertools
import json

import pytest

from orcd_grpc import tool_calls as tc
from orcd_grpc.request import LENGTH, STOP_TOKEN, TokenEvent
from orcd_grpc.tool_calls import ANSWER, REASONING, Call, Text
from orcd_grpc.tool_stream import TOOL_CALLS, ToolStream

NAMES = frozenset({"get_weather", "search", "noargs"})


def ids():
    counter = itertools.count()
    return lambda: f"id{next(counter)}"


def parse(family, pieces, names=NAMES):
    return tc.parse_all(family, pieces, names, make_id=ids())


def split_everywhere(family, pieces, names=NAMES):
    """Every way of cutting each text piece in two (control pieces stay whole) gives the same
    result as the whole pieces; and so does feeding one character at a time."""
    whole = parse(family, pieces, names)
    for k, (text, control) in enumerate(pieces):
        if control:
            continue
        for cut in range(1, len(text)):
            cut_pieces = pieces[:k] + [(text[:cut], False), (text[cut:], False)] + pieces[k + 1:]
            assert parse(family, cut_pieces, names) == whole, (k, cut)
    chars = [(c, False) for text, control in pieces if not control for c in text] if \
        not any(c for _, c in pieces) else \
        [p for text, control in pieces for p in ([(text, True)] if control else [(c, False) for c in text])]
    assert parse(family, chars, names) == whole
    return whole


def C(name, args):  # noqa: N802 - reads like the event it stands for
    return (name, json.loads(args))


def calls(outs):
    return [C(o.name, o.arguments) for o in outs if isinstance(o, Call)]


def text(outs, channel=ANSWER):
    return "".join(o.text for o in outs if isinstance(o, Text) and o.channel == channel)


# ---------------------------------------------------------------------------------------------
# hermes (Qwen2.5)

def test_hermes_call_with_text_around_it():
    out = split_everywhere("hermes", [(
        'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> Done.', False)])
    assert calls(out) == [("get_weather", {"city": "Paris"})]
    assert text(out) == "Let me check.  Done."
    assert [type(o) for o in out] == [Text, Call, Text]


def test_hermes_several_calls_and_nested_json():
    args = {"q": "a } tricky { string \" with </tool_call>", "filters": {"tags": [1, [2, {"x": None}]]}}
    body = json.dumps({"name": "search", "arguments": args})
    out = split_everywhere("hermes", [(
        f'<tool_call>\n{body}\n</tool_call>\n<tool_call>\n{{"name": "noargs", "arguments": {{}}}}\n</tool_call>', False)])
    # a closing tag inside a JSON string ends the markup (as in every hermes parser): the first
    # body is cut there and does not parse, so it comes back as text
    assert calls(out) == [("noargs", {})]
    assert "tricky" in text(out)
    args = {"q": "a } tricky { string \" here", "filters": {"tags": [1, [2, {"x": None}]]}}
    body = json.dumps({"name": "search", "arguments": args})
    out = split_everywhere("hermes", [(f"<tool_call>{body}</tool_call><tool_call>{body}</tool_call>", False)])
    assert calls(out) == [("search", args), ("search", args)]
    assert text(out) == ""


def test_hermes_call_ids_are_unique_and_arguments_compact():
    out = tc.parse_all("hermes", [('<tool_call>{"name": "noargs", "arguments": {}}</tool_call>' * 3, False)], NAMES)
    got = [o for o in out if isinstance(o, Call)]
    assert len({c.id for c in got}) == 3 and all(c.id.startswith("call_") and len(c.id) == 29 for c in got)
    assert got[0].arguments == "{}"
    out = parse("hermes", [('<tool_call>{"name": "search", "arguments": {"q" : "é" ,  "n": 1}}</tool_call>', False)])
    assert out[0].arguments == '{"q":"é","n":1}'


def test_hermes_arguments_given_as_a_json_string():
    out = parse("hermes", [('<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>', False)])
    assert calls(out) == [("search", {"q": "x"})]


@pytest.mark.parametrize("body", [
    '{"name": "get_weather", "arguments": {"city": "Paris"}',        # unbalanced
    '{"name": "unknown_tool", "arguments": {}}',                      # not one of the tools
    '{"name": "search", "arguments": [1, 2]}',                        # arguments not an object
    '{"arguments": {}}',                                              # no name
    '["search", {}]',                                                 # not an object
    '{"name": "search", "arguments": {"x": NaN}}',                    # not strict JSON
    "get_weather(city='Paris')",                                      # not JSON at all
])
def test_hermes_malformed_call_is_returned_as_text(body):
    raw = f"Before <tool_call>{body}</tool_call> after"
    out = split_everywhere("hermes", [(raw, False)])
    assert calls(out) == [] and text(out) == raw


def test_hermes_unclosed_call_at_the_end():
    out = split_everywhere("hermes", [('<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n', False)])
    assert calls(out) == [("search", {"q": "x"})]
    raw = '<tool_call>\n{"name": "search", "arguments": {"q": '
    out = split_everywhere("hermes", [(raw, False)])
    assert calls(out) == [] and text(out) == raw


def test_hermes_partial_open_tag_is_held_then_released():
    p = tc.StreamParser("hermes", NAMES)
    assert p.feed("a <tool_") == [Text(ANSWER, "a ")] and p.busy
    assert tc.merge(p.feed("response>")) == [Text(ANSWER, "<tool_response>")] and not p.busy
    p = tc.StreamParser("hermes", NAMES)
    p.feed("x <tool")
    assert tc.merge(p.finish()) == [Text(ANSWER, "<tool")]


def test_hermes_with_calls_off_is_all_text():
    raw = '<tool_call>{"name": "search", "arguments": {}}</tool_call>'
    assert parse("hermes", [(raw, False)], names=None) == [Text(ANSWER, raw)]


def test_hermes_ignores_other_control_tokens_and_reads_control_markers():
    out = parse("hermes", [("<tool_call>", True), ('{"name": "noargs", "arguments": {}}', False),
                           ("</tool_call>", True), ("<|im_end|>", True)])
    assert calls(out) == [("noargs", {})] and text(out) == ""


# ---------------------------------------------------------------------------------------------
# llama3

def test_llama3_json_call():
    out = split_everywhere("llama3", [('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', False)])
    assert calls(out) == [("get_weather", {"city": "Paris", "days": 3})] and text(out) == ""


def test_llama3_after_python_tag_and_several_calls():
    out = split_everywhere("llama3", [("<|python_tag|>", True), (
        '{"name": "search", "parameters": {"q": "}{\\"]"}}; {"name": "noargs", "parameters": {}}', False),
        ("<|eom_id|>", True)])
    assert calls(out) == [("search", {"q": '}{"]'}), ("noargs", {})]


def test_llama3_plain_answer_is_text():
    out = split_everywhere("llama3", [("  The weather is {probably} fine.", False)])
    assert out == [Text(ANSWER, "  The weather is {probably} fine.")]


@pytest.mark.parametrize("raw", [
    '{"answer": 42}',                                  # JSON, but not a call
    '{"name": "nope", "parameters": {}}',              # unknown tool
    '{"name": "search", "parameters": {"q": "x"',      # never finished
    '<not json>',
])
def test_llama3_non_calls_are_text(raw):
    out = split_everywhere("llama3", [(raw, False)])
    assert calls(out) == [] and text(out) == raw


def test_llama3_text_after_a_call_is_text():
    out = split_everywhere("llama3", [('{"name": "noargs", "parameters": {}} and then some words', False)])
    assert calls(out) == [("noargs", {})] and text(out) == "and then some words"


def test_llama3_python_tag_with_code_is_text():
    out = parse("llama3", [("<|python_tag|>", True), ('brave_search.call(query="x")', False)])
    assert calls(out) == [] and text(out) == 'brave_search.call(query="x")'


# ---------------------------------------------------------------------------------------------
# harmony (GPT-OSS)

def _harmony_call(name="get_weather", args='{"city": "Paris"}', role_recipient=False):
    if role_recipient:
        return [("<|start|>", True), (f"assistant to=functions.{name}", False), ("<|channel|>", True),
                ("commentary json", False), ("<|message|>", True), (args, False), ("<|call|>", True)]
    return [("<|start|>", True), ("assistant", False), ("<|channel|>", True),
            (f"commentary to=functions.{name} ", False), ("<|constrain|>", True), ("json", False),
            ("<|message|>", True), (args, False), ("<|call|>", True)]


ANALYSIS = [("<|channel|>", True), ("analysis", False), ("<|message|>", True),
            ("User wants weather. Use the tool.", False), ("<|end|>", True)]


def test_harmony_reasoning_then_call():
    out = split_everywhere("harmony", ANALYSIS + _harmony_call())
    assert text(out, REASONING) == "User wants weather. Use the tool."
    assert text(out) == "" and calls(out) == [("get_weather", {"city": "Paris"})]


def test_harmony_recipient_in_the_role_part():
    out = split_everywhere("harmony", _harmony_call(role_recipient=True, args='{"city": {"n": [1, {}]}}'))
    assert calls(out) == [("get_weather", {"city": {"n": [1, {}]}})]


def test_harmony_final_answer_is_separate_from_reasoning():
    pieces = ANALYSIS + [("<|start|>", True), ("assistant", False), ("<|channel|>", True), ("final", False),
                         ("<|message|>", True), ("It is sunny.", False), ("<|return|>", True)]
    out = split_everywhere("harmony", pieces)
    assert out == [Text(REASONING, "User wants weather. Use the tool."), Text(ANSWER, "It is sunny.")]
    # channels are routed with calls off too (a request without tools)
    assert parse("harmony", pieces, names=None) == out


@pytest.mark.parametrize("name,args", [("unknown", '{"a": 1}'), ("get_weather", '{"city": '),
                                       ("get_weather", "[1]")])
def test_harmony_bad_call_is_text(name, args):
    out = split_everywhere("harmony", _harmony_call(name, args))
    assert calls(out) == [] and text(out) == args


def test_harmony_call_with_calls_off_is_answer_text():
    out = parse("harmony", _harmony_call(), names=None)
    assert calls(out) == [] and text(out) == '{"city": "Paris"}'


def test_harmony_call_cut_off_by_the_length_limit_is_text():
    out = parse("harmony", _harmony_call()[:-1] + [("", False)])  # no <|call|>: finish() settles it
    assert calls(out) == [("get_weather", {"city": "Paris"})]
    out = parse("harmony", _harmony_call(args='{"city": "Par')[:-1])
    assert calls(out) == [] and text(out) == '{"city": "Par'


def test_harmony_spelled_out_markup_is_plain_text():
    # the model writing "<|channel|>" as ordinary tokens is text, not structure
    out = parse("harmony", [("<|channel|>analysis<|message|>x", False)])
    assert out == [Text(ANSWER, "<|channel|>analysis<|message|>x")]


# ---------------------------------------------------------------------------------------------
# detection

def test_detect_family_from_template_text(repo_root):
    d = repo_root / "tests" / "data" / "templates"
    assert tc.detect_family((d / "qwen2_5.jinja").read_text()) == "hermes"
    assert tc.detect_family((d / "llama3_1.jinja").read_text()) == "llama3"
    assert tc.detect_family((d / "gpt_oss.jinja").read_text()) == "harmony"
    assert tc.detect_family((repo_root / "tests" / "data" / "gemma3_chat_template.jinja").read_text()) is None
    assert tc.detect_family("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is None
    assert tc.detect_family(None) is None


def test_unknown_family_is_refused():
    with pytest.raises(ValueError):
        tc.StreamParser("mistral", NAMES)


# ---------------------------------------------------------------------------------------------
# the stream adapter: one event per token, held text settled before Finished


class _Tok:
    """Token ids 0..: texts; ids in `special` are control tokens."""

    def __init__(self, texts, special=()):
        self.texts, self.special = texts, set(special)

    def is_special(self, tid):
        return tid in self.special

    def token_bytes(self, tid):
        return self.texts[tid].encode()


def _run(stream, tok, ids, reason=STOP_TOKEN):
    out = []
    for i, tid in enumerate(ids):
        text = "" if tok.is_special(tid) else tok.texts[tid]
        out += stream.on_token(TokenEvent(tid, text, i, -0.1, []))
    out += stream.on_finish()
    return out, stream.finish_reason(reason)


def test_stream_keeps_one_event_per_token_and_sends_the_call_after_its_tokens():
    texts = ["Sure", " <tool_call>", '{"name": "search", ', '"arguments": {"q": "x"}}', "</tool_call>", "<|im_end|>"]
    tok = _Tok(texts, special={5})
    out, reason = _run(ToolStream("hermes", NAMES, tok), tok, range(6))
    tokens = [o for o in out if not isinstance(o, Call)]
    assert [t.event.index for t in tokens] == list(range(6))
    assert [t.event.text for t in tokens] == ["Sure", " ", "", "", "", ""]
    assert [t.channel for t in tokens[2:4]] == ["tool_call", "tool_call"]
    kinds = ["call" if isinstance(o, Call) else o.event.index for o in out]
    assert kinds.index("call") == kinds.index(4) + 1  # right after the token that closed it
    assert reason == TOOL_CALLS


def test_stream_settles_held_text_on_the_last_token():
    texts = ["<tool_call>", '{"name": "search", "arguments": {"q"']
    tok = _Tok(texts)
    out, reason = _run(ToolStream("hermes", NAMES, tok), tok, [0, 1], reason=LENGTH)
    assert "".join(o.event.text for o in out) == "".join(texts)
    assert out[-1].event.index == 1 and out[-1].channel == ANSWER
    assert reason == LENGTH


def test_stream_routes_harmony_channels():
    texts = ["<|channel|>", "analysis", "<|message|>", "think", "<|end|>", "<|start|>", "assistant",
             "<|channel|>", "final", "<|message|>", "Hi", "<|return|>"]
    tok = _Tok(texts, special={0, 2, 4, 5, 7, 9, 11})
    out, reason = _run(ToolStream("harmony", None, tok), tok, range(len(texts)))
    routed = [(o.event.text, o.channel) for o in out if o.event.text]
    assert routed == [("think", REASONING), ("Hi", ANSWER)]
    assert reason == STOP_TOKEN
