"""A GPT-OSS harmony transcript through a real server (CPU backend, real port, real stubs): a
tiny random gpt-oss model whose vocabulary carries harmony's control tokens and whose GGUF holds
the gpt-oss chat template, so the worker detects the harmony family. The model cannot write
harmony by itself; a Lark grammar (ExecuteRequest.constraint, with `<|channel|>` etc. matching
only the control tokens, which constraints.py marks special for llguidance) forces a transcript,
and the stream must split it: analysis text on CHANNEL_REASONING, a commentary message to
functions.NAME as a ToolCall event, final-channel text on CHANNEL_ANSWER. tool_choice REQUIRED's
own harmony grammar (tool_grammar.py) must compile against the same vocabulary and yield a call.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llguidance")

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tools"))
from tiny_models import tiny_model  # noqa: E402
from gguf_export import export_hf_model  # noqa: E402

from orcd_grpc import constraints  # noqa: E402
from orcd_grpc.proto import pb  # noqa: E402

pytestmark = pytest.mark.slow

HARMONY = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
           "<|endoftext|>")
WEATHER = pb.Tool(name="get_weather", description="Current weather for a city",
                  parameters=json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                         "required": ["city"], "additionalProperties": False}))
ASK = [pb.ChatMessage(role="user", content="What is the weather in Paris?")]
REASONING = "The user wants the weather in Paris."
CALL = ('<|channel|> "analysis" <|message|> "' + REASONING + '" <|end|> <|start|> "assistant" '
        '<|channel|> "commentary to=functions.get_weather " <|constrain|> "json" <|message|> '
        '"{\\"city\\":\\"Paris\\"}" <|call|>')
ANSWER = "It is sunny in Paris."
FINAL = ('<|channel|> "analysis" <|message|> "' + REASONING + '" <|end|> <|start|> "assistant" '
         '<|channel|> "final" <|message|> "' + ANSWER + '" <|return|>')


@pytest.fixture(scope="module")
def srv(real_server, tmp_path_factory):
    template = (ROOT / "tests/data/templates/gpt_oss.jinja").read_text()
    path = export_hf_model(tiny_model("gpt_oss"), tmp_path_factory.mktemp("harmony") / "tiny-gpt-oss.gguf",
                           qtype="F32", expert_qtype="F32", special_tokens=HARMONY, eos_token="<|return|>",
                           chat_template=template)
    return real_server(pathlib.Path(path), max_context=2048)


def execute(srv, *, grammar=None, choice=None, bans=(), max_tokens=120):
    req = pb.ExecuteRequest(chat=pb.ChatMessages(messages=ASK), tools=[WEATHER],
                            sampling=pb.SamplingParams(temperature=0, banned_token_sequences=[
                                pb.TokenIds(ids=b) for b in bans]),
                            stopping=pb.StoppingCriteria(max_tokens=max_tokens))
    if grammar is not None:
        req.constraint.lark_grammar = grammar
    if choice is not None:
        req.tool_choice.CopyFrom(choice)
    free, live = srv.scheduler.engine.free_blocks(), constraints.live_matchers()
    events = list(srv.stub.Execute(req, timeout=300))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    end = time.monotonic() + 10
    while (srv.scheduler.engine.free_blocks(), constraints.live_matchers()) != (free, live) \
            and time.monotonic() < end:
        time.sleep(0.02)
    assert srv.scheduler.engine.free_blocks() == free and constraints.live_matchers() == live
    tokens = [e.token for e in events if e.WhichOneof("event") == "token"]
    assert [t.index for t in tokens] == list(range(len(tokens)))
    text = lambda ch: "".join(t.text for t in tokens if t.channel == ch)  # noqa: E731
    return dict(reasoning=text(pb.CHANNEL_REASONING), answer=text(pb.CHANNEL_ANSWER),
                calls=[e.tool_call for e in events if e.WhichOneof("event") == "tool_call"],
                reason=events[-1].finished.reason, tokens=tokens)


def test_the_vocabulary_marks_harmony_tokens_special(srv):
    tok = srv.tokenizer
    for t in HARMONY:
        ids = tok.encode_special(t, add_bos=False)
        assert len(ids) == 1 and tok.is_special(ids[0]), t
    assert tok.encode("<|channel|>", add_bos=False) != tok.encode_special("<|channel|>", add_bos=False)


def test_reasoning_then_tool_call(srv):
    r = execute(srv, grammar="start: " + CALL)
    assert r["reasoning"] == REASONING
    assert r["answer"] == ""  # markup and the call's body carry no text
    assert len(r["calls"]) == 1
    call = r["calls"][0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    assert r["reason"] == pb.FINISH_REASON_TOOL_CALLS
    assert any(t.channel == pb.CHANNEL_TOOL_CALL for t in r["tokens"])


def test_reasoning_then_final_answer(srv):
    r = execute(srv, grammar="start: " + FINAL)
    assert r["reasoning"] == REASONING
    assert r["answer"] == ANSWER
    assert r["calls"] == [] and r["reason"] == pb.FINISH_REASON_STOP_TOKEN


def test_tool_choice_required_builds_a_harmony_call(srv):
    # Greedy decoding of a random model under the grammar would write analysis until max_tokens;
    # banning "<|channel|>a" leaves the commentary channel, so the call itself is what is tested.
    tok = srv.tokenizer
    bans = [tok.encode_special("<|channel|>", add_bos=False) + tok.encode("a", add_bos=False)]
    r = execute(srv, choice=pb.ToolChoice(mode=pb.ToolChoice.TOOL_CHOICE_MODE_REQUIRED), bans=bans, max_tokens=200)
    assert len(r["calls"]) == 1, r
    call = r["calls"][0]
    assert call.name == "get_weather"
    args = json.loads(call.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 12
    assert r["reason"] == pb.FINISH_REASON_TOOL_CALLS
