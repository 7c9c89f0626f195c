"""Unit tests of the OpenAI body -> ExecuteRequest translation and of the field-name mapping that
keeps HTTP errors naming the body's fields (openai_schema.py). No model, no server."""
from __future__ import annotations

import json

import pydantic
import pytest

from orcd_grpc import openai_schema as oa
from orcd_grpc.errors import InvalidArgument, OrcdError, OutOfRange
from orcd_grpc.proto import pb


def completion(**kw):
    return oa.CompletionRequest.model_validate({"prompt": "hi", **kw})


def chat(**kw):
    return oa.ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_completion_fields_map_onto_the_execute_request():
    req = oa.to_execute(completion(model="m", temperature=0.5, top_p=0.9, max_tokens=7, stop="x", seed=-1,
                                   logit_bias={"12": -100, " 7 ": 3}, presence_penalty=0.5, frequency_penalty=-0.5,
                                   logprobs=4, top_k=5, min_p=0.1, repetition_penalty=1.1, min_tokens=2,
                                   ignore_eos=True, stop_token_ids=[3]), "completions")
    assert req.model_id == "m" and req.text == "hi"
    s, st = req.sampling, req.stopping
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9) and s.top_k == 5
    assert s.seed == 2**64 - 1  # -1 wraps: int64 seeds stay distinct
    assert dict(s.logit_bias) == {12: -100.0, 7: 3.0}
    assert s.presence_penalty == pytest.approx(0.5) and s.frequency_penalty == pytest.approx(-0.5)
    assert s.min_p == pytest.approx(0.1) and s.repetition_penalty == pytest.approx(1.1)
    assert st.max_tokens == 7 and list(st.stop) == ["x"] and st.min_tokens == 2 and st.ignore_eos
    assert list(st.stop_token_ids) == [3] and req.top_logprobs == 4


def test_defaults_leave_proto_optionals_unset():
    req = oa.to_execute(completion(), "completions")
    assert not req.sampling.HasField("temperature") and not req.sampling.HasField("seed")
    assert req.stopping.max_tokens == 16  # OpenAI's legacy default
    assert oa.to_execute(chat(), "chat").stopping.max_tokens == 0  # chat: until the model stops


def test_prompt_forms():
    assert list(oa.to_execute(completion(prompt=[1, 2, 3]), "completions").tokens.ids) == [1, 2, 3]
    assert oa.to_execute(completion(prompt=["one"]), "completions").text == "one"
    assert list(oa.to_execute(completion(prompt=[[4, 5]]), "completions").tokens.ids) == [4, 5]
    body = completion(prompt=["a", "b"], max_tokens=3, echo=True, logprobs=1)
    reqs = oa.batch(oa.to_execute(body, "completions"), body)
    assert [r.text for r in reqs] == ["a", "b"] and all(r.stopping.max_tokens == 3 for r in reqs)
    assert all(r.prompt_logprobs.top_n == 1 for r in reqs)
    body = completion(prompt=[[1, 2], [3]])
    assert [list(r.tokens.ids) for r in oa.batch(oa.to_execute(body, "completions"), body)] == [[1, 2], [3]]
    with pytest.raises(InvalidArgument) as err:
        body = completion(prompt=[[1], [2, -1]])
        oa.batch(oa.to_execute(body, "completions"), body)
    assert err.value.field == "prompt[1][1]"
    with pytest.raises(InvalidArgument) as err:
        oa.to_execute(completion(prompt=["a"] * (oa.MAX_PROMPTS + 1)), "completions")
    assert err.value.field == "prompt"
    with pytest.raises(InvalidArgument) as err:
        oa.to_execute(completion(prompt=[1, -2]), "completions")
    assert err.value.field == "prompt[1]"


def test_chat_messages_and_max_completion_tokens():
    req = oa.to_execute(chat(messages=[{"role": "system", "content": "s"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]},
                                       {"role": "assistant", "content": None}],
                             max_tokens=3, max_completion_tokens=9, logprobs=True, top_logprobs=2), "chat")
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "s"), ("user", "ab"), ("assistant", "")]
    assert req.stopping.max_tokens == 9 and req.top_logprobs == 2
    with pytest.raises(oa.NotSupportedYet) as err:
        oa.to_execute(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "chat")
    assert err.value.field == "messages[0].content[0]"


@pytest.mark.parametrize("kw,param", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 2**32}, "max_tokens"), ({"seed": 2**64}, "seed"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"top_k": -1}, "top_k"), ({"logprobs": -1}, "logprobs"),
])
def test_values_proto_cannot_hold_are_invalid_argument_naming_the_body_field(kw, param):
    with pytest.raises(InvalidArgument) as err:
        oa.to_execute(completion(**kw), "completions")
    assert err.value.field == param


def test_not_supported_yet_table_is_the_one_switch():
    params = {row[0] for row in oa.NOT_SUPPORTED_YET}
    assert params == {"best_of", "suffix"}
    oa.to_execute(completion(best_of=1), "completions")  # no-op values pass
    with pytest.raises(oa.NotSupportedYet):
        oa.to_execute(completion(suffix="x"), "completions")


def test_response_format_and_tools_map_onto_the_execute_request():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = oa.to_execute(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
                        "chat")
    assert json.loads(req.constraint.json_schema) == schema
    assert oa.to_execute(chat(response_format={"type": "json_object"}), "chat").constraint.json_object
    assert not oa.to_execute(chat(response_format={"type": "text"}), "chat").HasField("constraint")
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": schema}}
    req = oa.to_execute(chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}},
                             messages=[{"role": "assistant", "content": None, "tool_calls": [
                                 {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                                 {"role": "tool", "tool_call_id": "c1", "content": "ok"}]), "chat")
    assert [(t.name, t.description, json.loads(t.parameters)) for t in req.tools] == [("f", "d", schema)]
    assert req.tool_choice.mode == pb.ToolChoice.TOOL_CHOICE_MODE_FUNCTION and req.tool_choice.function_name == "f"
    (call,) = req.chat.messages[0].tool_calls
    assert (call.id, call.name, call.arguments) == ("c1", "f", "{}") and req.chat.messages[1].tool_call_id == "c1"
    for choice, mode in (("none", "NONE"), ("auto", "AUTO"), ("required", "REQUIRED")):
        req = oa.to_execute(chat(tools=[tool], tool_choice=choice), "chat")
        assert req.HasField("tool_choice") and req.tool_choice.mode == getattr(pb.ToolChoice, f"TOOL_CHOICE_MODE_{mode}")


def test_echo_scores_the_prompt_and_max_tokens_zero_means_nothing_generated():
    req = oa.to_execute(completion(echo=True, logprobs=3, max_tokens=0), "completions")
    assert req.prompt_logprobs.enabled and req.prompt_logprobs.top_n == 3 and req.top_logprobs == 3
    assert req.stopping.max_tokens == 0
    req = oa.to_execute(completion(echo=True, max_tokens=0), "completions")  # the prompt alone: score only
    assert req.prompt_logprobs.enabled and req.prompt_logprobs.top_n == 0
    assert not oa.to_execute(completion(echo=True, max_tokens=2), "completions").HasField("prompt_logprobs")
    for body, kind, param in ((completion(max_tokens=0), "completions", "max_tokens"),
                              (completion(echo=True, logprobs=21), "completions", "logprobs"),
                              (chat(max_tokens=0), "chat", "max_tokens"),
                              (chat(max_completion_tokens=0), "chat", "max_completion_tokens")):
        with pytest.raises(InvalidArgument) as err:
            oa.to_execute(body, kind)
        assert err.value.field == param


def test_n():
    assert oa.to_execute(chat(n=3), "chat").n == 3 and oa.to_execute(completion(), "completions").n == 0
    with pytest.raises(InvalidArgument) as err:
        oa.to_execute(completion(n=0), "completions")
    assert err.value.field == "n"


def test_unknown_fields_are_refused():
    with pytest.raises(pydantic.ValidationError):
        completion(max_token=3)


@pytest.mark.parametrize("field,kind,param", [
    ("sampling.temperature", "chat", "temperature"), ("sampling.logit_bias[5]", "chat", 'logit_bias["5"]'),
    ("stopping.stop[2]", "completions", "stop[2]"), ("stopping.max_tokens", "completions", "max_tokens"),
    ("input", "completions", "prompt"), ("input.tokens", "completions", "prompt"), ("input", "chat", "messages"),
    ("input.chat.messages[1].role", "chat", "messages[1].role"), ("input.chat", "chat", "messages"),
    ("top_logprobs", "completions", "logprobs"), ("top_logprobs", "chat", "top_logprobs"),
    ("prompt_logprobs.top_n", "completions", "logprobs"), ("constraint.json_schema", "chat",
                                                           "response_format.json_schema.schema"),
    ("constraint", "chat", "response_format"), ("tool_choice.function_name", "chat", "tool_choice.function.name"),
    ("tool_choice.mode", "chat", "tool_choice"), ("tools[2].parameters", "chat", "tools[2].function.parameters"),
    ("input.chat.messages[1].tool_calls[0].arguments", "chat", "messages[1].tool_calls[0].function.arguments"),
    ("model_id", "chat", "model"), ("request_id", "chat", None), (None, "chat", None),
])
def test_param_of_maps_proto_paths_to_body_fields(field, kind, param):
    assert oa.param_of(field, kind) == param


def test_rename_keeps_the_message_and_swaps_the_field():
    msg, param = oa.rename(InvalidArgument("must be in [0, 100], got 500", field="sampling.temperature"), "chat")
    assert (msg, param) == ("temperature: must be in [0, 100], got 500", "temperature")
    body = chat(max_completion_tokens=5)
    msg, param = oa.rename(OutOfRange("too many", field="stopping.max_tokens"), "chat", body)
    assert (msg, param) == ("max_completion_tokens: too many", "max_completion_tokens")
    assert oa.rename(OrcdError("no field"), "chat") == ("no field", None)
