"""The Token messages execute_stream builds on the event loop, against the keyword-built message
the contract describes: every field carried, top logprobs in order, and a token whose fields are
all defaults (id 0, empty text, index 0, logprob 0) still a Token event on the wire."""
from __future__ import annotations

import random

from orcd_grpc.execute_stream import _token
from orcd_grpc.proto import pb
from orcd_grpc.request import TokenEvent


def _reference(ev: TokenEvent, channel: int) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(token=pb.Token(
        text=ev.text, token_id=ev.token_id, index=ev.index, logprob=ev.logprob,
        top_logprobs=[pb.TopLogprob(token_id=i, text=t, logprob=lp) for i, t, lp in ev.top],
        channel=channel, sample_index=ev.sample))


def test_token_messages_match_the_keyword_built_ones():
    rng = random.Random()
    for _ in range(200):
        top = [(rng.randrange(1 << 17), rng.choice(["", " a", "é", "\ufffd", "x" * rng.randrange(9)]),
                -rng.random() * 20) for _ in range(rng.randrange(21))]
        ev = TokenEvent(rng.randrange(1 << 17), rng.choice(["", "hi", " wörld"]), rng.randrange(4096),
                        -rng.random() * 10, top, rng.randrange(4))
        for name, value in (("answer", pb.CHANNEL_ANSWER), ("reasoning", pb.CHANNEL_REASONING)):
            got = _token(ev, name)
            assert got == _reference(ev, value)
            assert got.SerializeToString() == _reference(ev, value).SerializeToString()


def test_an_all_default_token_is_still_a_token_event():
    got = _token(TokenEvent(0, "", 0, 0.0, [], 0), "answer")
    assert got.WhichOneof("event") == "token"
    back = pb.ExecuteResponse.FromString(got.SerializeToString())
    assert back.WhichOneof("event") == "token"
