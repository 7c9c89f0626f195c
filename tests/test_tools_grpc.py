"""Tools through a real server (CPU backend, SmolLM2-135M-Instruct, real port, real stubs):
definitions and a tool-call history rendered and accepted, the tool-result message taken, the
model's own tool-call markup turned into stream events, validation errors naming the field, and
no KV block left behind.

SmolLM2's template renders no tools, so the worker's hermes prompt describes them (see
tool_prompt.py). The tiny model does not call tools by itself; where a test needs it to write
the markup, a banned token sequence steers greedy decoding away from the `<tool_response>` it
prefers after a tool turn, and it writes `<tool_call>` with a body of its own making. A forced,
valid call needs tool_choice REQUIRED / FUNCTION, enforced by the constraint code
(orcd_grpc/constraints.py); that test skips where it is absent.
"""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import grpc
import pytest

from orcd_grpc.proto import pb, pb_grpc
from orcd_grpc.server import ServerConfig, start_server
from orcd_grpc.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

WEATHER = pb.Tool(name="get_weather", description="Current weather for a city",
                  parameters=json.dumps({"type": "object", "properties": {"city": {"type": "string"}},
                                         "required": ["city"], "additionalProperties": False}))


@pytest.fixture(scope="module")
def srv(smollm2_path):
    cfg = ServerConfig(host="127.0.0.1", port=0, model_dirs=[str(smollm2_path.parent)], backend="cpu",
                       max_context=1024, max_sequences=4, max_queue=8, grace_seconds=1)
    worker, port, scheduler = start_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.WorkerStub(channel)
    list(stub.LoadModel(pb.LoadModelRequest(path=smollm2_path.name), timeout=600))
    yield SimpleNamespace(stub=stub, scheduler=scheduler, tokenizer=Tokenizer.from_gguf_file(smollm2_path),
                          address=f"127.0.0.1:{port}")
    channel.close()
    worker.stop(1)


def history(last="What is the weather in Paris?"):
    return [pb.ChatMessage(role="user", content="What is the weather in Rome?"),
            pb.ChatMessage(role="assistant", tool_calls=[
                pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Rome"}')]),
            pb.ChatMessage(role="tool", content='{"temp_c": 21}', tool_call_id="call_1", name="get_weather"),
            pb.ChatMessage(role="assistant", content="It is 21 C in Rome."),
            pb.ChatMessage(role="user", content=last)]


def execute(srv, messages, *, tools=(WEATHER,), choice=None, max_tokens=40, bans=()):
    req = pb.ExecuteRequest(chat=pb.ChatMessages(messages=messages), tools=list(tools),
                            sampling=pb.SamplingParams(temperature=0, banned_token_sequences=[
                                pb.TokenIds(ids=b) for b in bans]),
                            stopping=pb.StoppingCriteria(max_tokens=max_tokens))
    if choice is not None:
        req.tool_choice.CopyFrom(choice)
    free = srv.scheduler.engine.free_blocks()
    events = list(srv.stub.Execute(req, timeout=300))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert set(kinds[1:-1]) <= {"token", "tool_call"}
    tokens = [e.token for e in events if e.WhichOneof("event") == "token"]
    calls = [e.tool_call for e in events if e.WhichOneof("event") == "tool_call"]
    assert [t.index for t in tokens] == list(range(len(tokens)))  # one event per token, in order
    assert all(t.text == "" for t in tokens if t.channel == pb.CHANNEL_TOOL_CALL)
    for c in calls:
        assert c.name in {t.name for t in tools} and isinstance(json.loads(c.arguments), dict)
        assert c.id.startswith("call_")
    end = time.monotonic() + 10
    while srv.scheduler.engine.free_blocks() != free and time.monotonic() < end:
        time.sleep(0.02)
    assert srv.scheduler.engine.free_blocks() == free  # nothing held after the stream ends
    return SimpleNamespace(started=events[0].started, tokens=tokens, calls=calls, finished=events[-1].finished,
                           ids=[t.token_id for t in tokens], text="".join(t.text for t in tokens),
                           channels={t.channel for t in tokens})


def test_tools_and_tool_results_are_rendered_and_answered(srv):
    plain = execute(srv, history(), tools=(), max_tokens=1)
    r = execute(srv, history(), max_tokens=24)
    # the tool definitions took their place in the prompt
    assert r.started.prompt_tokens > plain.started.prompt_tokens + 20
    assert r.finished.reason in (pb.FINISH_REASON_STOP_TOKEN, pb.FINISH_REASON_LENGTH)
    if not r.calls:  # every token's text reaches the client: the stream is the decode of its ids
        assert r.text == srv.tokenizer.decode(r.ids, skip_special=True)


def test_markup_the_model_writes_is_parsed_and_a_bad_call_comes_back_as_text(srv):
    tok = srv.tokenizer
    response = tok.encode("<tool_response", add_bos=False)
    r = execute(srv, history(), bans=[response])
    raw = tok.decode(r.ids, skip_special=True)
    assert "<tool_call>" in raw, raw  # the model wrote the markup
    assert pb.CHANNEL_TOOL_CALL in r.channels  # its tokens were held as a call while it was open
    for c in r.calls:  # a body that parses as a call of get_weather is an event ...
        assert c.name == "get_weather"
    if not r.calls:  # ... one that does not comes back whole, as answer text
        assert r.text == raw
        assert r.finished.reason != pb.FINISH_REASON_TOOL_CALLS
    else:
        assert r.finished.reason in (pb.FINISH_REASON_TOOL_CALLS, pb.FINISH_REASON_LENGTH)


def test_tool_choice_none_streams_everything_as_text(srv):
    tok = srv.tokenizer
    r = execute(srv, history(), choice=pb.ToolChoice(mode=pb.ToolChoice.TOOL_CHOICE_MODE_NONE),
                bans=[tok.encode("<tool_response", add_bos=False)])
    assert not r.calls and r.channels <= {pb.CHANNEL_ANSWER}
    assert r.text == tok.decode(r.ids, skip_special=True)


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.tools.extend([pb.Tool(name="a"), pb.Tool(name="b", parameters="[1]")]), "tools[2].parameters"),
    (lambda r: r.tools.append(pb.Tool(name="bad name")), "tools[1].name"),
    (lambda r: r.chat.messages[0].tool_calls.append(pb.ToolCall(id="x", name="get_weather", arguments="{}")),
     "input.chat.messages[0].tool_calls"),
    (lambda r: r.chat.messages[1].tool_calls[0].__setattr__("arguments", "{oops"),
     "input.chat.messages[1].tool_calls[0].arguments"),
    (lambda r: r.tool_choice.CopyFrom(pb.ToolChoice(mode=pb.ToolChoice.TOOL_CHOICE_MODE_FUNCTION,
                                                    function_name="nope")), "tool_choice.function_name"),
])
def test_bad_tool_requests_name_the_field(srv, mutate, field):
    req = pb.ExecuteRequest(chat=pb.ChatMessages(messages=history()), tools=[WEATHER])
    mutate(req)
    free = srv.scheduler.engine.free_blocks()
    with pytest.raises(grpc.RpcError) as e:
        list(srv.stub.Execute(req, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    assert srv.scheduler.engine.free_blocks() == free


def test_python_client_sends_tools_and_collects_calls(srv):
    from orcd_grpc.client import OrcdClient, build_request

    chat = [{"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Rome"}}]},
            {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1", "name": "get_weather"},
            {"role": "user", "content": "Thanks. Summarize."}]
    tools = [{"name": "get_weather", "description": "Current weather", "parameters": {"type": "object"}}]
    req = build_request(chat=chat, tools=tools, tool_choice="get_weather")
    assert req.tool_choice.function_name == "get_weather" and req.tools[0].parameters == '{"type": "object"}'
    assert json.loads(req.chat.messages[1].tool_calls[0].arguments) == {"city": "Rome"}
    assert req.chat.messages[2].tool_call_id == "call_1"
    with OrcdClient(srv.address) as c:
        done = c.generate_text(chat=chat, tools=tools, tool_choice="none", temperature=0, max_tokens=6)
    assert done.tool_calls == [] and done.reasoning == "" and done.token_ids


def test_tools_need_chat_input(srv):
    with pytest.raises(grpc.RpcError) as e:
        list(srv.stub.Execute(pb.ExecuteRequest(text="hi", tools=[WEATHER]), timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools" in e.value.details()


def test_forced_call_round_trip(srv):
    """definition -> forced call (a typed event whose arguments fit the schema) -> the result as a
    tool message -> a final answer."""
    forced = pb.ToolChoice(mode=pb.ToolChoice.TOOL_CHOICE_MODE_FUNCTION, function_name="get_weather")
    first = [pb.ChatMessage(role="user", content="What is the weather in Paris?")]
    r = execute(srv, first, choice=forced, max_tokens=60)
    assert len(r.calls) == 1 and r.finished.reason == pb.FINISH_REASON_TOOL_CALLS
    call = r.calls[0]
    args = json.loads(call.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    follow = first + [pb.ChatMessage(role="assistant", tool_calls=[call]),
                      pb.ChatMessage(role="tool", content='{"temp_c": 18}', tool_call_id=call.id, name=call.name)]
    final = execute(srv, follow, max_tokens=24)
    assert final.text.strip() and final.finished.reason in (pb.FINISH_REASON_STOP_TOKEN, pb.FINISH_REASON_LENGTH,
                                                            pb.FINISH_REASON_TOOL_CALLS)
    required = execute(srv, first, choice=pb.ToolChoice(mode=pb.ToolChoice.TOOL_CHOICE_MODE_REQUIRED), max_tokens=60)
    assert required.calls and all(c.name == "get_weather" for c in required.calls)
