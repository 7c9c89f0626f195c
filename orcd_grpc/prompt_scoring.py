"""Scoring: the log-probability of every prompt token, computed during the prefill.

An ExecuteRequest with `prompt_logprobs` set gets, after Started and before its first token, one
PromptLogprobs event per prefill chunk: for each prompt position i >= 1 the prompt token, its
log-prob given the tokens before it, and the top-N alternatives. The engine plans the rows
(PlanRow.prompt_logprobs; the sequence never takes its prompt from the prefix cache, whose
positions have no logits) and the runner computes them where the logits are: only the target's
log-prob and the top-N come back to the host. Here: the request's checks and the events.
"""
from __future__ import annotations

import dataclasses

from .backends.runner import MAX_SCORE_TOP
from .errors import InvalidArgument

MAX_PROMPT_LOGPROBS = MAX_SCORE_TOP  # ExecuteRequest.prompt_logprobs.top_n: what the runners return
# Most positions one event carries: a prefill chunk of the step budget can be thousands of
# positions, and at 21 entries each an event would pass gRPC's default 4 MiB receive limit.
EVENT_POSITIONS = 512


def check_static(req) -> None:
    """Model-independent checks of an ExecuteRequest's prompt_logprobs."""
    if not req.HasField("prompt_logprobs"):
        return
    o = req.prompt_logprobs
    if not o.enabled:
        raise InvalidArgument("must be true when prompt_logprobs is set", field="prompt_logprobs.enabled")
    if o.top_n > MAX_PROMPT_LOGPROBS:
        raise InvalidArgument(f"must be in [0, {MAX_PROMPT_LOGPROBS}], got {o.top_n}", field="prompt_logprobs.top_n")


def top_n(req) -> int | None:
    """The request's scoring top-N, or None when it does not score."""
    return int(req.prompt_logprobs.top_n) if req.HasField("prompt_logprobs") else None


@dataclasses.dataclass
class PromptLogprobsEvent:
    first_position: int
    # (token id, text, logprob, [(alternative id, text, logprob)]) per position from first_position
    entries: list[tuple[int, str, float, list[tuple[int, str, float]]]]


def _text(tokenizer, tid: int) -> str:
    try:
        return tokenizer.token_bytes(int(tid)).decode("utf-8", "replace")
    except Exception:
        return ""


def take_events(seq, tokenizer) -> list[PromptLogprobsEvent]:
    """The events of the scores the engine queued on `seq` since the last call (emptying it)."""
    chunks, seq.prompt_scores = seq.prompt_scores, []
    out = []
    for sc in chunks:
        entries = []
        tops_i, tops_lp = sc.top_ids.tolist(), sc.top_logprobs.tolist()
        for j, (tid, lp) in enumerate(zip(sc.targets.tolist(), sc.logprobs.tolist())):
            top = [(int(a), _text(tokenizer, a), float(b)) for a, b in zip(tops_i[j], tops_lp[j])]
            entries.append((int(tid), _text(tokenizer, tid), float(lp), top))
        for a in range(0, len(entries), EVENT_POSITIONS):
            out.append(PromptLogprobsEvent(int(sc.first) + a, entries[a:a + EVENT_POSITIONS]))
    return out


def to_proto(ev: PromptLogprobsEvent, pb):
    return pb.PromptLogprobs(first_position=ev.first_position, entries=[
        pb.PromptTokenLogprob(token_id=tid, text=text, logprob=lp,
                              top_logprobs=[pb.TopLogprob(token_id=a, text=t, logprob=b) for a, t, b in top])
        for tid, text, lp, top in ev.entries])
