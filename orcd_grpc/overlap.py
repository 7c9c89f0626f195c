"""The overlap loop: launch step N+1, then deliver step N.

While a batch is unchanged, the decode step after the one in flight is launched before the host
waits for that one's tokens: the runner feeds them to it where they are (on the device), so the
host's work between steps (scheduling, detokenizing, streaming) overlaps the device's instead of
idling it. A changed batch only delivers what was in flight, and the next call plans anew;
where the runner takes changed batches (ORCD_FEED_CHANGED), the changed batch's step is launched
behind the one in flight first, its continuing sequences fed their tokens there too.

Nothing is rolled back: a step launched ahead is always delivered, to the sequences it ran for.
A batch with a speculating sequence is never fed ahead (Engine.launch declines): its next step
is a verify row, planned from the tokens just delivered.
The scheduler drives its batch through this; so do benchmarks and tests that drive an engine
directly.
"""
from __future__ import annotations

from typing import Any, Callable


# What the step a call delivered was (Overlap.last_kind; the scheduler counts them in
# orcd_engine_steps{kind}): it carried prompt tokens; it was a decode step launched when the one
# before it had been delivered; it was queued behind the step in flight (the overlapped case).
PREFILL, DECODE, DECODE_AHEAD = "prefill", "decode", "decode_ahead"


class Overlap:
    def __init__(self, engine):
        self.engine = engine
        self.inflight: tuple[list, Any] | None = None  # (its sequences, the launched step)
        self.last_kind: str | None = None  # of the step the last call delivered (None: none)
        self._ahead_kind = DECODE_AHEAD  # of the step in flight: PREFILL where it carries new prompts

    def step(self, seqs: list, token_budget: int = 2048, may_follow: Callable[[Any], bool] | None = None,
             append: bool = True) -> dict:
        """Delivers one step of seqs (launching it first if none is in flight) and returns its
        samples {seq_id: TokenSample}; launches the step after it first where it may.
        may_follow(seq): False stops a step being launched past the one in flight (a request
        that reaches its max_tokens with it). append: add each token to its sequence's
        output_ids (sequences released meanwhile excepted); the scheduler appends itself."""
        eng = self.engine
        prev, self.inflight = self.inflight, None
        self.last_kind = self._ahead_kind if prev is not None else None
        changed = prev is not None and (len(prev[0]) != len(seqs) or any(a is not b for a, b in zip(prev[0], seqs)))
        if prev is None:
            kind = PREFILL if any(s.prefill_remaining for s in seqs) else DECODE
            launched = eng.launch(seqs, token_budget)
            if launched is None:
                return {}
            prev = (list(seqs), launched)
            self.last_kind = kind
        if ((not changed or eng.capabilities.overlap_changed)
                and (may_follow is None or all(may_follow(s) for s in seqs))):
            self._launch_ahead(seqs, token_budget, prev)
        out = self._deliver(prev, append)
        if append:
            self.settle()
        return out

    def _launch_ahead(self, seqs: list, token_budget: int, prev) -> None:
        """seqs' step queued behind prev (in flight, its samples not collected), where it can be."""
        kind = PREFILL if any(s.prefill_remaining for s in seqs) else DECODE_AHEAD
        ahead = self.engine.launch(seqs, token_budget, after=prev[1])
        if ahead is not None:
            self.inflight, self._ahead_kind = (list(seqs), ahead), kind

    def settle(self) -> None:
        """Once the tokens step() delivered are appended (by step itself, or by a caller that
        appends its own): the step in flight gets its masked sampling queued at once, so the GPU
        need not wait for the host's other work on those tokens (streaming them, planning)."""
        if self.inflight is not None:
            self.engine.settle(self.inflight[1])

    def drain(self, append: bool = True) -> dict:
        """Delivers the step in flight, if any."""
        prev, self.inflight = self.inflight, None
        self.last_kind = self._ahead_kind if prev is not None else None
        return self._deliver(prev, append) if prev is not None else {}

    def queued(self, seq) -> bool:
        """Whether the step in flight runs for seq."""
        return self.inflight is not None and any(s is seq for s in self.inflight[0])

    def _deliver(self, prev, append: bool) -> dict:
        seqs, launched = prev
        out = self.engine.collect(launched)
        if append:
            for s in seqs:
                sample = out.get(s.seq_id)
                if sample is not None and s.block_table:  # released: holds no KV
                    for t in (sample, *sample.following):  # a verify step's several tokens
                        s.append(int(t.token_id))
        return out
