"""Constrained output: a request's JSON schema, regex or grammar as a per-request llguidance matcher.

llguidance (https://github.com/guidance-ai/llguidance) compiles the spec against the model's
vocabulary and, per step, gives the set of tokens that keep the output inside the language as a
packed bitmask (int32 words, bit t % 32 of word t // 32). The engine hands each constrained row's
`Constraint` to the runner in its PlanRow; the runner fills the bitmask while the step's forward
runs and applies it where it samples (host: NumPy; CUDA: the sample kernel). The scheduler feeds
each accepted token back (`Constraint.accept`) and ends the output when the matcher is stopped.

Compilation happens once per request, before it is queued, on a small pool of threads with a
deadline (llguidance drops the GIL while it compiles), under llguidance's own resource limits
(`LIMITS`), so a client's grammar never holds the RPC thread or the engine for long.

`compile_json_schema` / `compile_lark` are the entry points for code that builds constraints of
its own (tool calls with tool_choice "required" or a named function).
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
import weakref

import numpy as np

from .errors import InvalidArgument, ResourceExhausted

MAX_SPEC_BYTES = 64 << 10     # a schema or grammar larger than this is refused before compiling
COMPILE_TIMEOUT_S = 5.0       # compiling a spec past this is refused (the limits below bound it too)
COMPILE_THREADS = 2           # compilations at once; more wait for a place, within the deadline
MAX_PENDING_COMPILES = 16     # compilations waiting or running; more: RESOURCE_EXHAUSTED

FIELDS = ("json_schema", "json_object", "regex", "lark_grammar", "gbnf")
# Whitespace between JSON tokens: free (pretty-printed JSON is what models write) but at most 32
# characters a gap, so a model cannot pad an object with newlines until max_tokens (SmolLM2 did,
# on one schema in fifty, before this bound). A schema's own "x-guidance" options override it.
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}

# llguidance's mask "slices": vocabulary subsets precomputed per tokenizer, whose tokens are all
# allowed at once wherever the lexer allows the slice's whole language, so the token-trie walk
# only visits the rest. Its general set has JSON string runs of 1-10, 1-30 and any length; inside
# a string whose maxLength leaves fewer than ten characters, neither bounded run fits and the walk
# covers the whole trie, the slowest fills of a JSON schema. Shorter runs cover most of those
# states (BENCHMARKS.md, "mask fill"), for a few MB more per vocabulary.
SLICE_RUNS = (3, 6, 10, 16, 30)


def slices() -> list[str]:
    """llguidance's general slices with the bounded string runs of SLICE_RUNS in place of its own."""
    import llguidance as llg

    general = list(llg.LLTokenizer.general_slices())
    bounded = [g for g in general if "{1," in g]
    if not bounded:  # a llguidance whose set differs: keep it as it is
        return general
    run = bounded[0].split("{1,")[0]  # the string-character class, as llguidance spells it
    others = [g for g in general if not g.startswith(run)]
    return others + [f"{run}{{1,{n}}}" for n in SLICE_RUNS] + [g for g in general if g.startswith(run) and "{1," not in g]


def _limits():
    import llguidance as llg

    # Per step, llguidance's defaults (about 14 ms of lexer work and 2.5 ms of Earley items at its
    # quoted speeds, against ~50 us for a typical JSON schema): a grammar past them fails its
    # request (Constraint.error) rather than stalling the batch. Compiling: a grammar of at most
    # 100k symbols and 100k lexer states (a fifth and two fifths of the defaults; ~1-2 kB a state).
    return llg.LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                              step_max_items=50_000, max_lexer_states=100_000, max_grammar_size=100_000)


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="orcd-grammar")
_pending = threading.BoundedSemaphore(MAX_PENDING_COMPILES)
_lock = threading.RLock()        # the live count (also taken from __del__, hence reentrant)
_tok_lock = threading.Lock()     # building a vocabulary's LLTokenizer (a second or two for 262k tokens)
_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # orcd Tokenizer -> {vocab: LLTokenizer}
_executor = None
_live = 0  # matchers not yet closed (tests check that requests free theirs)


def live_matchers() -> int:
    return _live


# ---- the model's vocabulary as llguidance sees it ----------------------------------------------

class _Vocab:
    """What llguidance.LLTokenizer reads of a tokenizer (llguidance.TokenizerWrapper's fields):
    every id's bytes, which ids are control tokens (never produced by grammar text), and an
    encoder for plain text (control-token text in it stays text)."""

    def __init__(self, tok):
        # weakly: the LLTokenizer keeps this object, and is cached under tok (a weak key) for as
        # long as the model's tokenizer lives; a strong reference would keep both alive forever
        self._tok = weakref.ref(tok)
        self.eos_token_id = min(tok.eos_ids) if tok.eos_ids else 0
        self.bos_token_id = tok.bos_id
        self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_special(i)]
        self.is_tokenizer_wrapper = True

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        tok = self._tok()
        return [] if tok is None else tok.encode(text, add_bos=False)


def ll_tokenizer(tokenizer, vocab_size: int):
    """The llguidance tokenizer of an orcd Tokenizer, built once per tokenizer (a loaded model
    keeps one) and width (vocab_size: the logits' width, which may exceed the tokenizer's)."""
    import llguidance as llg

    with _tok_lock:
        per = _tokenizers.setdefault(tokenizer, {})
        lt = per.get(vocab_size)
        if lt is None:
            eos = sorted(int(t) for t in tokenizer.eos_ids) or None
            lt = per[vocab_size] = llg.LLTokenizer(_Vocab(tokenizer), n_vocab=int(vocab_size), eos_token=eos,
                                                   slices=slices())
        return lt


# ---- the spec -----------------------------------------------------------------------------------

def which(req) -> str | None:
    """The request's constraint kind, or None (unset, or json_object false)."""
    if not req.HasField("constraint"):
        return None
    kind = req.constraint.WhichOneof("kind")
    if kind == "json_object" and not req.constraint.json_object:
        return None
    return kind


def check_static(req) -> None:
    """Model-independent checks of ExecuteRequest.constraint: size, and JSON syntax of a schema."""
    kind = which(req)
    if kind is None or kind == "json_object":
        return
    spec = getattr(req.constraint, kind)
    field = f"constraint.{kind}"
    n = len(spec.encode("utf-8"))
    if not spec.strip():
        raise InvalidArgument("must not be empty", field=field)
    if n > MAX_SPEC_BYTES:
        raise InvalidArgument(f"at most {MAX_SPEC_BYTES} bytes, got {n}", field=field)
    if kind == "json_schema":
        _schema(spec, field)


def _schema(spec: str, field: str):
    try:
        schema = json.loads(spec)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"not valid JSON: {exc}", field=field) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidArgument(f"a schema is a JSON object or boolean, got {type(schema).__name__}", field=field)
    return schema


# Numbers in a generated JSON value: a schema that bounds a number neither in range nor in
# precision lets a model write digits until max_tokens (Gemma 3 and SmolLM2 did, on two schemas in
# fifty). Where the schema leaves them open, the grammar (not the schema the output is checked
# against) takes a number's integer part to 16 digits and its fraction to 9, without an exponent,
# and an integer to what a double holds exactly: every output still validates.
NUMBER_BOUND = 1e15
NUMBER_STEP = 1e-9
INTEGER_BOUND = 2 ** 53 - 1
_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples", "x-guidance"})


def bounded_numbers(node):
    """A copy of a JSON schema with every open number or integer bounded (see NUMBER_BOUND)."""
    if isinstance(node, list):
        return [bounded_numbers(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in _NOT_SCHEMAS else bounded_numbers(v)) for k, v in node.items()}
    t = node.get("type")
    types = set(t) if isinstance(t, list) else {t}
    if not types & {"number", "integer"} or any(isinstance(node.get(k), bool)
                                                 for k in ("exclusiveMinimum", "exclusiveMaximum")):
        return out  # not numeric, or draft-4 boolean exclusives (left as written)
    integer = "number" not in types
    bound = INTEGER_BOUND if integer else NUMBER_BOUND
    lo = node.get("minimum", node.get("exclusiveMinimum"))
    hi = node.get("maximum", node.get("exclusiveMaximum"))
    if not all(isinstance(x, (int, float)) and abs(x) <= bound for x in (lo, hi) if x is not None):
        return out  # malformed (llguidance reports them) or beyond the bound: left as written
    if lo is None:
        out["minimum"] = -bound if hi is None else min(-bound, hi - bound)
    if hi is None:
        out["maximum"] = bound if lo is None else max(bound, lo + bound)
    if not integer and "multipleOf" not in node:
        out["multipleOf"] = NUMBER_STEP
    return out


def grammar_of(kind: str, spec) -> str:
    """llguidance's grammar (its JSON form) of a spec of `kind` (one of FIELDS)."""
    import llguidance as llg

    field = f"constraint.{kind}"
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        schema = _schema(spec, field) if isinstance(spec, str) else spec
        try:
            try:
                return llg.LLMatcher.grammar_from_json_schema(bounded_numbers(schema), defaults=JSON_OPTIONS)
            except (ValueError, TypeError):  # the schema as written decides what is wrong with it
                return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(str(exc), field=field) from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec)
    if kind == "lark_grammar":
        return llg.LLMatcher.grammar_from_lark(spec)
    if kind == "gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            return llg.LLMatcher.grammar_from_lark(gbnf_to_lark(spec))
        except Exception as exc:  # the converter's own parse errors (GbnfToLarkError and plain ones)
            raise InvalidArgument(f"not valid GBNF: {exc}", field=field) from None
    raise InvalidArgument(f"unknown constraint kind {kind!r}", field="constraint")


# ---- the matcher --------------------------------------------------------------------------------

class Constraint:
    """One request's matcher: the tokens allowed next, fed each token the request accepts."""

    __slots__ = ("_m", "kind", "__weakref__")

    def __init__(self, matcher, kind: str):
        global _live
        self._m, self.kind = matcher, kind
        if matcher is not None:
            with _lock:
                _live += 1

    def fill(self, bits: np.ndarray, index: int) -> None:
        """Row `index` of bits (int32 [R, ceil(V / 32)]): the tokens allowed next."""
        from llguidance.numpy import fill_next_token_bitmask

        if self._m is None:  # closed (its request ended): no constraint left to apply
            bits[index] = -1
            return
        fill_next_token_bitmask(self._m, bits, index)

    @staticmethod
    def fill_rows(items: "list[tuple[int, Constraint]]", bits: np.ndarray) -> None:
        """fill() of several rows at once, on llguidance's own threads (the GIL is dropped)."""
        if len(items) == 1:
            i, c = items[0]
            c.fill(bits, i)
            return
        from llguidance.numpy import fill_next_token_bitmask_par

        live = [(c._m, i) for i, c in items if c._m is not None]
        for i, c in items:
            if c._m is None:
                bits[i] = -1
        if live:
            fill_next_token_bitmask_par(_ll_executor(), live, bits)

    def copy(self) -> "Constraint":
        """A matcher of its own in the same state (a parallel sample's)."""
        return Constraint(None if self._m is None else self._m.deep_copy(), self.kind)

    def accept(self, token: int) -> None:
        """Advances past a token the request took. A token outside the language (only possible
        when a mask was not applied) puts the matcher in its error state, which allows only EOS."""
        if self._m is not None:
            self._m.consume_token(int(token))

    @property
    def error(self) -> "ResourceExhausted | None":
        """The matcher's failure, if it failed: a grammar that outgrew llguidance's per-step
        limits while generating (its mask then allows only EOS)."""
        if self._m is None or not self._m.is_error():
            return None
        return ResourceExhausted(f"the constraint stopped: {self._m.get_error().strip()[:500]}",
                                 field=f"constraint.{self.kind}")

    @property
    def done(self) -> bool:
        """The output is complete: nothing may follow but the end-of-sequence token."""
        return self._m is not None and self._m.is_stopped()

    def close(self) -> None:
        global _live
        if self._m is not None:
            self._m = None
            with _lock:
                _live -= 1

    def __del__(self):
        self.close()


def _ll_executor():
    global _executor
    if _executor is None:
        import llguidance as llg

        with _tok_lock:
            if _executor is None:
                _executor = llg.LLExecutor()
    return _executor


def _build(tokenizer, vocab_size: int, grammar: str, kind: str) -> Constraint:
    import llguidance as llg

    lt = ll_tokenizer(tokenizer, vocab_size)
    m = llg.LLMatcher(lt, grammar, log_level=0, limits=_limits())
    if m.is_error():
        raise InvalidArgument(m.get_error().strip(), field=f"constraint.{kind}")
    return Constraint(m, kind)


def compile_spec(kind: str, spec, tokenizer, vocab_size: int, timeout_s: float = COMPILE_TIMEOUT_S) -> Constraint:
    """A matcher for `spec` (a FIELDS kind) over the model's vocabulary, compiled on the grammar
    threads within timeout_s. INVALID_ARGUMENT (field "constraint.<kind>") when it does not
    compile or takes too long; RESOURCE_EXHAUSTED when too many compilations are under way."""
    grammar = grammar_of(kind, spec)
    # Once per loaded tokenizer, and bounded by the vocabulary, not by the spec: outside the deadline.
    ll_tokenizer(tokenizer, vocab_size)
    if not _pending.acquire(blocking=False):
        raise ResourceExhausted(f"{MAX_PENDING_COMPILES} constraints are being compiled; retry",
                                field=f"constraint.{kind}", retry_after_ms=200)
    try:
        fut = _pool.submit(_build, tokenizer, vocab_size, grammar, kind)
    except BaseException:
        _pending.release()
        raise
    fut.add_done_callback(lambda _f: _pending.release())
    try:
        return fut.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        # The compile runs on to its limits on its thread; its matcher is dropped when it ends.
        fut.add_done_callback(_close_result)
        raise InvalidArgument(f"compiling took longer than {timeout_s:g} s; simplify the grammar",
                              field=f"constraint.{kind}") from None


def _close_result(fut) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


def from_request(req, tokenizer, vocab_size: int) -> Constraint | None:
    """ExecuteRequest.constraint compiled against the model (None when unset)."""
    kind = which(req)
    if kind is None:
        return None
    return compile_spec(kind, None if kind == "json_object" else getattr(req.constraint, kind), tokenizer, vocab_size)


def compile_json_schema(schema, tokenizer, vocab_size: int) -> Constraint:
    """A matcher for a JSON schema (str or dict): for callers that build their own constraints."""
    return compile_spec("json_schema", schema if isinstance(schema, str) else json.dumps(schema), tokenizer,
                        vocab_size)


def compile_lark(grammar: str, tokenizer, vocab_size: int) -> Constraint:
    """A matcher for a Lark grammar (llguidance's syntax): for callers that build their own."""
    return compile_spec("lark_grammar", grammar, tokenizer, vocab_size)
