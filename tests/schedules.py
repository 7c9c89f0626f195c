"""Batch schedules shared by the CPU and GPU engine tests."""
from __future__ import annotations

import re

from orcd_grpc.overlap import Overlap
from orcd_grpc.sampling import SamplingParams

# Constraints over write_tiny_llama's vocabulary, whose tokenizer encodes no text (so grammars name
# token ids, <[id]>; EOS is 2), each with a Python regex its ids (space-separated) must fullmatch;
# and one unconstrained sequence beside them.
TINY_SPECS = [("lark_grammar", "start: (<[5]> | <[6]> <[7]>){8,30}", r"(5|6 7)( (5|6 7)){7,29}"),
              ("lark_grammar", "start: <[10]> (<[11]> | <[12]> | <[13]>){6,12} <[14]>", r"10( 1[123]){6,12} 14"),
              ("lark_grammar", "start: (<[20]> | <[21]>){10,20} <[22]>", r"((20|21) ){10,20}22"),
              (None, None, None)]


def join_beside_decoding(eng, prompts, params, steps):
    """Sequences a and b decode `steps` steps through the overlap loop (their bucket's graph is
    captured meanwhile) and what is in flight is delivered; b leaves (released) and c joins with
    its prompt, so the next step carries prompt tokens beside a's decode row; a and c run `steps`
    more steps. Returns ([a's tokens, c's tokens], the kinds of the steps after the join)."""
    a, b = (eng.new_sequence(p, s) for p, s in zip(prompts[:2], params[:2]))
    ov = Overlap(eng)
    for _ in range(steps):
        ov.step([a, b])
    ov.drain()
    eng.release(b)
    c = eng.new_sequence(prompts[2], params[2])
    kinds = []
    for _ in range(steps):
        ov.step([a, c])
        kinds.append(ov.last_kind)
    ov.drain()
    return [list(a.output_ids), list(c.output_ids)], kinds


def changing_batch(eng, prompts, top_logprobs=0):
    """A batch that changes while it decodes, driven through the overlap loop: a finishes
    (released) at 4 tokens; d joins once b has 6; c leaves without being released at 10 tokens
    and comes back once d has 8; everyone stops at 14. Changes are keyed to tokens received, not
    to step calls (a step launched ahead is delivered one call later, to the sequences it ran
    for, even one that left the batch meanwhile). Also returns whether c left with a step of it
    in flight."""
    seqs = [eng.new_sequence(p, SamplingParams(temperature=0.7, seed=i, top_logprobs=top_logprobs if i == 1 else 0))
            for i, p in enumerate(prompts)]
    a, b, c, d = seqs
    ov = Overlap(eng)
    got = {s.seq_id: [] for s in seqs}
    tops = {s.seq_id: [] for s in seqs}
    released = set()
    n = lambda s: len(got[s.seq_id])  # noqa: E731

    def release(s):
        eng.release(s)
        released.add(s.seq_id)

    batch, joined, paused, calls, c_queued = [a, b, c], False, False, 0, False
    while batch:
        calls += 1
        assert calls < 300
        out = ov.step(list(batch))
        for s in seqs:
            if s.seq_id in out and s.seq_id not in released:
                got[s.seq_id].append(out[s.seq_id].token_id)
                tops[s.seq_id].append(out[s.seq_id].top)
        if a in batch and n(a) >= 4:
            batch.remove(a)
            release(a)
        if not joined and n(b) >= 6:
            batch.append(d)
            joined = True
        if not paused and n(c) >= 10:
            batch.remove(c)  # not released: its KV stays, it resumes later
            paused = True
            c_queued = ov.queued(c)
        elif paused and c not in batch and n(c) < 14 and n(d) >= 8:
            batch.append(c)
        for s in list(batch):
            if n(s) >= 14:
                batch.remove(s)
                release(s)
    ov.drain()
    if top_logprobs:
        assert all(len(t) == top_logprobs for t in tops[b.seq_id])
    return [got[s.seq_id] for s in seqs], [list(s.output_ids) for s in seqs], c_queued


def constrained_batch(eng, specs=TINY_SPECS, max_tokens=24):
    """Seeded sequences under constraints (and one without) through the overlap loop, each
    leaving the batch when its constraint is done or at max_tokens, the unconstrained one at 8
    (a step of it may be in flight then). Checks every sequence's tokens against its constraint
    (the matcher never errs, a finished output is in the language) and returns each sequence's
    tokens up to where it left: what a step-by-step run must give too."""
    from orcd_grpc import constraints

    V = eng.info.vocab_size
    seqs, cons = [], []
    for i, (kind, spec, _) in enumerate(specs):
        c = None if kind is None else constraints.compile_spec(kind, spec, eng.tokenizer, V)
        cons.append(c)
        seqs.append(eng.new_sequence([1, 3 + i, 40 + i], SamplingParams(temperature=0.8, seed=i, constraint=c)))
    ov = Overlap(eng)
    live, kept = list(seqs), {}
    calls = 0
    while live:
        calls += 1
        assert calls < 200
        ov.step(live, may_follow=lambda s: len(s.output_ids) + 2 <= max_tokens)
        for s, c in zip(seqs, cons):
            done = len(s.output_ids) >= (8 if c is None else max_tokens) or (c is not None and c.done)
            if s in live and done:
                live.remove(s)  # a step of it still in flight is delivered, past what is kept
                kept[s.seq_id] = list(s.output_ids)
    ov.drain()
    outs = []
    for s, (kind, spec, pattern), c in zip(seqs, specs, cons):
        ids = kept[s.seq_id]
        outs.append(ids)
        if c is not None:
            assert c.error is None, (spec, ids, c.error)
            body = ids[:-1] if c.done and ids and ids[-1] == 2 else ids  # EOS ends a finished output
            if c.done:
                assert re.fullmatch(pattern, " ".join(map(str, body))), (spec, ids)
            else:
                assert 2 not in ids, (spec, ids)
            c.close()
        eng.release(s)
    return outs
