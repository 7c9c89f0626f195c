"""Logit controls: logit_bias, allowed / banned token ids, banned token sequences, min_tokens.

A request's controls become, once at admission, a static part (a bias dict and a bool mask over
the vocabulary) and, only where needed, a `Dynamic` part the engine asks for the mask of each
sampled step: banned sequences depend on the output's tail and min_tokens on its length. Requests
without controls carry neither, so their steps pay nothing.

Checks that need no model run in `check_static`, the vocabulary-dependent ones in `check_vocab`;
every error names the proto field, as the other sampling fields do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidArgument
from .sampling import as_sent

MAX_LOGIT_BIAS = 300      # entries; OpenAI's bound, and a dict that small costs nothing per step
LOGIT_BIAS_LIMIT = 100.0  # e^100 is past float32's resolution of any realistic logit gap
MAX_BANNED_SEQUENCES = 64
MAX_BANNED_SEQUENCE_LEN = 16


@dataclass
class LogitControls:
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed: list[int] = field(default_factory=list)
    banned: list[int] = field(default_factory=list)
    banned_sequences: list[tuple[int, ...]] = field(default_factory=list)
    min_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()  # what min_tokens holds back: EOS (unless ignored) and stop ids

    @property
    def active(self) -> bool:
        return bool(self.logit_bias or self.allowed or self.banned or self.banned_sequences or self.min_tokens)


def check_static(s, min_tokens: int = 0, max_tokens: int = 0) -> None:
    """Model-independent checks of SamplingParams' controls (`s`, the proto) and min_tokens."""
    if len(s.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(f"at most {MAX_LOGIT_BIAS} entries, got {len(s.logit_bias)}", field="sampling.logit_bias")
    for tid, v in s.logit_bias.items():
        v = float(v)
        if not (math.isfinite(v) and -LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT):
            raise InvalidArgument(f"must be in [-100, 100], got {as_sent(v)}", field=f"sampling.logit_bias[{tid}]")
    if len(s.banned_token_sequences) > MAX_BANNED_SEQUENCES:
        raise InvalidArgument(f"at most {MAX_BANNED_SEQUENCES} sequences, got {len(s.banned_token_sequences)}",
                              field="sampling.banned_token_sequences")
    for i, seq in enumerate(s.banned_token_sequences):
        if not 1 <= len(seq.ids) <= MAX_BANNED_SEQUENCE_LEN:
            raise InvalidArgument(f"each sequence must be 1..{MAX_BANNED_SEQUENCE_LEN} ids, got {len(seq.ids)}",
                                  field=f"sampling.banned_token_sequences[{i}]")
    if max_tokens and min_tokens > max_tokens:
        raise InvalidArgument(f"must be at most stopping.max_tokens {max_tokens}, got {min_tokens}",
                              field="stopping.min_tokens")


def _ids(ids, vocab: int, name: str) -> list[int]:
    ids = [int(t) for t in ids]
    if len(ids) > vocab:
        raise InvalidArgument(f"at most the vocabulary size {vocab} ids, got {len(ids)}", field=f"sampling.{name}")
    for i, t in enumerate(ids):
        if t >= vocab:
            raise InvalidArgument(f"id {t} is not below the vocabulary size {vocab}", field=f"sampling.{name}[{i}]")
    return ids


def check_vocab(s, vocab: int, min_tokens: int, stop_ids: frozenset[int]) -> LogitControls | None:
    """The controls of SamplingParams `s` (the proto) against the model's vocabulary, or None when
    the request sets none. The set of tokens left to sample must not be empty, and with
    min_tokens it must hold a token that does not stop the output."""
    bias = {}
    for tid, v in s.logit_bias.items():
        if tid >= vocab:
            raise InvalidArgument(f"token id {tid} is not below the vocabulary size {vocab}",
                                  field=f"sampling.logit_bias[{tid}]")
        bias[int(tid)] = float(v)
    allowed = _ids(s.allowed_token_ids, vocab, "allowed_token_ids")
    banned = _ids(s.banned_token_ids, vocab, "banned_token_ids")
    seqs = []
    for i, seq in enumerate(s.banned_token_sequences):
        seqs.append(tuple(_ids(seq.ids, vocab, f"banned_token_sequences[{i}]")))
    c = LogitControls(bias, allowed, banned, seqs, int(min_tokens), frozenset(stop_ids) if min_tokens else frozenset())
    if not c.active:
        return None
    mask = static_mask(c, vocab)
    if mask is not None and not mask.any():
        where = "allowed_token_ids" if allowed else ("banned_token_ids" if banned else "banned_token_sequences")
        raise InvalidArgument("every token that could be sampled is banned", field=f"sampling.{where}")
    if c.min_tokens:
        left = np.ones(vocab, bool) if mask is None else mask.copy()
        left[[t for t in c.stop_ids if t < vocab]] = False
        if not left.any():
            raise InvalidArgument("every token that could be sampled ends the output, so no token can come first",
                                  field="stopping.min_tokens")
    return c


def static_mask(c: LogitControls, vocab: int) -> np.ndarray | None:
    """bool [vocab] of the ids that may ever be sampled, or None (all)."""
    single = [q[0] for q in c.banned_sequences if len(q) == 1]
    if not (c.allowed or c.banned or single):
        return None
    if c.allowed:
        mask = np.zeros(vocab, bool)
        mask[c.allowed] = True
    else:
        mask = np.ones(vocab, bool)
    mask[c.banned + single] = False
    return mask


class Dynamic:
    """The per-step part of a sequence's mask: banned sequences and min_tokens."""

    __slots__ = ("base", "early", "min_tokens", "by_prev", "vocab")

    def __init__(self, c: LogitControls, base: np.ndarray | None, vocab: int):
        self.base = base  # the static mask (None: all)
        self.vocab = vocab
        self.min_tokens = c.min_tokens
        self.early = None  # the static mask less the stop ids, while min_tokens is not reached
        if c.min_tokens and c.stop_ids:
            self.early = np.ones(vocab, bool) if base is None else base.copy()
            self.early[[t for t in c.stop_ids if t < vocab]] = False
        # longer sequences keyed by their next-to-last id: a step checks only those the output's
        # last token can continue
        self.by_prev: dict[int, list[tuple[tuple[int, ...], int]]] = {}
        for q in c.banned_sequences:
            if len(q) > 1:
                self.by_prev.setdefault(q[-2], []).append((q[:-2], q[-1]))

    @staticmethod
    def of(c: LogitControls | None, base: np.ndarray | None, vocab: int) -> "Dynamic | None":
        if c is None or not (c.min_tokens and c.stop_ids or any(len(q) > 1 for q in c.banned_sequences)):
            return None
        return Dynamic(c, base, vocab)

    def settled(self, n_out: int) -> bool:
        """Whether the mask no longer depends on the output (min_tokens reached, no sequences):
        such a step may be planned before the previous token is known."""
        return not self.by_prev and (self.early is None or n_out >= self.min_tokens)

    def mask(self, output_ids) -> np.ndarray | None:
        """The mask of the step that samples output token len(output_ids)."""
        n = len(output_ids)
        m = self.early if self.early is not None and n < self.min_tokens else self.base
        if not n or not self.by_prev:
            return m
        cands = self.by_prev.get(output_ids[-1])
        if not cands:
            return m
        ban = [last for head, last in cands
               if len(head) <= n - 1 and (not head or list(output_ids[n - 1 - len(head): n - 1]) == list(head))]
        if not ban:
            return m
        out = np.ones(self.vocab, bool) if m is None else m.copy()
        out[ban] = False
        # a ban that would leave nothing to sample is dropped for the step (documented in the proto)
        return out if out.any() else m
