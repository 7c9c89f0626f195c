"""StreamDecoder: UTF-8-safe chunks, stop strings across tokens, control tokens."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orcd_grpc.detokenize import StreamDecoder
from orcd_grpc.tokenizer import Tokenizer


class ByteTokens:
    """A stand-in vocabulary: each token id is an arbitrary byte string; ids < 0 are control."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        return self.pieces[token_id]

    def is_special(self, token_id: int) -> bool:
        return self.pieces[token_id] == b"<eos>"


def run(pieces: list[bytes], stop=(), flush=True):
    tok = ByteTokens(pieces)
    dec = StreamDecoder(tok, stop)
    chunks, matched = [], None
    for i in range(len(pieces)):
        text, matched = dec.push(i)
        chunks.append(text)
        if matched:
            break
    if flush and not matched:
        chunks.append(dec.flush())
    return chunks, matched


def reference(text: str, stops) -> tuple[str, str | None]:
    """Text before the stop string that completes first (ties: the one starting first)."""
    best = None
    for s in stops:
        i = text.find(s) if s else -1
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    return (text, None) if best is None else (text[:best[1]], best[2])


def test_utf8_split_across_tokens_is_held():
    emoji = "🎉".encode()
    chunks, _ = run([b"a", emoji[:1], emoji[1:3], emoji[3:], b"b"])
    assert chunks == ["a", "", "", "🎉", "b", ""]


def test_incomplete_utf8_at_end_becomes_replacement_char():
    chunks, _ = run([b"ok", "世".encode()[:2]])
    assert chunks == ["ok", "", "\ufffd"]


def test_invalid_byte_is_replaced_not_held():
    chunks, _ = run([b"a\xffb"])
    assert chunks == ["a\ufffdb", ""]


def test_multi_token_stop_string():
    chunks, matched = run([b"Hello", b" wor", b"ld", b"<|", b"user", b"|>", b"never"],
                          stop=["<|user|>"])
    assert matched == "<|user|>"
    assert "".join(chunks) == "Hello world"
    assert chunks[:3] == ["Hello", " wor", "ld"]   # nothing held that cannot start the stop
    assert chunks[3:] == ["", "", ""]              # "<|", "<|user" held, then dropped


def test_stop_starting_mid_token():
    chunks, matched = run([b"one two", b" thr", b"ee four"], stop=["three"])
    assert matched == "three"
    assert chunks == ["one two", " ", ""]          # " thr" could begin "three": held


def test_false_start_is_released():
    chunks, matched = run([b"a <", b"|x", b"y"], stop=["<|user|>"])
    assert matched is None
    assert chunks == ["a ", "<|x", "y", ""]


def test_control_tokens_make_no_text():
    chunks, matched = run([b"hi", b"<eos>", b"!"], stop=["eos"])
    assert matched is None and "".join(chunks) == "hi!"


def test_nothing_after_a_stop():
    tok = ByteTokens([b"ab", b"cd"])
    dec = StreamDecoder(tok, ["b"])
    assert dec.push(0) == ("a", "b")
    assert dec.push(1) == ("", None) and dec.flush() == "" and dec.stopped == "b"


def test_overlapping_stops_earliest_end_wins():
    assert run([b"xab", b"cd"], stop=["abcd", "b"])[1] == "b"
    chunks, matched = run([b"x", b"a", b"b", b"c"], stop=["xabc", "ab"])
    assert (matched, "".join(chunks)) == ("ab", "x")


# ---- property: any cut of the bytes into tokens, any stop strings --------------------------

_ALPHABET = st.sampled_from(list("ab <|>\n") + ["é", "世", "🎉", "\u0301"])


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=_ALPHABET, max_size=40),
       stops=st.lists(st.text(alphabet=_ALPHABET, min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_stream_equals_reference(text, stops, cuts):
    data = text.encode()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(points, points[1:])] or [b""]
    chunks, matched = run(pieces, stops)
    want_text, want_stop = reference(text, stops)
    assert "".join(chunks) == want_text
    assert matched == want_stop
    # a chunk never ends inside a character (no U+FFFD for valid input)
    assert "\ufffd" not in "".join(chunks)


# ---- real tokenizers -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return Tokenizer.from_gguf_file(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return Tokenizer.from_gguf_file(gemma3_path)


TEXT = "héllo 🎉 世界 𓀀𠜎 done"


def _stream(tok, ids, stop=()):
    dec = StreamDecoder(tok, stop)
    out = []
    for i in ids:
        text, matched = dec.push(i)
        out.append(text)
        if matched:
            return out, matched
    out.append(dec.flush())
    return out, None


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_tokenizer_split_characters(request, which):
    tok = request.getfixturevalue(which)
    ids = tok.encode(TEXT, add_bos=False)
    # the case is only meaningful if some token carries a partial character
    assert any(_is_partial(tok.token_bytes(i)) for i in ids)
    chunks, matched = _stream(tok, ids + sorted(tok.eos_ids)[:1])
    assert matched is None
    assert "".join(chunks) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in c for c in chunks)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_tokenizer_stop_strings(request, which):
    tok = request.getfixturevalue(which)
    ids = tok.encode(TEXT, add_bos=False)
    for stop in ("世界", "llo 🎉", "𠜎 d", " done", "o"):
        chunks, matched = _stream(tok, ids, [stop, "never-there"])
        assert matched == stop
        assert "".join(chunks) == TEXT[:TEXT.index(stop)]


def test_chat_control_tokens_are_silent(smollm2):
    ids = smollm2.encode_special("Paris.<|im_end|>\n")
    chunks, _ = _stream(smollm2, ids)
    assert "".join(chunks) == "Paris.\n"


def _is_partial(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True
