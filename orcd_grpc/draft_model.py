"""Draft-model speculation: a second, smaller model with the same vocabulary proposes the drafts.

The draft model is an Engine of its own (weights, tokenizer, its own small KV cache) on the same
backend as the target. Each target sequence that speculates with it has a mirror sequence in the
draft engine, prompt and output the target's; before each verify step the mirror is rolled back
to the history it shares with the target (its KV past the first difference is dropped, as the
target drops rejected drafts) and then decodes k tokens greedily, batched over the mirrors.

Greedy drafts are a deterministic proposal, a point mass, so verification is the one prompt lookup
uses (speculation.verify): the target's output distribution is kept exactly whatever the draft
model is; a better draft model only means more drafts kept.
"""
from __future__ import annotations

import numpy as np

from .errors import InvalidArgument, ResourceExhausted
from .sampling import SamplingParams


def check_same_vocabulary(target, draft) -> None:
    """InvalidArgument naming draft_path unless the two models' tokenizers have the same tokens
    (ids and bytes): drafts are token ids the target must read as the draft model meant them."""
    tt, dt = target.tokenizer, draft.tokenizer
    if target.info.vocab_size != draft.info.vocab_size or tt.vocab_size != dt.vocab_size:
        raise InvalidArgument(f"the draft model's vocabulary ({draft.info.vocab_size} tokens) is not the "
                              f"model's ({target.info.vocab_size})", field="draft_path")
    for i in range(tt.vocab_size):
        if tt.token_bytes(i) != dt.token_bytes(i):
            raise InvalidArgument(f"the draft model's token {i} differs from the model's", field="draft_path")


def load_draft(loader, engine, path, *, max_vram: int, max_ram: int, **kwargs) -> None:
    """Loads the draft model at path with loader (the scheduler's) beside engine, in what the
    memory limits leave it, with engine's context length, and attaches it (closed on failure)."""
    from . import lifecycle

    draft = loader(path, context_length=engine.info.context_length,
                   max_vram=lifecycle.left_beside([engine], "cuda", max_vram, "--max-vram", "max_vram"),
                   max_ram=lifecycle.left_beside([engine], "cpu", max_ram, "--max-ram", "max_ram"), **kwargs)
    try:
        engine.attach_draft(draft)
    except BaseException:
        draft.close()
        raise


class DraftProposer:
    def __init__(self, engine):
        self.engine = engine          # the draft model's Engine
        self._mirror: dict = {}       # target seq_id -> its mirror Sequence in the draft engine

    def propose(self, wants: list) -> dict[int, list[int]]:
        """{target seq_id: up to k greedy draft tokens} for wants [(target sequence, k)]; {} when
        the draft model's KV cache cannot hold them this step (the target then decodes plainly)."""
        eng = self.engine
        runs = []
        try:
            for s, k in wants:
                m = self._mirror.get(s.seq_id)
                if m is None:
                    m = self._mirror[s.seq_id] = eng.new_sequence(s.prompt_ids, SamplingParams(temperature=0.0))
                self._sync(m, s)
                runs.append((s.seq_id, m, k, len(m.output_ids)))
            live = runs
            while live:
                eng.step([m for _, m, _, _ in live])
                live = [r for r in live if len(r[1].output_ids) - r[3] < r[2]]
        except ResourceExhausted:
            for _, m, _, _ in runs:  # start over next time, from the prefix cache
                self._drop(m)
            return {}
        return {sid: m.output_ids[base:base + k] for sid, m, k, base in runs}

    def _sync(self, m, s) -> None:
        """m (mirror) takes s's output; its KV is kept only up to their first difference."""
        p = len(s.prompt_ids)
        mine = np.asarray(m.output_ids[:max(0, m.num_cached - p)], np.int64)
        theirs = np.asarray(s.output_ids[:mine.size], np.int64)
        diff = np.flatnonzero(mine[:theirs.size] != theirs)
        common = p + (int(diff[0]) if diff.size else min(mine.size, theirs.size))
        if m.num_cached > common:
            m.num_cached = common
            self.engine.allocator.trim(m.block_table, common + 1)
        m.output_ids[:] = s.output_ids

    def _drop(self, m) -> None:
        self.engine.release(m)
        m.output_ids.clear()

    def release(self, seq) -> None:
        m = self._mirror.pop(seq.seq_id, None)
        if m is not None:
            self.engine.release(m)

    def close(self) -> None:
        self._mirror.clear()
        self.engine.close()
