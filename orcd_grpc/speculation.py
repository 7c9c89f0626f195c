"""Speculative decoding: draft tokens proposed cheaply, verified by the target in one step.

A sequence that speculates gets a verify row instead of a decode row (engine.py): its last token
and k drafts, [start, start + 1 + k), with the logits of all k + 1 positions back on the host.
`verify` then walks the drafts with the request's own host sampler (sampling.Sampler.target:
penalties over the history so far, temperature, top-k, top-p, min-p; the row's static mask and
bias applied first, as runner.host_sample does):

* greedy: a draft is kept while it is the target's argmax; the first that is not is replaced by
  the argmax, so the output is the one decoding without speculation gives;
* sampled: standard speculative rejection sampling. A prompt-lookup draft is a point mass, so
  draft d is kept with probability p(d); on rejection the token is drawn from the residual
  (p - onehot(d))+, i.e. p without d, renormalised. Each output token therefore has exactly the
  target's distribution (P(d) = p(d); P(x != d) = (1 - p(d)) p(x) / (1 - p(d))).

After the last draft kept (all of them, or up to the first rejection) one more token comes from
the next position, so a verify step gives 1..k+1 tokens. The KV of rejected positions is rolled
back by the engine (num_cached, and blocks that only they used).

Rows whose next sample the host cannot reproduce are not speculated: a grammar constraint (its
matcher must see each token before the next mask) and masks that follow the output (banned
sequences, min_tokens). Seeded sampled output with speculation is a different draw of the same
distribution than without it (the random stream is consumed differently).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .errors import InvalidArgument
from .sampling import Sampler, TokenSample

OFF, NGRAM, DRAFT = "off", "ngram", "draft"
MODES = (OFF, NGRAM, DRAFT)
MAX_DRAFT_TOKENS = 16       # a verify row is 1 + k tokens; more rarely pays and only costs
DEFAULT_DRAFT_TOKENS = 5
DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN = 4, 2
MAX_NGRAM = 16


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How a sequence speculates. mode OFF is never put on a sequence (None is)."""
    mode: str = NGRAM
    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS
    ngram_max: int = DEFAULT_NGRAM_MAX
    ngram_min: int = DEFAULT_NGRAM_MIN

    def check(self, prefix: str = "speculation") -> "Speculation":
        """Raises InvalidArgument naming the first bad field; returns self."""
        if self.mode not in MODES:
            raise InvalidArgument(f"must be one of {', '.join(MODES)}, got {self.mode!r}", field=f"{prefix}.mode")
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidArgument(f"must be in [1, {MAX_DRAFT_TOKENS}], got {self.num_draft_tokens}",
                                  field=f"{prefix}.num_draft_tokens")
        if not 1 <= self.ngram_max <= MAX_NGRAM:
            raise InvalidArgument(f"must be in [1, {MAX_NGRAM}], got {self.ngram_max}", field=f"{prefix}.ngram_max")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidArgument(f"must be in [1, ngram_max = {self.ngram_max}], got {self.ngram_min}",
                                  field=f"{prefix}.ngram_min")
        return self


def resolve(asked: "Speculation | str | None", default: "Speculation | None") -> "Speculation | None":
    """A request's speculation: asked None is the server's default, OFF none."""
    if asked is None:
        return default
    if asked == OFF or getattr(asked, "mode", None) == OFF:
        return None
    return asked


def from_proto(msg, has_field: bool, default: "Speculation | None") -> "Speculation | str | None":
    """ExecuteRequest.speculation as a request's choice: None (unset or DEFAULT: the server's),
    OFF, or a checked Speculation; fields left 0 take the server default's (else the built-in)."""
    if not has_field:
        return None
    names = {0: None, 1: OFF, 2: NGRAM, 3: DRAFT}
    mode = names.get(int(msg.mode), "?")
    if mode == "?":
        raise InvalidArgument(f"unknown mode {int(msg.mode)}", field="speculation.mode")
    base = default or Speculation()
    ngram_max = int(msg.ngram_max) or base.ngram_max
    spec = Speculation(mode if mode in (NGRAM, DRAFT) else base.mode,
                       int(msg.num_draft_tokens) or base.num_draft_tokens, ngram_max,
                       int(msg.ngram_min) or min(base.ngram_min, ngram_max)).check()  # checked whatever the mode
    if mode == OFF or (mode is None and default is None):  # DEFAULT on a worker whose default is off
        return OFF
    if mode is None and not (msg.num_draft_tokens or msg.ngram_max or msg.ngram_min):
        return None
    return spec


def room(seq, start: int, context_length: int) -> int:
    """Drafts seq may verify in a step from position start: its num_draft_tokens, within the
    context and the request's max_tokens (a verify step gives up to k + 1 tokens)."""
    k = min(seq.spec.num_draft_tokens, context_length - start - 1)
    return min(k, seq.max_output - len(seq.output_ids) - 1) if seq.max_output else k


def propose_ngram(history, k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the
    history's longest trailing n-gram (ngram_min <= n <= ngram_max); [] when none occurs."""
    h = np.asarray(history, np.int64)
    L = h.size
    if k <= 0 or L < ngram_min + 1:
        return []
    ends = np.flatnonzero(h[:L - 1] == h[L - 1])  # earlier positions holding the last token
    if ends.size == 0:
        return []
    ok = np.ones(ends.size, bool)
    length = np.ones(ends.size, np.int64)
    for t in range(1, ngram_max):
        if L - 1 - t < 0:
            break
        j = ends - t
        ok &= (j >= 0) & (h[np.maximum(j, 0)] == h[L - 1 - t])
        if not ok.any():
            break
        length += ok
    best = int(length.max())
    if best < ngram_min:
        return []
    at = int(ends[np.flatnonzero(length == best)[-1]])  # the latest of the longest matches
    return [int(t) for t in h[at + 1: at + 1 + k]]


def verify(logits: np.ndarray, drafts: list[int], sampler: Sampler, prompt_ids, output_ids,
           prepare=None) -> tuple[list[TokenSample], int]:
    """The tokens a verify row gives (see the module docstring) and how many drafts were kept.
    logits: [len(drafts) + 1, V] of the row's positions; prepare(x): the row's mask and bias
    applied to one row of logits (None: none)."""
    out: list[TokenSample] = []
    hist = list(output_ids)
    greedy = sampler.params.temperature == 0.0
    for j, d in enumerate(drafts):
        x = logits[j] if prepare is None else prepare(logits[j])
        raw, lse, ids, probs = sampler.target(x, prompt_ids, hist)
        if greedy:
            t = int(ids[0])
        else:
            hit = np.flatnonzero(ids == d)
            p_d = float(probs[hit[0]]) if hit.size else 0.0
            if sampler.rng.random() < p_d:
                t = d
            else:  # the residual: p without d, renormalised (p_d < 1 here)
                rest = probs.copy()
                if hit.size:
                    rest[hit[0]] = 0.0
                cdf = np.cumsum(rest)
                i = int(np.searchsorted(cdf, sampler.rng.random() * cdf[-1], side="right"))
                if i >= ids.size or rest[i] == 0.0:  # rounding landed past the end or on d
                    nz = np.flatnonzero(rest)
                    i = int(nz[min(int(np.searchsorted(nz, i)), nz.size - 1)])
                t = int(ids[i])
        out.append(sampler.report(raw, lse, t))
        if t != d:
            return out, j
        hist.append(t)
    x = logits[len(drafts)] if prepare is None else prepare(logits[len(drafts)])
    out.append(sampler.sample(x, prompt_ids, hist))
    return out, len(drafts)
