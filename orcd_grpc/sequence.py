"""One request's engine-side state (Sequence): its tokens, KV blocks, sampling and what follows
its output (constraint, dynamic mask, speculation). The engine plans steps over these; the
scheduler decides which run."""
from __future__ import annotations

import numpy as np

from . import speculation
from .backends.runner import RowSampling, pack_bitmask
from .logit_controls import Dynamic
from .sampling import Sampler


class Sequence:
    """Engine-side state of one request: its tokens (the one copy of them) and its KV."""

    def __init__(self, seq_id: int, prompt_ids: list[int], sampling, sampler):
        self.seq_id = seq_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.row = RowSampling(sampling, sampler)
        self.num_cached = 0            # tokens whose KV is in the cache (or queued to be)
        self.cached_prompt_tokens = 0  # prompt tokens reused from the prefix cache
        self.block_table: list[int] = []
        # Applied to the logits of its next samples (allowed / banned ids, logit_bias); None: none.
        self.allowed: np.ndarray | None = None  # bool [V]
        self.mask: np.ndarray | None = None     # allowed, packed (runner.pack_bitmask)
        self.bias: dict[int, float] | np.ndarray | None = None
        # The part of the mask that follows the output (banned sequences, min_tokens); None: none.
        self.dynamic: Dynamic | None = None
        # The request's constraint (constraints.Constraint): its matcher follows the output.
        self.constraint = getattr(sampling, "constraint", None)
        # Scoring (prompt log-probs): None, or the top-N wanted. Its prompt never comes from the
        # prefix cache (cached positions have no logits); `scored` is the next prompt position
        # to deliver (position 0 has none), so a prompt recomputed after a preemption never
        # delivers a position twice. prompt_scores: delivered chunks the scheduler has not taken.
        self.score_top: int | None = getattr(sampling, "prompt_logprobs", None)
        self.scored = 1
        self.prompt_scores: list = []
        # Compute no KV past this many tokens (and sample nothing) until forked: the first of n
        # parallel samples prefills the prompt's shared part alone (Engine.fork). None: no hold.
        self.hold: int | None = None
        # Speculative decoding (speculation.py): how, or None; the drafts it proposed and kept;
        # the most output tokens the request takes (0: no cap), which bounds a step's drafts.
        self.spec: speculation.Speculation | None = None
        self.draft_tokens = self.accepted_drafts = 0
        self.max_output = 0

    def append(self, token: int) -> None:
        """Adds a generated token the request accepted; its constraint advances past it."""
        self.output_ids.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)

    def step_mask(self) -> np.ndarray | None:
        """The packed static mask of its next sample, with the part that follows the output."""
        if self.dynamic is None:
            return self.mask
        m = self.dynamic.mask(self.output_ids)
        return self.mask if m is self.allowed else None if m is None else pack_bitmask(m)

    @property
    def sampler(self) -> Sampler:
        return self.row.sampler

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_remaining(self) -> int:
        return max(0, len(self.prompt_ids) - self.num_cached)

    def tokens(self, start: int, stop: int) -> list[int]:
        p = len(self.prompt_ids)
        return (self.prompt_ids[start:stop] if stop <= p
                else self.prompt_ids[start:] + self.output_ids[max(0, start - p): stop - p])
