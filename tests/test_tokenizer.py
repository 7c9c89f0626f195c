"""Tokenizer conformance against llama.cpp's vocabulary test cases, round trips, special tokens,
and chat-template rendering."""
from __future__ import annotations

import functools
import json
import os
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orcd_grpc import errors
from orcd_grpc.chat_template import render_chat
from orcd_grpc.gguf_metadata import read_gguf_metadata
from orcd_grpc.tokenizer import CONTROL, Tokenizer, bytes_to_unicode

VOCABS = ("gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2")
SEPARATOR = "\n__ggml_vocab_test__\n"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _collection_shared_dir() -> pathlib.Path | None:
    # Same search as the shared_dir fixture; needed at collection time to list the cases.
    for cand in (os.environ.get("ORCD_SHARED_DIR"), REPO / "shared", REPO.parent / "shared"):
        if cand and (pathlib.Path(cand) / "vocab").is_dir():
            return pathlib.Path(cand)
    return None


def load_cases(vocab_dir: pathlib.Path, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's format: inputs each followed by the separator line; one output line each."""
    inp = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = inp.split(SEPARATOR)
    assert texts[-1] == "", "the .inp file must end with a separator line"
    lines = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "the .out file must end with a newline"
    texts, lines = texts[:-1], lines[:-1]
    assert len(texts) == len(lines)
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def _case_params():
    d = _collection_shared_dir()
    params = []
    for name in VOCABS:
        n = len(load_cases(d / "vocab", name)) if d else 1
        params += [pytest.param(name, i, id=f"{name}-{i}") for i in range(n)]
    return params


@functools.lru_cache(maxsize=None)
def _vocab_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_gguf_file(path)


@pytest.fixture(scope="module")
def vocab_tok(shared_dir):
    return lambda name: _vocab_tokenizer(str(shared_dir / "vocab" / f"ggml-vocab-{name}.gguf"))


@pytest.mark.parametrize("name,index", _case_params())
def test_llama_cpp_conformance(shared_dir, vocab_tok, name, index):
    text, expected = load_cases(shared_dir / "vocab", name)[index]
    assert vocab_tok(name).encode(text, add_bos=False) == expected, repr(text)


def test_case_files_are_complete(shared_dir):
    for name in VOCABS:
        cases = load_cases(shared_dir / "vocab", name)
        assert len(cases) >= 40
        assert any(expected for _, expected in cases)


# U+2581 is SentencePiece's space marker: SPM vocabularies (and llama.cpp, and sentencepiece)
# read it back as a space, so it cannot survive a round trip there. Surrogates are no text.
_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60)
_SPM_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",),
                                           exclude_characters="\u2581"), max_size=60)


@pytest.mark.parametrize("name", VOCABS)
def test_round_trip_random_text(vocab_tok, name):
    tok = vocab_tok(name)
    spm = name in ("llama-spm", "phi-3")

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_SPM_TEXT if spm else _TEXT)
    def check(text):
        ids = tok.encode(text, add_bos=False)
        # Rule: decode() undoes encode() exactly; for SPM with add_space_prefix the space that
        # encode() prepends is the one decode() strips, so a text's own leading spaces survive.
        assert tok.decode(ids) == text
        raw = b"".join(tok.token_bytes(i) for i in ids)
        # token_bytes() is what streaming emits: the prepended space is still there.
        assert raw == ((" " + text) if spm and text else text).encode("utf-8")

    check()


@pytest.mark.parametrize("name", VOCABS)
def test_control_text_is_plain_unless_asked(shared_dir, vocab_tok, name):
    tok = vocab_tok(name)
    meta = read_gguf_metadata(shared_dir / "vocab" / f"ggml-vocab-{name}.gguf")
    tokens, types = meta["tokenizer.ggml.tokens"], np.asarray(meta["tokenizer.ggml.token_type"])
    control = [int(i) for i in np.flatnonzero(types == CONTROL)]
    assert control
    for tid in control[:40]:
        text = tokens[tid]
        plain = tok.encode("a" + text + "b", add_bos=False)
        assert not any(tok.is_special(i) for i in plain), text
        assert tok.decode(plain) == "a" + text + "b"
        assert tid in tok.encode_special("a" + text + "b", add_bos=False), text
        assert tok.token_bytes(tid) == text.encode()
        assert tok.token_bytes(tid, skip_special=True) == b""


def test_control_looking_tokens_are_control(vocab_tok):
    """llama.cpp gives end-of-generation texts the control type whatever the file says (phi-3's
    </s> is user-defined there): client text spelling one stays text, with llama.cpp's ids
    (llama-cpp-python 0.3.36 on this vocabulary, parse_special off: "\u2581</", "s", ">")."""
    tok = vocab_tok("phi-3")
    assert tok.encode("</s>", add_bos=False) == [1533, 29879, 29958]
    assert tok.encode_special("</s>", add_bos=False) == [2] and tok.is_special(2)


def test_phi3_special_tokens_take_the_whitespace_after_them(vocab_tok):
    """llama.cpp gives phi-3's special tokens (by the model's name) its RSTRIP attribute and
    parses unknown-type tokens ([PAD...]) as special text too; ids from llama-cpp-python 0.3.36
    on this vocabulary, parse_special on and off."""
    tok = vocab_tok("phi-3")
    text = "<|user|>\nHello there<|end|>\n<|assistant|>\n Sure.  [PAD32042] x"
    assert tok.encode_special(text, add_bos=False) == [32010, 15043, 727, 32007, 32001, 18585, 29889, 259, 32042, 921]
    assert tok.encode(text, add_bos=False) == [
        529, 29989, 1792, 29989, 29958, 13, 10994, 727, 29966, 29989, 355, 29989, 29958, 13, 29966, 29989, 465,
        22137, 29989, 29958, 13, 18585, 29889, 29871, 518, 29925, 3035, 29941, 29906, 29900, 29946, 29906, 29962, 921]
    ids, spans = tok.encode_with_offsets("<|user|>\n Hi", add_bos=False)
    assert tok.encode_special("<|user|>\n Hi", add_bos=False)[0] == 32010 and ids[0] != 32010  # plain: text


@pytest.mark.parametrize("name,bos,eos,add_bos", [
    ("gpt-2", 50256, {50256}, False),
    ("llama-bpe", 128000, {128001, 128009}, True),   # <|eot_id|> ends a turn
    ("llama-spm", 1, {2}, True),
    ("phi-3", 1, {2, 32000, 32007}, True),           # <|end|>; </s> (user-defined in the file)
    ("qwen2", 151643, {151643, 151645, 128247}, False),  # <|im_end|>; </s> (normal in the file)
])
def test_special_ids(vocab_tok, name, bos, eos, add_bos):
    tok = vocab_tok(name)
    assert (tok.bos_id, set(tok.eos_ids), tok.add_bos) == (bos, eos, add_bos)
    ids = tok.encode("Hello world")
    assert (ids[0] == bos) == add_bos
    assert tok.encode("Hello world", add_bos=True)[0] == bos
    assert tok.encode("Hello world", add_bos=False)[0] != bos


def test_from_reader_fields_matches_file_reader(shared_dir, vocab_tok):
    import gguf

    path = shared_dir / "vocab" / "ggml-vocab-phi-3.gguf"
    from_fields = Tokenizer.from_gguf(gguf.GGUFReader(path).fields)
    ref = vocab_tok("phi-3")
    text = "Hello <|user|> wörld\n\n  🎉 <|end|>"
    for fn in ("encode", "encode_special"):
        assert getattr(from_fields, fn)(text) == getattr(ref, fn)(text)
    assert (from_fields.bos_id, from_fields.eos_ids, from_fields.chat_template) == \
        (ref.bos_id, ref.eos_ids, ref.chat_template)


def test_from_tokenizer_json(tmp_path, shared_dir, vocab_tok):
    ref = vocab_tok("qwen2")
    path = tmp_path / "tokenizer.json"
    ref._hf.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": "{{ messages[0]['content'] }}"}))
    tok = Tokenizer.from_tokenizer_json(path)
    text = "<|im_start|>user\nCafé 世界 123<|im_end|>"
    assert tok.encode_special(text) == ref.encode_special(text)
    assert tok.encode(text) == ref.encode(text)
    assert all(tok.token_bytes(i) == ref.token_bytes(i) for i in ref.encode_special(text))
    assert 151645 in tok.eos_ids and tok.bos_id is None
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "x"
    # GGUF fields, when given, win over tokenizer_config.json.
    meta = read_gguf_metadata(shared_dir / "vocab" / "ggml-vocab-qwen2.gguf")
    tok2 = Tokenizer.from_tokenizer_json(path, fields=meta)
    assert (tok2.bos_id, tok2.chat_template) == (151643, meta["tokenizer.chat_template"])


def _byte_vocab_tokenizer(pre: str) -> Tokenizer:
    return Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                                "tokenizer.ggml.tokens": list(bytes_to_unicode().values()),
                                "tokenizer.ggml.merges": []})


def test_gpt4o_pre_tokenizer_pieces():
    # No llama.cpp cases exist here for o200k (GPT-OSS); these pieces follow from its regex by
    # hand: case-aware words with attached contractions, digits in threes, space runs apart.
    tok = _byte_vocab_tokenizer("gpt-4o")
    pieces = [p for p, _ in tok._hf.pre_tokenizer.pre_tokenize_str("HelloWorld it's 12345  x\n\n/y")]
    dec = {c: b for b, c in bytes_to_unicode().items()}
    text = [bytes(dec[c] for c in p).decode() for p in pieces]
    assert text == ["Hello", "World", " it's", " ", "123", "45", " ", " x", "\n\n", "/y"]
    s = "Grüße, 世界! <|return|> ok"
    assert tok.decode(tok.encode(s)) == s


def test_unsupported_pre_tokenizer_names_the_key(shared_dir):
    meta = read_gguf_metadata(shared_dir / "vocab" / "ggml-vocab-gpt-2.gguf")
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(errors.InvalidArgument) as ei:
        Tokenizer.from_gguf(meta)
    assert ei.value.field == "tokenizer.ggml.pre"
    meta["tokenizer.ggml.model"] = "t5"
    with pytest.raises(errors.InvalidArgument) as ei:
        Tokenizer.from_gguf(meta)
    assert ei.value.field == "tokenizer.ggml.model"
    with pytest.raises(errors.InvalidArgument) as ei:
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2"})
    assert ei.value.field == "tokenizer.ggml.tokens"


# ---- the real models ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return Tokenizer.from_gguf_file(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return Tokenizer.from_gguf_file(gemma3_path)


def test_smollm2_tokenizer(smollm2):
    assert smollm2.vocab_size == 49152
    ids = smollm2.encode("The capital of France is")
    assert smollm2.decode(ids) == "The capital of France is" and len(ids) == 5
    assert smollm2.add_bos is False and {0, 2} <= smollm2.eos_ids
    chat = "<|im_start|>user\nHi<|im_end|>"
    assert smollm2.encode_special(chat)[0] == 1 and smollm2.encode_special(chat)[-1] == 2
    assert 1 not in smollm2.encode(chat) and 2 not in smollm2.encode(chat)
    # smollm splits digits one by one
    assert len(smollm2.encode("12345")) == 5


def test_gemma3_tokenizer(gemma3):
    assert gemma3.vocab_size == 262144
    ids = gemma3.encode("The capital of France is", add_bos=False)
    assert gemma3.decode(ids) == "The capital of France is"
    assert gemma3.encode("The capital of France is")[0] == gemma3.bos_id == 2
    sot = gemma3.encode_special("<start_of_turn>user\n", add_bos=False)
    assert sot[0] == 105 and gemma3.is_special(105)
    assert 105 not in gemma3.encode("<start_of_turn>user\n")
    assert 106 in gemma3.eos_ids  # <end_of_turn>
    # a template that writes <bos> itself does not get a second one
    assert gemma3.encode_special("<bos>hi")[:2] == [2, gemma3.encode("hi", add_bos=False)[0]]
    assert gemma3.encode("<bos>hi")[1] != 2
    # gemma3 has add_space_prefix = false: no space is invented before the first word
    assert gemma3.token_bytes(ids[0]) == b"The"
    text = "héllo 🎉 世界\n\n\t  x"
    assert gemma3.decode(gemma3.encode(text)) == "<bos>" + text
    assert gemma3.decode(gemma3.encode(text), skip_special=True) == text


# ---- chat templates -------------------------------------------------------------------------

def test_smollm2_chat_template(smollm2):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert smollm2.render_chat(msgs) == want
    assert smollm2.render_chat(msgs, add_generation_prompt=False) == want.rsplit("<|im_start|>", 1)[0]
    # Without a system message the template adds its default one.
    assert smollm2.render_chat(msgs[1:]).startswith("<|im_start|>system\nYou are a helpful AI")
    ids = smollm2.encode_special(smollm2.render_chat(msgs))
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_gemma3_base_model_has_no_template(gemma3):
    # The 270M base model ships no chat template; asking for one is a precondition failure.
    assert gemma3.chat_template is None
    with pytest.raises(errors.FailedPrecondition) as ei:
        gemma3.render_chat([{"role": "user", "content": "hi"}])
    assert ei.value.field == "chat"


GEMMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/model') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def test_gemma_style_template_with_gemma_tokens(gemma3):
    msgs = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    text = render_chat(GEMMA_STYLE, msgs, bos_token="<bos>")
    assert text == ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello"
                    "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = gemma3.encode_special(text, add_bos=False)
    assert ids[0] == 2 and ids.count(105) == 4 and ids.count(106) == 3
    with pytest.raises(errors.InvalidArgument, match="alternate") as ei:
        render_chat(GEMMA_STYLE, msgs[1:])
    assert ei.value.field == "chat"


def test_template_environment():
    # trim_blocks / lstrip_blocks as in transformers: block tags leave no blank lines behind
    tpl = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render_chat(tpl, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a]\n[b]\n"
    assert render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "é<b>"}]) == \
        '{"role": "user", "content": "é<b>"}'
    assert len(render_chat("{{ strftime_now('%Y') }}", [])) == 4
    assert render_chat("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                       "{{ m.content }}{% endfor %}",
                       [{"role": "u", "content": "1"}, {"role": "u", "content": "2"}]) == "1"


def test_template_that_does_not_compile_is_a_precondition_failure():
    # A property of the model, not of the request: found when the model loads, reported per call.
    from orcd_grpc.chat_template import check_template

    assert "endfor" in check_template("{% for m in messages %}")
    with pytest.raises(errors.FailedPrecondition, match="does not compile") as ei:
        render_chat("{% for m in messages %}", [{"role": "user", "content": "x"}])
    assert ei.value.field == "chat"


@pytest.mark.parametrize("template", [
    "{{ messages.append(1) }}",                      # immutable sandbox violation
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # sandbox violation
    "{{ messages[5]['content'] + 1 }}",              # runtime error
    "{{ raise_exception('nope') }}",
])
def test_template_errors_name_chat(template):
    with pytest.raises(errors.InvalidArgument) as ei:
        render_chat(template, [{"role": "user", "content": "x"}])
    assert ei.value.field == "chat"


def test_bad_messages_name_the_field():
    with pytest.raises(errors.InvalidArgument) as ei:
        render_chat("x", [{"content": "no role"}])
    assert ei.value.field == "chat.messages[0].role"
