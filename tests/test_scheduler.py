"""Scheduler unit tests against a scripted fake engine (the real one is in the integration suite)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from orcd_grpc.engine import ModelInfo
from orcd_grpc.kv_cache import BlockAllocator
from orcd_grpc.errors import AlreadyExists, FailedPrecondition, Internal, NotFound, ResourceExhausted
from orcd_grpc.request import (CANCELLED, LENGTH, MODEL_SWAPPED, STOP_STRING, STOP_TOKEN, ErrorEvent, FinishedEvent,
                               Request, Stopping, TokenEvent, Unavailable)
from orcd_grpc.scheduler import Scheduler

BOS, EOS = 0, 1
VOCAB = 300


class FakeTokenizer:
    """Byte-level: id b+2 is byte b; 0 is BOS, 1 is EOS."""

    vocab_size = VOCAB
    bos_id = BOS
    eos_ids = frozenset({EOS})
    add_bos = True
    chat_template = "{{ messages }}"

    def encode(self, text, add_bos=None):
        bos = self.add_bos if add_bos is None else add_bos
        return ([BOS] if bos else []) + [b + 2 for b in text.encode("utf-8")]

    def encode_special(self, text, add_bos=None):
        return self.encode(text, add_bos)

    def token_bytes(self, tid):
        if tid == BOS:
            return b"<s>"
        if tid == EOS:
            return b"</s>"
        return bytes([tid - 2]) if 2 <= tid < 258 else b""

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")

    def render_chat(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


class FakeDecoder:
    """Holds back text that could still become a stop string; UTF-8 safety via incremental bytes."""

    def __init__(self, tokenizer, stop):
        self.tok, self.stop, self.buf, self.pending = tokenizer, stop, b"", ""

    def push(self, tid):
        self.buf += self.tok.token_bytes(tid)
        try:
            text = self.buf.decode("utf-8")
        except UnicodeDecodeError:
            return "", None
        self.buf = b""
        self.pending += text
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, s
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, None

    def flush(self):
        out, self.pending = self.pending + self.buf.decode("utf-8", "replace"), ""
        self.buf = b""
        return out


@dataclass
class Sample:
    token_id: int
    logprob: float = -0.5
    top: list = field(default_factory=list)
    following: list = field(default_factory=list)  # a verify step's further tokens (TokenSample's)


def _top(sampling):
    # Scheduler tests pass a bare int; servicer tests pass real SamplingParams.
    return sampling if isinstance(sampling, int) else int(getattr(sampling, "top_logprobs", 0))


class FakeSeq:
    def __init__(self, seq_id, prompt_ids, sampling):
        self.seq_id, self.prompt_ids, self.sampling = seq_id, list(prompt_ids), sampling
        self.output_ids, self.num_cached, self.cached_prompt_tokens, self.blocks = [], 0, 0, 0
        self.constraint = None

    def append(self, token):
        self.output_ids.append(token)

    @property
    def total_len(self):
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_remaining(self):
        return max(0, len(self.prompt_ids) - self.num_cached)


class FakeEngine:
    """Emits `script` (token ids, cycling) for every sequence; paged KV with 4-token blocks."""

    BLOCK = 4

    def __init__(self, script=None, *, blocks=64, context_length=64, max_sequences=8, step_delay=0.0,
                 model_id="fake"):
        self.script = list(script or [b + 2 for b in b"hello world"])
        self.tokenizer = FakeTokenizer()
        self.info = ModelInfo(
            model_id=model_id, path=f"/models/{model_id}.gguf", architecture="llama", name="Fake", parameters=1000,
            tensor_types={"F32": 3}, context_length=context_length, trained_context_length=context_length,
            vocab_size=VOCAB, weights_bytes=4000, kv_cache_bytes=2000, workspace_bytes=10, backend="cpu",
            has_chat_template=True, load_seconds=0.01, max_sequences=max_sequences)
        self._blocks, self._free = blocks, blocks
        self._next = 1
        self.step_delay = step_delay
        self.fail_next: Exception | None = None
        self.steps = 0
        self.exhausted = 0
        self.batch_sizes: list[int] = []
        self.closed = False
        self.lock = threading.Lock()
        # the real prefix-cache bookkeeping, for Probe and WatchEvents; this engine's steps keep
        # their own block counts and never publish a block into it
        self.allocator = BlockAllocator(blocks, self.BLOCK)

    def check_finite(self):  # the swap's test step: a scripted engine's logits are never produced
        pass

    def new_sequence(self, prompt_ids, sampling, max_tokens=0):
        from orcd_grpc.errors import OutOfRange

        if len(prompt_ids) >= self.info.context_length:
            raise OutOfRange("too long", field="input")
        self._next += 1
        return FakeSeq(self._next, prompt_ids, sampling)

    def _need(self, n_tokens):
        return -(-n_tokens // self.BLOCK)

    def can_admit(self, seq):
        return self._need(seq.total_len + 1) - seq.blocks <= self._free

    def free_blocks(self):
        return self._free

    def total_blocks(self):
        return self._blocks

    def release(self, seq):
        self._free += seq.blocks
        seq.blocks = 0
        seq.num_cached = 0

    def launch(self, seqs, token_budget=2048, after=None):
        """The scripted step, at once; the scheduler appends the tokens it delivers. Steps are
        never queued ahead (after)."""
        if after is not None:
            return None
        assert self.lock.acquire(blocking=False), "engine used from two threads at once"
        try:
            self.steps += 1
            self.batch_sizes.append(len(seqs))
            if self.step_delay:
                time.sleep(self.step_delay)
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            out, budget = {}, token_budget
            for s in seqs:
                pending = s.total_len - s.num_cached
                n = min(pending, budget) if s.prefill_remaining > 0 else pending
                need = self._need(s.num_cached + n) - s.blocks
                if need > self._free:
                    self.exhausted += 1
                    raise ResourceExhausted("out of KV blocks")
                self._free -= need
                s.blocks += need
                s.num_cached += n
                budget -= n
                if s.num_cached == s.total_len:
                    tid = self.script[len(s.output_ids) % len(self.script)]
                    out[s.seq_id] = Sample(tid, -0.25, [(tid, -0.25), (EOS, -3.0)][: _top(s.sampling)])
            return out
        finally:
            self.lock.release()

    def collect(self, launched):
        return launched

    def close(self):
        self.closed = True


def make_request(engine, text="hi", *, rid="", stopping=None, top=0, deadline=None):
    ids = engine.tokenizer.encode(text)
    return Request(rid, ids, top, stopping or Stopping(max_tokens=5), engine=engine, model_id=engine.info.model_id,
                   deadline=deadline)


def drain(req, timeout=10.0):
    events = []
    end = time.monotonic() + timeout
    while True:
        ev = req.events.get(timeout=max(0.01, end - time.monotonic()))
        events.append(ev)
        if isinstance(ev, (FinishedEvent, ErrorEvent)):
            return events


def text_of(events):
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


@pytest.fixture
def make_sched():
    made = []

    def make(engine=None, **kw):
        kw.setdefault("decoder_factory", FakeDecoder)
        engines = iter([engine] if engine is not None else [])
        s = Scheduler(loader=lambda path, **_: next(engines), **kw)
        if engine is not None:
            s.load("fake")
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown(0)


def test_generates_until_max_tokens_and_frees_kv(make_sched):
    eng = FakeEngine()
    s = make_sched(eng)
    start_free = eng.free_blocks()
    r = make_request(eng, stopping=Stopping(max_tokens=5))
    s.submit(r)
    events = drain(r)
    fin = events[-1]
    assert isinstance(fin, FinishedEvent) and fin.reason == LENGTH
    assert text_of(events) == "hello"
    assert [e.index for e in events[:-1]] == [0, 1, 2, 3, 4]
    assert fin.completion_tokens == 5 and fin.prompt_tokens == 3
    assert fin.total_ms >= fin.time_to_first_token_ms >= fin.queue_ms >= 0
    assert fin.decode_tokens_per_second > 0
    assert eng.free_blocks() == start_free
    assert s.stats() == {"waiting": 0, "running": 0, "live": 0}


def test_eos_stops_unless_ignored(make_sched):
    eng = FakeEngine(script=[b + 2 for b in b"ab"] + [EOS] + [b + 2 for b in b"cd"])
    s = make_sched(eng)
    r = make_request(eng, stopping=Stopping(max_tokens=10))
    s.submit(r)
    ev = drain(r)
    assert ev[-1].reason == STOP_TOKEN and ev[-1].completion_tokens == 3
    assert ev[-2].token_id == EOS and ev[-2].text == ""
    r2 = make_request(eng, stopping=Stopping(max_tokens=5, ignore_eos=True))
    s.submit(r2)
    ev2 = drain(r2)
    assert ev2[-1].reason == LENGTH and text_of(ev2) == "ab</s>cd"


def test_stop_token_ids(make_sched):
    eng = FakeEngine()
    s = make_sched(eng)
    r = make_request(eng, stopping=Stopping(max_tokens=10, stop_token_ids=frozenset({ord("l") + 2})))
    s.submit(r)
    ev = drain(r)
    assert ev[-1].reason == STOP_TOKEN and text_of(ev) == "he"


def test_stop_string_spanning_tokens_is_not_streamed(make_sched):
    eng = FakeEngine()
    s = make_sched(eng)
    r = make_request(eng, stopping=Stopping(max_tokens=20, stop=["lo w"]))
    s.submit(r)
    ev = drain(r)
    assert ev[-1].reason == STOP_STRING and ev[-1].matched_stop == "lo w"
    assert text_of(ev) == "hel"


def test_context_full_finishes_with_length(make_sched):
    eng = FakeEngine(context_length=8)
    s = make_sched(eng)
    r = make_request(eng, "abc", stopping=Stopping())  # 4 prompt tokens, no max_tokens
    s.submit(r)
    ev = drain(r)
    assert ev[-1].reason == LENGTH and ev[-1].completion_tokens == 4


def test_cancel_by_id_within_one_step_and_unknown_id(make_sched):
    eng = FakeEngine(step_delay=0.02)
    s = make_sched(eng)
    start_free = eng.free_blocks()
    r = make_request(eng, rid="job-1", stopping=Stopping(max_tokens=0))
    s.submit(r)
    first = r.events.get(timeout=5)
    assert isinstance(first, TokenEvent)
    steps_at_cancel = eng.steps
    assert s.cancel("job-1") is True
    ev = drain(r)
    assert ev[-1].reason == CANCELLED
    assert eng.steps - steps_at_cancel <= 2
    assert eng.free_blocks() == start_free
    with pytest.raises(NotFound) as ei:
        s.cancel("job-1")
    assert ei.value.field == "request_id"


def test_deadline_cancels(make_sched):
    eng = FakeEngine(step_delay=0.01)
    s = make_sched(eng)
    start_free = eng.free_blocks()
    r = make_request(eng, stopping=Stopping(max_tokens=0), deadline=time.monotonic() + 0.1)
    s.submit(r)
    ev = drain(r)
    assert ev[-1].reason == CANCELLED and "deadline" in ev[-1].detail
    assert eng.free_blocks() == start_free


def test_duplicate_request_id_and_queue_full(make_sched):
    eng = FakeEngine(step_delay=0.05, max_sequences=1)
    s = make_sched(eng, max_queue=1, max_sequences=1)
    a = make_request(eng, rid="a", stopping=Stopping(max_tokens=3))
    s.submit(a)
    with pytest.raises(AlreadyExists) as ei:
        s.submit(make_request(eng, rid="a"))
    assert ei.value.field == "request_id"
    a.events.get(timeout=5)  # a is running now, so the queue is empty
    s.submit(make_request(eng, rid="b"))
    with pytest.raises(ResourceExhausted) as ei:
        s.submit(make_request(eng, rid="c"))
    assert ei.value.retry_after_ms and ei.value.retry_after_ms >= 100


def test_fifo_and_max_sequences(make_sched):
    eng = FakeEngine(step_delay=0.005)
    s = make_sched(eng, max_sequences=2)
    reqs = [make_request(eng, rid=f"r{i}", stopping=Stopping(max_tokens=3)) for i in range(5)]
    order = []
    lock = threading.Lock()

    def watch(r):
        drain(r)
        with lock:
            order.append(r.request_id)

    threads = [threading.Thread(target=watch, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for r in reqs:
        s.submit(r)
    for t in threads:
        t.join(10)
    assert max(eng.batch_sizes) == 2
    assert sorted(order) == [r.request_id for r in reqs]
    assert order.index("r0") < order.index("r4")


def test_a_request_submitted_while_the_head_starts_is_neither_lost_nor_run_twice(make_sched):
    """Admission starts the queue's head outside the lock; a request submitted meanwhile that sorts
    ahead of it (an earlier arrival: it was stamped before the head, submitted after) must not be
    taken off the queue in the head's place (its client would wait forever, and the head would run
    twice in one batch, a step of nothing, again and again)."""
    eng = FakeEngine(step_delay=0.002)
    s = make_sched(eng, max_sequences=4)
    early = make_request(eng, rid="early", stopping=Stopping(max_tokens=3))
    late = make_request(eng, rid="late", stopping=Stopping(max_tokens=3))
    assert early.arrival < late.arrival
    start = late.start

    def start_and_let_the_early_one_in(*a, **kw):
        if early.key not in s._by_id:
            s.submit(early)
        return start(*a, **kw)

    late.start = start_and_let_the_early_one_in
    s.submit(late)
    for r in (late, early):
        ev = drain(r, timeout=5.0)
        assert isinstance(ev[-1], FinishedEvent) and len([e for e in ev if isinstance(e, TokenEvent)]) == 3, ev
    assert max(eng.batch_sizes) <= 2


def test_a_request_arriving_after_admission_looked_is_not_failed_for_lack_of_kv(make_sched):
    """An iteration with nothing to run (a command woke it) whose admission found the queue empty:
    a request submitted just after must wait for the next iteration, not be failed as one that can
    never be admitted (only the request admission tried and could not fit is)."""
    eng = FakeEngine(step_delay=0.002)
    s = make_sched(eng, max_sequences=4)
    req = make_request(eng, rid="r", stopping=Stopping(max_tokens=2))
    admit = s._admit

    def admit_then_a_request_arrives():
        done = admit()
        if req.key not in s._by_id:
            s.submit(req)
        return done

    s._admit = admit_then_a_request_arrives
    s._run_command(lambda: None)  # an iteration with nothing queued or running
    ev = drain(req, timeout=5.0)
    assert isinstance(ev[-1], FinishedEvent) and len([e for e in ev if isinstance(e, TokenEvent)]) == 2, ev


def test_engine_error_fails_batch_and_keeps_serving(make_sched):
    eng = FakeEngine(step_delay=0.01)
    s = make_sched(eng)
    start_free = eng.free_blocks()
    r = make_request(eng, stopping=Stopping(max_tokens=0))
    s.submit(r)
    r.events.get(timeout=5)
    eng.fail_next = RuntimeError("kernel rmsnorm failed")
    ev = drain(r)
    assert isinstance(ev[-1], ErrorEvent) and isinstance(ev[-1].error, Internal)
    assert "rmsnorm" in str(ev[-1].error)
    assert eng.free_blocks() == start_free
    r2 = make_request(eng, stopping=Stopping(max_tokens=2))
    s.submit(r2)
    assert drain(r2)[-1].reason == LENGTH


def test_preemption_when_kv_runs_out_keeps_output_correct(make_sched):
    # 6 blocks of 4 tokens: two sequences growing to 3+12 tokens each cannot both fit.
    eng = FakeEngine(blocks=6, step_delay=0.001)
    s = make_sched(eng)
    a = make_request(eng, rid="a", stopping=Stopping(max_tokens=11))
    b = make_request(eng, rid="b", stopping=Stopping(max_tokens=11))
    s.submit(a)
    s.submit(b)
    ea, eb = drain(a), drain(b)
    assert text_of(ea) == text_of(eb) == "hello world"
    assert eng.exhausted >= 1
    assert eng.free_blocks() == 6


def test_prompt_larger_than_cache_fails_clearly(make_sched):
    eng = FakeEngine(blocks=2, context_length=64)
    s = make_sched(eng)
    r = make_request(eng, "x" * 20)
    s.submit(r)
    ev = drain(r)
    assert isinstance(ev[-1], ErrorEvent) and isinstance(ev[-1].error, ResourceExhausted)


def test_no_model_and_swap_and_unload(make_sched):
    s = make_sched()
    with pytest.raises(FailedPrecondition):
        s.submit(make_request(FakeEngine()))
    old, new = FakeEngine(step_delay=0.01, model_id="old"), FakeEngine(model_id="new")
    engines = iter([old, new])
    s._loader = lambda path, **_: next(engines)
    s.load("old")
    r = make_request(old, stopping=Stopping(max_tokens=0))
    s.submit(r)
    r.events.get(timeout=5)
    s.load("new")
    assert s.model_info.model_id == "new" and not old.closed  # it still runs r
    with pytest.raises(Unavailable):
        s.submit(make_request(old))  # validated against the old model: new requests go to the new one
    r2 = make_request(new, stopping=Stopping(max_tokens=3))
    s.submit(r2)
    ev = drain(r)
    # the swap let r finish on its own model (at its context length), and freed that model after it
    assert ev[-1].reason == LENGTH and ev[-1].completion_tokens == 64 - r.prompt_tokens
    assert drain(r2)[-1].reason == LENGTH
    deadline = time.monotonic() + 5
    while not old.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old.closed and old.free_blocks() == old.total_blocks()
    with pytest.raises(NotFound):
        s.unload("old")
    s.unload("new")
    assert new.closed and s.engine is None


def test_unload_of_a_swapped_out_model_cancels_its_requests(make_sched):
    old, new = FakeEngine(step_delay=0.01, model_id="old"), FakeEngine(model_id="new")
    engines = iter([old, new])
    s = make_sched()
    s._loader = lambda path, **_: next(engines)
    s.load("old")
    running, queued = (make_request(old, rid=f"r{i}", stopping=Stopping(max_tokens=0)) for i in range(2))
    s.max_sequences = 1  # the second one waits in the queue
    s.submit(running)
    s.submit(queued)
    running.events.get(timeout=5)
    s.load("new")
    s.unload("old")
    fins = [drain(r)[-1] for r in (running, queued)]
    assert fins[0].completion_tokens > 0 and not fins[0].retry_safe  # it streamed: a retry would repeat output
    assert fins[1].completion_tokens == 0 and fins[1].retry_safe
    for fin in fins:
        assert fin.reason == CANCELLED and fin.cancel_reason == MODEL_SWAPPED
        assert fin.retry_safe == (fin.completion_tokens == 0)
    assert old.closed and not new.closed and s.model_info.model_id == "new"


def test_failed_load_keeps_old_model(make_sched):
    eng = FakeEngine()
    s = make_sched(eng)

    def boom(path, **_):
        raise ResourceExhausted("does not fit", field="path")

    s._loader = boom
    with pytest.raises(ResourceExhausted):
        s.load("big")
    assert s.engine is eng and not eng.closed
    r = make_request(eng, stopping=Stopping(max_tokens=2))
    s.submit(r)
    assert drain(r)[-1].reason == LENGTH


def test_shutdown_drains_then_cancels(make_sched):
    eng = FakeEngine(step_delay=0.01)
    s = make_sched(eng)
    short = make_request(eng, rid="short", stopping=Stopping(max_tokens=3))
    endless = make_request(eng, rid="endless", stopping=Stopping(max_tokens=0, ignore_eos=True))
    eng.info.context_length = 10_000
    s.submit(short)
    s.submit(endless)
    t0 = time.monotonic()
    s.shutdown(0.3)
    assert time.monotonic() - t0 < 5
    assert drain(short)[-1].reason == LENGTH
    assert drain(endless)[-1].reason == CANCELLED
    assert eng.closed
    with pytest.raises(Unavailable):
        s.submit(make_request(eng))


def test_top_logprobs_have_text(make_sched):
    eng = FakeEngine()
    s = make_sched(eng)
    r = make_request(eng, top=2, stopping=Stopping(max_tokens=1))
    s.submit(r)
    tok = drain(r)[0]
    assert tok.top == [(ord("h") + 2, "h", -0.25), (EOS, "</s>", -3.0)]


def test_cancelled_during_a_step_counts_only_streamed_tokens(make_sched):
    # A Cancel that lands while a step runs: the token that step samples is not streamed, so the
    # Finished usage must not count it (found by the soak test: usage was one token ahead).
    eng = FakeEngine(step_delay=0.05)
    s = make_sched(eng)
    r = make_request(eng, rid="mid-step", stopping=Stopping(max_tokens=0))
    s.submit(r)
    assert isinstance(r.events.get(timeout=5), TokenEvent)
    time.sleep(0.01)  # inside the next step
    s.cancel("mid-step")
    ev = [r.events.get(timeout=5)]
    while not isinstance(ev[-1], (FinishedEvent, ErrorEvent)):
        ev.append(r.events.get(timeout=5))
    streamed = 1 + sum(isinstance(e, TokenEvent) for e in ev)
    assert ev[-1].reason == CANCELLED and ev[-1].completion_tokens == streamed


def test_max_vram_caps_the_worker_not_each_model():
    """A model loaded beside a served CUDA model gets max_vram minus what the served one holds."""
    seen = []
    first = FakeEngine(model_id="a")
    first.info.backend = "cuda"
    first.info.weights_bytes, first.info.kv_cache_bytes, first.info.workspace_bytes = 600, 200, 100

    def loader(path, **kw):
        seen.append(kw["max_vram"])
        return first if len(seen) == 1 else FakeEngine(model_id="b")

    s = Scheduler(loader=loader, decoder_factory=FakeDecoder)
    try:
        s.load("a", max_vram=1000)
        s.load("b", max_vram=1000)
        assert seen == [1000, 100]
        big = FakeEngine(model_id="c")
        big.info.backend = "cuda"
        big.info.weights_bytes = 1000
        s._loader = lambda path, **kw: big
        s.load("c", max_vram=1000)          # replaces the CPU model "b": nothing held on the GPU
        with pytest.raises(ResourceExhausted) as err:
            s.load("d", max_vram=1000)      # "c" holds the whole limit
        assert err.value.field == "max_vram" and s.engine.info.model_id == "c"
    finally:
        s.shutdown(0)
