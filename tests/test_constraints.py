"""Constrained output (issue #17 A): packed bitmasks, llguidance matchers, and Execute's
`constraint` through a real gRPC server on SmolLM2-135M and Gemma 3 270M (CPU backend).

CPU time: SmolLM2 decodes ~9 tokens/s on the 2-core CI machine, so the JSON-schema corpus runs
only its `ci` entries (tests/data/constraint_schemas.json), all at once in one batch, with small
max_tokens; bench/constraint_corpus.py runs all 50.
"""
from __future__ import annotations

import concurrent.futures
import json
import pathlib
import re
import time

import grpc
import jsonschema
import numpy as np
import pytest

from orcd_grpc import constraints
from orcd_grpc.backends.runner import PlanRow, bitmask_words, fill_bitmasks, masked, pack_bitmask, unpack_bitmask
from orcd_grpc.errors import InvalidArgument
from orcd_grpc.proto import pb

CORPUS = json.loads((pathlib.Path(__file__).parent / "data" / "constraint_schemas.json").read_text())["schemas"]
RNG = np.random.default_rng(17)


# ---- bitmasks (no model) --------------------------------------------------------------------

def _reference_pack(allowed: np.ndarray) -> np.ndarray:
    """Word j, bit b set where token 32 j + b is allowed: the layout written out in Python ints."""
    words = []
    for j in range(bitmask_words(allowed.size)):
        w = 0
        for b in range(32):
            t = 32 * j + b
            if t < allowed.size and allowed[t]:
                w |= 1 << b
        words.append(w - (1 << 32) if w >= 1 << 31 else w)
    return np.asarray(words, np.int64)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 1000, 4099])
def test_pack_bitmask_matches_reference_and_unpacks(vocab):
    for p in (0.0, 0.03, 0.5, 1.0):
        allowed = RNG.random(vocab) < p
        bits = pack_bitmask(allowed)
        assert bits.dtype == np.int32 and bits.shape == (bitmask_words(vocab),)
        assert np.array_equal(bits.astype(np.int64), _reference_pack(allowed))
        assert np.array_equal(unpack_bitmask(bits, vocab), allowed)


def test_masked_agrees_with_llguidance_apply():
    """Our host application of a bitmask equals llguidance's own NumPy one, on random logits."""
    from llguidance.numpy import apply_token_bitmask_inplace

    V = 1000
    for _ in range(5):
        logits = RNG.standard_normal(V).astype(np.float32)
        allowed = RNG.random(V) < 0.2
        bits = pack_bitmask(allowed)
        row = PlanRow(0, [1], 0, 1, [0], [1], [], None)
        ours = masked(logits, row, bits)
        theirs = logits.copy()[None]
        apply_token_bitmask_inplace(theirs, bits[None])
        assert np.array_equal(ours, theirs[0])
        assert np.array_equal(np.isfinite(ours), allowed)


class _FixedConstraint:
    """A unit-test stand-in for constraints.Constraint: a fixed allowed set."""

    def __init__(self, allowed):
        self.bits = pack_bitmask(allowed)

    @staticmethod
    def fill_rows(items, bits):
        for i, c in items:
            bits[i] = c.bits


def test_fill_bitmasks_combines_static_masks_and_constraints():
    V = 70
    a = np.zeros(V, bool)
    a[[1, 2, 3, 40]] = True
    b = np.zeros(V, bool)
    b[[3, 40, 69]] = True
    c = np.zeros(V, bool)
    c[[5]] = True

    def row(mask=None, cons=None):
        return PlanRow(0, [1], 0, 1, [0], [1], [], None, mask=mask, constraint=cons)
    assert fill_bitmasks([row(), row()], V) is None
    bits = fill_bitmasks([row(), row(mask=pack_bitmask(a)), row(cons=_FixedConstraint(b)),
                          row(mask=pack_bitmask(a), cons=_FixedConstraint(b)),
                          row(mask=pack_bitmask(a), cons=_FixedConstraint(c))], V)
    got = unpack_bitmask(bits, V)
    assert got[0].all() and np.array_equal(got[1], a) and np.array_equal(got[2], b)
    assert np.array_equal(got[3], a & b)
    assert np.array_equal(got[4], c)  # nothing in common: the constraint's tokens alone


# ---- compiling (the real tokenizer, no model run) --------------------------------------------

@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    from orcd_grpc.tokenizer import Tokenizer

    return Tokenizer.from_gguf_file(smollm2_path)


def _req(**kind):
    return pb.ExecuteRequest(text="x", constraint=pb.Constraint(**kind))


def _allowed(c: constraints.Constraint, vocab: int) -> np.ndarray:
    bits = np.zeros((1, bitmask_words(vocab)), np.int32)
    c.fill(bits, 0)
    return unpack_bitmask(bits[0], vocab)


@pytest.mark.parametrize("kind,spec,needle", [
    ("regex", "(ab", "unclosed group"),
    ("json_schema", '{"type": "object", "properties": {"a": {"type": "bogus"}}}', "bogus"),
    ("json_schema", '{"type": "object", "minProperties": "x"}', ""),
    ("lark_grammar", "start: foo", "foo"),
    ("gbnf", 'root ::= "a" missing', "missing"),
])
def test_bad_specs_name_the_field_and_the_place(smol_tok, kind, spec, needle):
    with pytest.raises(InvalidArgument) as e:
        constraints.from_request(_req(**{kind: spec}), smol_tok, smol_tok.vocab_size)
    assert e.value.field == f"constraint.{kind}" and needle in str(e.value)


def test_static_checks_bound_the_spec():
    with pytest.raises(InvalidArgument) as e:
        constraints.check_static(_req(regex="a" * (constraints.MAX_SPEC_BYTES + 1)))
    assert e.value.field == "constraint.regex" and "65536" in str(e.value)
    with pytest.raises(InvalidArgument) as e:
        constraints.check_static(_req(json_schema="{not json"))
    assert e.value.field == "constraint.json_schema" and "not valid JSON" in str(e.value)
    with pytest.raises(InvalidArgument) as e:
        constraints.check_static(_req(json_schema="[1, 2]"))
    assert e.value.field == "constraint.json_schema"
    with pytest.raises(InvalidArgument) as e:
        constraints.check_static(_req(lark_grammar="   "))
    assert e.value.field == "constraint.lark_grammar"
    constraints.check_static(_req(json_object=False))  # false: no constraint
    assert constraints.which(_req(json_object=False)) is None


def test_compile_deadline_and_pending_limit(smol_tok, monkeypatch):
    # A compile slower than its deadline (made slow here): refused with the field, and the
    # matcher it makes late is freed.
    before = constraints.live_matchers()
    real = constraints._build
    monkeypatch.setattr(constraints, "_build", lambda *a: (time.sleep(0.5), real(*a))[1])
    with pytest.raises(InvalidArgument) as e:
        constraints.compile_spec("regex", "[a-z]{1,50}@[a-z]{1,50}", smol_tok, smol_tok.vocab_size, timeout_s=0.05)
    assert e.value.field == "constraint.regex" and "longer than" in str(e.value)
    deadline = time.monotonic() + 10
    while constraints.live_matchers() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert constraints.live_matchers() == before
    # No place left for another compile: RESOURCE_EXHAUSTED, not a queue that grows.
    import threading

    from orcd_grpc.errors import ResourceExhausted
    monkeypatch.setattr(constraints, "_pending", threading.BoundedSemaphore(1))
    constraints._pending.acquire()
    with pytest.raises(ResourceExhausted):
        constraints.compile_spec("regex", "a", smol_tok, smol_tok.vocab_size)


def test_public_compilers_restrict_the_next_token(smol_tok):
    """compile_lark / compile_json_schema (for tool calls): every allowed first token decodes to
    a prefix of the language, and the matcher ends once the output is complete."""
    V = smol_tok.vocab_size
    c = constraints.compile_lark('start: "yes" | "no"', smol_tok, V)
    first = np.flatnonzero(_allowed(c, V))
    assert first.size > 0
    for t in first:
        s = smol_tok.token_bytes(int(t)).decode()
        assert "yes".startswith(s) or "no".startswith(s), s
    for t in smol_tok.encode("no", add_bos=False):
        assert _allowed(c, V)[t]
        c.accept(t)
    assert c.done
    c.close()
    j = constraints.compile_json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                         "required": ["a"], "additionalProperties": False}, smol_tok, V)
    for t in smol_tok.encode('{"a": 7}', add_bos=False):
        assert _allowed(j, V)[t]
        j.accept(t)
    assert j.done
    j.close()


def test_grammar_text_never_becomes_a_control_token(smol_tok):
    """A language that spells a control token's text gets it as plain-text tokens: the control
    token itself is never allowed (text from a client never becomes a control token)."""
    V = smol_tok.vocab_size
    end = smol_tok.encode_special("<|im_end|>", add_bos=False)
    assert len(end) == 1 and smol_tok.is_special(end[0])
    c = constraints.compile_spec("regex", r"<\|im_end\|>", smol_tok, V)
    assert not _allowed(c, V)[end[0]] and _allowed(c, V).any()
    c.close()


def test_matcher_count_follows_close(smol_tok):
    before = constraints.live_matchers()
    c = constraints.compile_spec("regex", "a+", smol_tok, smol_tok.vocab_size)
    assert constraints.live_matchers() == before + 1
    c.close()
    c.close()
    assert constraints.live_matchers() == before
    assert not c.done and _allowed(c, smol_tok.vocab_size).all()  # closed: constrains nothing


def test_constrained_sequences_are_planned_behind_the_step_in_flight(tmp_path):
    """A constrained row is planned behind a step in flight like any decode row, carrying its
    constraint: the runner fills its mask when it samples that step, once the token in flight has
    reached the matcher (tests/test_cuda_runner.py checks that order); a host runner declines."""
    from orcd_grpc.backends.runner import Launched, StepPlan
    from orcd_grpc.loader import load_engine
    from orcd_grpc.sampling import SamplingParams
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/: the tiny-model writer
    from gpu.test_cuda_models import write_tiny_llama

    eng = load_engine(write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0"), backend="cpu", max_sequences=4,
                      max_context=256)
    try:
        planned = []
        eng.runner.launch = lambda plan: planned.append(plan) or Launched(plan, feeds=True)
        allowed = np.zeros(eng.info.vocab_size, bool)
        allowed[[3, 4]] = True
        s = eng.new_sequence([5, 6], SamplingParams(temperature=0.0, constraint=_FixedConstraint(allowed)))
        assert eng.launch([s]) is not None and planned[-1].rows[0].constraint is s.constraint
        after = Launched(StepPlan(planned[-1].rows, 16), feeds=True)  # that step, its samples not read
        s.output_ids.append(3)
        fed = eng.launch([s], after=after)
        assert fed is not None and len(planned) == 2
        row = planned[-1].rows[0]
        assert row.tokens is None and row.constraint is s.constraint and planned[-1].after is None
    finally:
        eng.close()


# ---- through a real server: SmolLM2 ----------------------------------------------------------

@pytest.fixture(scope="module")
def smol(real_server, smollm2_path):
    return real_server(smollm2_path, max_sequences=16)


def _execute(srv, constraint, *, chat=None, text=None, max_tokens=48, temperature=0.7, seed=1, timeout=600):
    req = pb.ExecuteRequest(constraint=constraint, sampling=pb.SamplingParams(temperature=temperature, seed=seed),
                            stopping=pb.StoppingCriteria(max_tokens=max_tokens))
    if chat is not None:
        req.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=chat)]))
    else:
        req.text = text
    events = list(srv.stub.Execute(req, timeout=timeout))
    toks = [e.token for e in events if e.HasField("token")]
    return "".join(t.text for t in toks), events[-1].finished, [t.token_id for t in toks]


def _many(srv, jobs):
    """Runs (constraint, kwargs) jobs at once, so they share the server's steps."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
        return list(ex.map(lambda j: _execute(srv, j[0], **j[1]), jobs))


def _wait_idle(srv, free_before):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if srv.scheduler.stats()["live"] == 0 and srv.scheduler.engine.free_blocks() == free_before \
                and constraints.live_matchers() == 0:
            return
        time.sleep(0.05)
    raise AssertionError((srv.scheduler.stats(), srv.scheduler.engine.free_blocks(), free_before,
                          constraints.live_matchers()))


@pytest.mark.slow
def test_smollm2_json_schemas_give_valid_json(smol):
    """The corpus's CI schemas (nesting, enums, arrays with min/maxItems, string patterns,
    optional fields, bounded numbers and integers), sampled at temperature 0.7 with seeds: every
    output parses and validates against its schema, and ends with a stop finish."""
    free = smol.scheduler.engine.free_blocks()
    cases = [c for c in CORPUS if c["ci"]]
    assert len(cases) >= 8
    jobs = [(pb.Constraint(json_schema=json.dumps(c["schema"])), {"chat": c["prompt"], "seed": 100 + i})
            for i, c in enumerate(cases)]
    for c, (text, fin, _) in zip(cases, _many(smol, jobs)):
        assert fin.reason == pb.FINISH_REASON_STOP_TOKEN, (c["name"], text)
        jsonschema.validate(json.loads(text), c["schema"])
    _wait_idle(smol, free)


@pytest.mark.slow
def test_smollm2_regex_lark_gbnf_and_json_object(smol):
    free = smol.scheduler.engine.free_blocks()
    regexes = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,8} [A-Z][a-z]{1,8}", r"\([0-9]{2}\) ok"]
    lark = '''start: greeting " " name "!"
greeting: "Hello" | "Hi"
name: /[A-Z][a-z]{1,6}/'''
    gbnf = 'root ::= "id-" [0-9] [0-9] [0-9]? "."'
    jobs = [(pb.Constraint(regex=r), {"chat": "Answer briefly.", "seed": i}) for i, r in enumerate(regexes)]
    jobs += [(pb.Constraint(lark_grammar=lark), {"chat": "Greet someone.", "seed": 7}),
             (pb.Constraint(gbnf=gbnf), {"chat": "Give an id.", "seed": 8}),
             (pb.Constraint(json_object=True), {"chat": "Give a tiny JSON object.", "seed": 9, "max_tokens": 24})]
    out = _many(smol, jobs)
    for r, (text, fin, _) in zip(regexes, out):
        assert fin.reason == pb.FINISH_REASON_STOP_TOKEN and re.fullmatch(r, text), (r, text)
    text, fin, _ = out[len(regexes)]
    assert fin.reason == pb.FINISH_REASON_STOP_TOKEN and re.fullmatch(r"(Hello|Hi) [A-Z][a-z]{1,6}!", text), text
    text, fin, _ = out[len(regexes) + 1]
    assert fin.reason == pb.FINISH_REASON_STOP_TOKEN and re.fullmatch(r"id-[0-9]{2,3}\.", text), text
    text, fin, _ = out[-1]
    if fin.reason == pb.FINISH_REASON_STOP_TOKEN:
        assert isinstance(json.loads(text), dict), text
    else:  # cut by max_tokens: still a prefix of an object
        assert fin.reason == pb.FINISH_REASON_LENGTH and text.lstrip().startswith("{"), text
    _wait_idle(smol, free)


@pytest.mark.slow
def test_smollm2_limits_still_apply(smol):
    """max_tokens cuts a constrained output (LENGTH), and stop strings still end it."""
    text, fin, ids = _execute(smol, pb.Constraint(regex="[a-z]{40}"), text="Letters:", max_tokens=3)
    assert fin.reason == pb.FINISH_REASON_LENGTH and len(ids) == 3 and re.fullmatch("[a-z]*", text)
    req = pb.ExecuteRequest(text="Count:", constraint=pb.Constraint(regex="(ab)+c"),
                            sampling=pb.SamplingParams(temperature=0.0),
                            stopping=pb.StoppingCriteria(max_tokens=30, stop=["b"]))
    events = list(smol.stub.Execute(req, timeout=300))
    fin = events[-1].finished
    assert fin.reason == pb.FINISH_REASON_STOP_STRING and fin.matched_stop == "b"


@pytest.mark.slow
@pytest.mark.parametrize("kind,spec", [
    ("regex", "(ab"), ("json_schema", "{oops"), ("json_schema", '{"type": "bogus"}'),
    ("lark_grammar", "start: undefined_rule"), ("gbnf", "root ::= ("),
    ("regex", "a" * (70 << 10)),
])
def test_smollm2_bad_specs_are_invalid_argument(smol, kind, spec):
    free = smol.scheduler.engine.free_blocks()
    with pytest.raises(grpc.RpcError) as e:
        _execute(smol, pb.Constraint(**{kind: spec}), text="x")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"constraint.{kind}" in e.value.details()
    _wait_idle(smol, free)


@pytest.mark.slow
def test_smollm2_cancel_and_disconnect_free_the_matcher(smol):
    """A constrained request cancelled mid-stream, or whose client goes away, frees its matcher
    and KV blocks."""
    free = smol.scheduler.engine.free_blocks()
    req = pb.ExecuteRequest(request_id="cons-cancel", text="Write letters:", constraint=pb.Constraint(regex="[a-z ]+"),
                            sampling=pb.SamplingParams(temperature=0.8, seed=3),
                            stopping=pb.StoppingCriteria(max_tokens=200))
    stream = smol.stub.Execute(req, timeout=300)
    next(stream)  # started
    next(stream)  # a token: it runs
    assert constraints.live_matchers() == 1
    assert smol.stub.Cancel(pb.CancelRequest(request_id="cons-cancel")).cancelled
    last = list(stream)[-1]
    assert last.finished.reason == pb.FINISH_REASON_CANCELLED
    _wait_idle(smol, free)
    stream = smol.stub.Execute(req, timeout=300)
    next(stream)
    next(stream)
    stream.cancel()  # the client goes away
    _wait_idle(smol, free)


# ---- Gemma 3 270M -------------------------------------------------------------------------------

@pytest.mark.slow
def test_gemma3_regex_and_schema(real_server, gemma3_path):
    """Gemma 3's 262k vocabulary and its own control tokens: a regex and a small schema."""
    srv = real_server(gemma3_path, max_sequences=4)
    free = srv.scheduler.engine.free_blocks()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    (t1, f1, _), (t2, f2, _) = _many(srv, [
        (pb.Constraint(regex="(yes|no)"), {"text": "Is the sky blue? Answer:", "seed": 1, "max_tokens": 4}),
        (pb.Constraint(json_schema=json.dumps(schema)), {"text": "JSON:", "seed": 2, "max_tokens": 16})])
    assert f1.reason == pb.FINISH_REASON_STOP_TOKEN and t1 in ("yes", "no"), t1
    assert f2.reason == pb.FINISH_REASON_STOP_TOKEN, t2
    jsonschema.validate(json.loads(t2), schema)
    _wait_idle(srv, free)


def test_llguidance_tokenizer_is_cached_per_tokenizer_and_freed_with_it(smollm2_path):
    """Built once per loaded tokenizer (not per request), and gone once the model's tokenizer is:
    a model swap leaves no vocabulary behind."""
    import gc
    import weakref

    from orcd_grpc.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_file(smollm2_path)
    lt = constraints.ll_tokenizer(tok, tok.vocab_size)
    assert constraints.ll_tokenizer(tok, tok.vocab_size) is lt
    c = constraints.compile_spec("regex", "[0-9]+", tok, tok.vocab_size)
    c.close()
    ref = weakref.ref(tok)
    del tok, lt, c
    gc.collect()
    assert ref() is None


def test_our_mask_slices_change_no_mask(smol_tok):
    """constraints.slices() only speeds the fill: along random walks through a schema of bounded
    strings (where the added short runs apply), every mask equals the one llguidance computes with
    no slices at all (the plain trie walk)."""
    import json

    import llguidance as llg
    from llguidance.numpy import fill_next_token_bitmask

    V = smol_tok.vocab_size
    ours = constraints.ll_tokenizer(smol_tok, V)
    plain = llg.LLTokenizer(constraints._Vocab(smol_tok), n_vocab=V, eos_token=sorted(smol_tok.eos_ids), slices=[])
    spec = {"type": "array", "minItems": 40, "items": {
        "type": "object", "required": ["a", "b", "n"], "additionalProperties": False,
        "properties": {"a": {"type": "string", "maxLength": 7}, "b": {"type": "string", "minLength": 2, "maxLength": 19},
                       "n": {"type": "integer"}}}}
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults=constraints.JSON_OPTIONS)
    rng = np.random.default_rng()
    steps_in_strings = 0
    for _ in range(3):
        m1, m2 = llg.LLMatcher(ours, grammar), llg.LLMatcher(plain, grammar)
        bits = np.zeros((2, bitmask_words(V)), np.int32)
        for _ in range(120):
            fill_next_token_bitmask(m1, bits, 0)
            fill_next_token_bitmask(m2, bits, 1)
            assert np.array_equal(bits[0], bits[1])
            allowed = np.flatnonzero(unpack_bitmask(bits[0], V))
            steps_in_strings += allowed.size > V // 4  # string content: most of the vocabulary allowed
            t = int(rng.choice(allowed))
            assert m1.consume_token(t) and m2.consume_token(t)
            if m1.is_stopped():
                break
    assert steps_in_strings >= 20


def test_python_client_builds_constraints():
    from orcd_grpc.client import build_request

    r = build_request("x", constraint={"json_schema": {"type": "object"}})
    assert json.loads(r.constraint.json_schema) == {"type": "object"}
    assert build_request("x", constraint={"regex": "a+"}).constraint.regex == "a+"
    assert build_request("x", constraint={"json_object": True}).constraint.json_object
    with pytest.raises(ValueError):
        build_request("x", constraint={"regex": "a", "gbnf": "b"})


@pytest.mark.slow
def test_smollm2_a_matcher_past_its_step_limits_fails_the_request(smol, monkeypatch):
    """A grammar that outgrows llguidance's per-step limits while generating (made tiny here)
    ends its request with RESOURCE_EXHAUSTED naming the field, not a silent stop, and frees all."""
    import llguidance as llg

    free = smol.scheduler.engine.free_blocks()
    monkeypatch.setattr(constraints, "_limits", lambda: llg.LLParserLimits(step_max_items=5))
    with pytest.raises(grpc.RpcError) as e:
        _execute(smol, pb.Constraint(json_schema='{"type": "object"}'), text="JSON:", max_tokens=8)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "constraint.json_schema" in e.value.details() and "Too many items" in e.value.details()
    _wait_idle(smol, free)


def test_json_whitespace_is_bounded_per_gap(smol_tok):
    """Pretty-printed JSON passes; a gap of more than 32 whitespace characters does not (a model
    cannot pad an object until max_tokens)."""
    V = smol_tok.vocab_size
    ok = constraints.compile_spec("json_object", None, smol_tok, V)
    pretty = '{\n  "a": [\n    true,\n    false\n  ]\n}'
    for t in smol_tok.encode(pretty, add_bos=False):
        assert _allowed(ok, V)[t]
        ok.accept(t)
    assert ok.done
    ok.close()
    pad = constraints.compile_spec("json_object", None, smol_tok, V)
    ids = smol_tok.encode("{" + "\n" * 40, add_bos=False)
    allowed_all = True
    for t in ids:
        allowed_all &= bool(_allowed(pad, V)[t])
        pad.accept(t)
    assert not allowed_all
    pad.close()


def test_open_numbers_are_bounded_in_the_grammar_only():
    """A number or integer the schema leaves open gets a range (and a number a 1e-9 step) in the
    copy compiled to a grammar; bounds the schema sets, and data (const, enum), are kept as written."""
    schema = {"type": "object", "properties": {
        "n": {"type": "number"}, "i": {"type": "integer"}, "k": {"type": ["integer", "null"], "minimum": 5},
        "x": {"type": "number", "maximum": 1e30, "multipleOf": 0.25},
        "c": {"const": {"type": "number"}}, "e": {"enum": [{"type": "integer"}]}}}
    out = constraints.bounded_numbers(schema)
    p = out["properties"]
    assert p["n"] == {"type": "number", "minimum": -1e15, "maximum": 1e15, "multipleOf": 1e-9}
    assert p["i"] == {"type": "integer", "minimum": -(2 ** 53 - 1), "maximum": 2 ** 53 - 1}
    assert p["k"]["minimum"] == 5 and p["k"]["maximum"] == 5 + 2 ** 53 - 1 and "multipleOf" not in p["k"]
    assert p["x"] == {"type": "number", "maximum": 1e30, "multipleOf": 0.25}  # past the bound: as written
    assert constraints.bounded_numbers({"type": "number", "maximum": 7})["minimum"] == -1e15
    assert p["c"] == {"const": {"type": "number"}} and p["e"] == {"enum": [{"type": "integer"}]}
    assert schema["properties"]["n"] == {"type": "number"}  # the client's schema is not changed


def test_open_numbers_cannot_run_to_max_tokens(smol_tok):
    """Digits past the bound are refused (a model wrote 140-digit numbers into the corpus before);
    ordinary numbers still pass."""
    V = smol_tok.vocab_size

    def accepts(schema, text):
        c = constraints.compile_json_schema(schema, smol_tok, V)
        try:
            for t in smol_tok.encode(text, add_bos=False):
                if not _allowed(c, V)[t]:
                    return False
                c.accept(t)
            return c.done or c._m.is_accepting()
        finally:
            c.close()

    num, integer = {"type": "number"}, {"type": "integer"}
    assert accepts(num, "30.138911") and accepts(num, "-5") and accepts(integer, "9007199254740991")
    assert not accepts(num, "30.1389115004389088661")
    assert not accepts(integer, "50641000000000001111")
    assert accepts({"type": "number", "minimum": 10}, "12.5") and not accepts({"type": "number", "minimum": 10}, "9")
