"""Choosing the next token from a row of logits.

Order of operations (fixed; clients can rely on it):
  1. penalties: repetition (prompt + output tokens; positive logits divided, negative ones
     multiplied, as in HF and llama.cpp), then presence / frequency (output tokens only,
     OpenAI-style: logit -= frequency * count + presence * [count > 0]);
  2. temperature == 0: greedy argmax of the penalised logits (lowest id on ties), done;
  3. temperature scaling;
  4. top-k, 5. top-p (nucleus), 6. min-p (relative to the most likely surviving token);
  7. a draw from the renormalised survivors with the request's seeded PCG64 generator.

Parameters at the edge of their range are run as their limit (`SamplingParams.effective`), so the
float32 arithmetic of either sampler (this one and cuda/sample.cu) never overflows:
  * temperature below GREEDY_BELOW_TEMPERATURE (1e-5) is greedy, the limit T -> 0;
  * top_p <= 1 / vocabulary size is greedy: the most likely token alone already holds that mass;
  * repetition_penalty below MIN_REPETITION_PENALTY (1e-30) runs as 1e-30;
  * min_p below the smallest normal float32 (1.2e-38) is 0 (off).

The reported logprob / top logprobs are of the distribution given (log-softmax of the logits as
given: temperature 1, no penalties, no filtering), so they describe the model, not the sampling
settings; a runner hands over a row's logits with its logit_bias and token bans already applied
(runner.masked), since those change which tokens exist at all. Banned tokens (-inf) are not
listed among the top logprobs.

Vocabularies reach 262,144 entries; a full sort or a float64 cumulative sum of that costs tens
of milliseconds, so top-k and top-p first narrow the field with vectorised threshold scans, and
draws over the whole vocabulary search block sums before one block's cumsum.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import Internal, InvalidArgument

MAX_TOP_LOGPROBS = 20

# Below 1e-5 only tokens whose logits lie within ~1e-3 of the maximum keep any weight (exp(-100)
# beyond), which is the rounding noise of f16/quantised logits themselves: sampling there draws
# between numerically tied tokens, so greedy is the faithful limit (vLLM uses the same cut-off).
# It also keeps the kernel's 1/T finite: 1/1e-45 is inf, and 0 * inf (the top token) is NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
# Seen tokens with positive logits are divided by the penalty. At 1e-30 any such logit above
# ~1e-28 already outweighs every unseen one by more than float32 can represent (the limit p -> 0:
# the seen token with the largest positive logit wins), while logits up to 3.4e8 stay finite;
# smaller penalties would only overflow to inf, and inf - inf is NaN in the softmax.
MIN_REPETITION_PENALTY = 1e-30
_FLT_MIN = float(np.finfo(np.float32).tiny)
_FLT_MAX = np.float32(np.finfo(np.float32).max)


def as_sent(v) -> str:
    """A number for an error message, exactly as the client sent it.

    Proto float fields arrive as float32 widened to a Python float (100.0001 becomes
    100.00009918212891); the shortest repr of the float32 gives back what the client typed.
    Other numbers print as their own repr.
    """
    if isinstance(v, (bool, int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return repr(v)
    if not math.isfinite(f):
        return str(f)
    with np.errstate(over="ignore"):
        f32 = np.float32(f)
    return str(f32) if float(f32) == f else repr(f)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0
    # Scoring: None, or the top-N alternatives wanted with each prompt token's log-prob
    # (ExecuteRequest.prompt_logprobs; the engine plans its rows, prompt_scoring streams them)
    prompt_logprobs: int | None = None
    # logit_controls.LogitControls, or None: applied by the engine as the rows' mask and bias
    controls: object = None
    # constraints.Constraint, or None: the request's matcher (its own, never shared)
    constraint: object = None
    # speculation.Speculation, speculation.OFF, or None (the engine's default)
    speculation: object = None

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidArgument naming the first bad field ("sampling.<name>")."""

        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            f = f"sampling.{name}"
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise InvalidArgument(f"must be a number, got {type(v).__name__}", field=f)
            if not math.isfinite(v):
                raise InvalidArgument(f"must be finite, got {as_sent(v)}", field=f)
            if v < lo or v > hi or (lo_open and v == lo):
                bracket = "(" if lo_open else "["
                raise InvalidArgument(f"must be in {bracket}{lo:g}, {hi:g}], got {as_sent(v)}", field=f)

        def integer(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidArgument(f"must be an integer, got {v!r}", field=f"sampling.{name}")
            if not lo <= v <= hi:
                raise InvalidArgument(f"must be in [{lo}, {hi}], got {v}",
                                      field=f"sampling.{name}")

        number("temperature", 0.0, 100.0)
        integer("top_k", 0, vocab_size)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, 10.0, lo_open=True)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        integer("top_logprobs", 0, MAX_TOP_LOGPROBS)
        if self.seed is not None:
            integer("seed", 0, 2**64 - 1)

    def effective(self, vocab_size: int | None = None) -> "SamplingParams":
        """A copy with every value whose effect float32 cannot tell from its limit set to that
        limit (see the module docstring). Both the CPU sampler and the rows packed for the
        device sampler take it, so the two agree on the edge values. Call after validate()."""
        p = dataclasses.replace(self)
        if p.temperature < GREEDY_BELOW_TEMPERATURE or (vocab_size and p.top_p * vocab_size <= 1.0):
            p.temperature = 0.0
        if p.repetition_penalty < MIN_REPETITION_PENALTY:
            p.repetition_penalty = MIN_REPETITION_PENALTY
        if p.min_p < _FLT_MIN:
            p.min_p = 0.0
        return p


@dataclass
class TokenSample:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    # A speculative verify step's further tokens, in order, after this one (speculation.py).
    following: list["TokenSample"] = field(default_factory=list)


def apply_penalties(logits: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int]) -> np.ndarray:
    """Penalised logits (in place on `logits`, which must be a private float copy)."""
    rp = params.repetition_penalty
    if rp != 1.0 and (len(prompt_ids) or len(output_ids)):
        seen = np.unique(np.concatenate([np.asarray(prompt_ids, np.int64),
                                         np.asarray(output_ids, np.int64)]))
        vals = logits[seen]
        with np.errstate(over="ignore"):
            # a huge positive logit over a tiny penalty saturates instead of becoming inf
            rp32 = np.float32(rp)
            logits[seen] = np.where(vals > 0, np.minimum(vals / rp32, _FLT_MAX), vals * rp32)
    if (params.presence_penalty or params.frequency_penalty) and len(output_ids):
        ids, counts = np.unique(np.asarray(output_ids, np.int64), return_counts=True)
        logits[ids] -= (params.frequency_penalty * counts
                        + params.presence_penalty).astype(logits.dtype)
    return logits


_BLOCK = 1024


def top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest entries of `x` (unordered; any of equal values at the boundary).

    argpartition over 262k entries costs ~2 ms; a few vectorised threshold scans below the
    maximum usually shrink the field to a few hundred entries first.
    """
    n = x.size
    if k >= n:
        return np.arange(n)
    top = float(x.max())
    gap = 1.0
    while gap < 1e4:
        sel = np.flatnonzero(x >= top - gap)
        if sel.size >= k:
            if sel.size == k:
                return sel
            return sel[np.argpartition(x[sel], sel.size - k)[sel.size - k:]]
        gap *= 4.0
    return np.argpartition(x, n - k)[n - k:]


def _block_sums(w: np.ndarray) -> np.ndarray:
    """Running totals (float64) of `w` in blocks of _BLOCK entries.

    A cumulative sum over a 262k vocabulary is a slow scalar loop in NumPy; block sums are
    vectorised and locate the drawn block, after which only one block needs a cumsum.
    """
    return np.cumsum(np.add.reduceat(w, np.arange(0, w.size, _BLOCK)), dtype=np.float64)


def _draw(w: np.ndarray, u: float, blocks: np.ndarray | None = None) -> int:
    """Index i with probability w[i] / sum(w), given u uniform in [0, 1)."""
    if w.size <= 4 * _BLOCK:
        cdf = np.cumsum(w, dtype=np.float64)
        i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        return min(i, w.size - 1)  # u * total can round up to total
    blocks = _block_sums(w) if blocks is None else blocks
    target = u * blocks[-1]
    b = min(int(np.searchsorted(blocks, target, side="right")), blocks.size - 1)
    base = blocks[b - 1] if b else 0.0
    lo = b * _BLOCK
    seg = w[lo:lo + _BLOCK]
    cdf = base + np.cumsum(seg, dtype=np.float64)
    i = min(int(np.searchsorted(cdf, target, side="right")), seg.size - 1)
    while seg[i] == 0 and i > 0:  # rounding landed on a zero-weight entry: step back
        i -= 1
    return lo + i


def _nucleus(w: np.ndarray, total: float, top_p: float) -> np.ndarray:
    """Ids (most likely first) of the smallest set whose weight reaches top_p * total.

    Tokens of the nucleus are found by lowering a weight threshold by decades until the mass
    above it reaches top_p, so only that (usually small) set is sorted, not the vocabulary.
    """
    need = top_p * total
    thr = float(w.max())
    while True:
        thr *= 0.1
        sel = np.flatnonzero(w >= thr)
        if w[sel].sum(dtype=np.float64) >= need or thr < 1e-30:
            break
    order = sel[np.argsort(-w[sel], kind="stable")]
    cdf = np.cumsum(w[order], dtype=np.float64)
    cut = int(np.searchsorted(cdf, need, side="left")) + 1  # first index reaching top_p
    return order[:cut]


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params.effective()
        # seed None: fresh OS entropy, so unseeded requests differ from each other
        self.rng = np.random.Generator(np.random.PCG64(params.seed))

    def sample(self, logits: np.ndarray, prompt_ids: Sequence[int],
               output_ids: Sequence[int]) -> TokenSample:
        raw, raw_w, raw_blocks, lse = _clean(logits)
        work = self._penalised(raw, prompt_ids, output_ids)
        token = self._choose(raw, (raw_w, raw_blocks)) if work is None else self._choose(work, None)
        return self.report(raw, lse, token)

    def _penalised(self, raw: np.ndarray, prompt_ids, output_ids) -> np.ndarray | None:
        """The penalised logits (a copy), or None when no penalty applies."""
        p = self.params
        if p.repetition_penalty != 1.0 or ((p.presence_penalty or p.frequency_penalty) and len(output_ids)):
            return apply_penalties(raw.copy(), p, prompt_ids, output_ids)
        return None

    def report(self, raw: np.ndarray, lse: float, token: int) -> TokenSample:
        """token's sample: its log-prob and the top alternatives, of raw (see the module docstring)."""
        p = self.params
        top: list[tuple[int, float]] = []
        if p.top_logprobs:
            best = top_k_ids(raw, p.top_logprobs)
            best = best[np.lexsort((best, -raw[best]))]  # most likely first, lower id on ties
            top = [(int(i), float(raw[i]) - lse) for i in best if raw[i] > -np.inf]
        return TokenSample(token_id=token, logprob=float(raw[token]) - lse, top=top)

    def target(self, logits: np.ndarray, prompt_ids: Sequence[int], output_ids: Sequence[int]):
        """The distribution `sample` draws from for these logits and this history, without
        drawing: (raw, lse, ids, probs), ids the tokens with any weight (int64) and probs their
        float64 probabilities; greedy: the argmax alone with probability 1. Speculative
        verification (speculation.py) accepts and resamples against it."""
        raw, raw_w, raw_blocks, lse = _clean(logits)
        work = self._penalised(raw, prompt_ids, output_ids)
        ids, w = self._weights(raw, (raw_w, raw_blocks)) if work is None else self._weights(work, None)
        probs = np.asarray(w, np.float64)
        return raw, lse, ids, probs / probs.sum()

    def _weights(self, work: np.ndarray, weights):
        """(ids, weights) of the candidates _choose draws from (ids None: the whole vocabulary)."""
        p = self.params
        if p.temperature == 0.0:
            return np.asarray([int(np.argmax(work))]), np.ones(1)
        cand, w, _ = self._candidates(work, weights)
        if cand is None:
            return np.arange(work.size), w
        return cand, w

    def _choose(self, work: np.ndarray, weights) -> int:
        """`weights`: (exp(work - max), block sums) when already computed at temperature 1."""
        if self.params.temperature == 0.0:
            return int(np.argmax(work))
        cand, w, blocks = self._candidates(work, weights)
        u = self.rng.random()
        if cand is None:
            return _draw(w, u, blocks)
        return int(cand[_draw(w, u)])

    def _candidates(self, work: np.ndarray, weights):
        """(ids or None for all, their unnormalised weights, block sums or None) after
        temperature, top-k, top-p and min-p: what a draw picks from."""
        p = self.params
        if p.temperature != 1.0:
            # Shift first: (x - max) / T is <= 0 and cannot overflow, where x / T can reach inf
            # (and inf - inf = NaN) for small T or large logits.
            with np.errstate(over="ignore"):
                work = (work - work.max()) / np.float32(p.temperature)
            weights = None
        n = work.size
        cand: np.ndarray | None = None  # ids still allowed; None = all
        if 0 < p.top_k < n:
            cand = top_k_ids(work, p.top_k)
        if p.top_p < 1.0:
            if cand is None:
                if weights is None:
                    w = np.exp(work - work.max())
                    weights = (w, _block_sums(w))
                cand = _nucleus(weights[0], float(weights[1][-1]), p.top_p)
            else:
                cw = np.exp(work[cand] - work[cand].max())
                cand = cand[_nucleus(cw, float(cw.sum(dtype=np.float64)), p.top_p)]
        if p.min_p > 0.0:
            vals = work if cand is None else work[cand]
            keep = vals >= vals.max() + np.float32(math.log(p.min_p))
            cand = np.flatnonzero(keep) if cand is None else cand[keep]
        if cand is None:
            if weights is None:
                w = np.exp(work - work.max())
                weights = (w, _block_sums(w))
            return None, weights[0], weights[1]
        vals = work[cand]
        return cand, np.exp(vals - vals.max()), None


def _clean(logits: np.ndarray):
    """(raw float32 logits with NaN as -inf, exp(raw - max), its block sums, log-sum-exp)."""
    raw = np.asarray(logits, dtype=np.float32).reshape(-1)
    raw_max = raw.max()
    if np.isnan(raw_max):  # max propagates NaN, so this costs no extra pass when clean
        raw = np.where(np.isnan(raw), np.float32(-np.inf), raw)
        raw_max = raw.max()
    if not np.isfinite(raw_max):
        raise Internal("logits hold no finite value (all NaN or -inf)", field="logits")
    # float32 exp is several times faster than float64; the sums accumulate in float64
    raw_w = np.exp(raw - raw_max)
    raw_blocks = _block_sums(raw_w)
    return raw, raw_w, raw_blocks, float(raw_max) + math.log(float(raw_blocks[-1]))
