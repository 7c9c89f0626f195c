"""Batch schedules shared by the CPU and GPU engine tests."""
from __future__ import annotations

from orcd_grpc.overlap import Overlap
from orcd_grpc.sampling import SamplingParams


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
