"""The engine: a loaded model (weights, tokenizer, KV cache) and the plans of its steps.

It turns the scheduler's batch into a `StepPlan` (which tokens of which sequence, where KV goes,
what is sampled) and hands it to the backend's runner (backends/runner.py); how the runner
executes it is not the engine's business. Scheduling policy (who runs, when to stop, overlapping
steps) lives in the scheduler, not here. docs/architecture.md draws the boundary.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from . import speculation
from .backends.base import Backend
from .backends.runner import Launched, PlanRow, RunnerModel, StepPlan, StepResult, masked, pack_bitmask
from .errors import InvalidArgument, OutOfRange, ResourceExhausted
from .gguf_model import GGUFModel
from .kv_cache import BlockAllocator
from .logit_controls import Dynamic, static_mask
from .sampling import Sampler, TokenSample
from .sequence import Sequence


@dataclass
class ModelInfo:
    model_id: str
    path: str
    architecture: str
    name: str
    parameters: int
    tensor_types: dict[str, int]
    context_length: int
    trained_context_length: int
    vocab_size: int
    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    backend: str
    has_chat_template: bool
    load_seconds: float
    max_sequences: int
    kv_cache_type: str = "f32"  # the KV cache's element: f16, q8_0 or f32
    draft_model: str = ""  # the draft model's id (draft-model speculation), "" without one
    draft_bytes: int = 0   # what the draft model holds on the same device

    @property
    def vram_bytes(self) -> int:
        """What the loaded model holds on its device: weights, KV cache and step workspace (and
        its draft model's)."""
        return int(self.weights_bytes) + int(self.kv_cache_bytes) + int(self.workspace_bytes) + int(self.draft_bytes)


class Engine:
    def __init__(self, model: GGUFModel, adapter, backend: Backend, tokenizer, info: ModelInfo,
                 kv, allocator: BlockAllocator):
        self.model, self.adapter, self.backend = model, adapter, backend
        self.tokenizer, self.info, self.kv, self.allocator = tokenizer, info, kv, allocator
        self._ids = itertools.count(1)
        self._scoring: dict[int, Sequence] = {}  # seq_id -> a sequence with scoring rows planned
        # The block past the allocator's range is the runner's, for rows that pad a step.
        self.runner = backend.runner(RunnerModel(
            forward=lambda ctx: self.adapter.forward(ctx, self.kv), hp=adapter.hp,  # close() drops the KV
            n_experts_used=int(getattr(adapter, "n_used", 0) or 0), block_size=allocator.block_size,
            pad_block=allocator.num_blocks, table_width=allocator.blocks_for(info.context_length),
            max_sequences=info.max_sequences, copy_blocks=lambda pairs: self.backend.copy_kv_blocks(self.kv, pairs)))
        self.capabilities = self.runner.capabilities
        self.max_step_tokens = self.capabilities.max_step_tokens
        self._copies: list[tuple[int, int]] = []  # block copies the next plan carries (fork)
        self.speculation: speculation.Speculation | None = None  # the default of requests that ask none
        self._verifying: dict[int, Sequence] = {}  # seq_id -> a sequence with a verify row planned
        self.draft = None  # draft_model.DraftProposer: the draft model, for speculation mode DRAFT
        self._proposed: dict[int, list[int]] = {}  # seq_id -> the draft model's drafts for this step

    # ---- sequences -----------------------------------------------------------------------
    def new_sequence(self, prompt_ids: list[int], sampling) -> Sequence:
        vocab = self.info.vocab_size
        if not prompt_ids:
            raise InvalidArgument("prompt is empty", field="input")
        bad = next((t for t in prompt_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} is outside the vocabulary (size {vocab})", field="input.tokens")
        if len(prompt_ids) >= self.info.context_length:
            raise OutOfRange(f"prompt is {len(prompt_ids)} tokens, context length is {self.info.context_length}",
                             field="input")
        sampling.validate(vocab)
        # Edge values run as their limit here, so every runner's sampler gets them too.
        sampling = sampling.effective(vocab)
        seq = Sequence(next(self._ids), [int(t) for t in prompt_ids], sampling, Sampler(sampling))
        c = sampling.controls
        if c is not None:  # built once here; a step only picks (or, with dynamic parts, derives) them
            seq.bias = dict(c.logit_bias) or None
            seq.allowed = static_mask(c, vocab)
            seq.mask = None if seq.allowed is None else pack_bitmask(seq.allowed)
            seq.dynamic = Dynamic.of(c, seq.allowed, vocab)
        spec = speculation.resolve(sampling.speculation, self.speculation)
        if spec is not None and spec.mode == speculation.DRAFT and self.draft is None:
            raise InvalidArgument("the model was loaded without a draft model", field="speculation.mode")
        if spec is not None and seq.constraint is None and seq.dynamic is None:  # see speculation.py
            seq.spec = spec
        return seq

    def can_admit(self, seq: Sequence, samples: int = 1) -> bool:
        """Whether seq's next step fits the free KV blocks; samples > 1: seq and the samples forked
        from it (Engine.fork) that share its prompt's full blocks. Conservative: ignores blocks the
        prefix cache may supply."""
        alloc = self.allocator
        need = alloc.blocks_for(seq.total_len + 1) - len(seq.block_table)
        if samples > 1:
            shared = (len(seq.prompt_ids) - 1) // alloc.block_size
            need += (samples - 1) * (alloc.blocks_for(seq.total_len + 1) - shared)
        return need <= alloc.free_blocks

    def can_admit_all(self, seqs: list[Sequence]) -> bool:
        """Whether the next step of every one of seqs fits the free KV blocks together."""
        alloc = self.allocator
        need = sum(alloc.blocks_for(s.total_len + 1) - len(s.block_table) for s in seqs)
        return need <= alloc.free_blocks

    # ---- parallel samples ----------------------------------------------------------------
    def fork(self, parent: Sequence, children: list[Sequence]) -> bool:
        """Shares parent's prompt KV with children, new sequences of the same prompt (parallel
        samples), once parent has computed all of its prompt but the last token (`hold`): then
        every sample computes that token itself, from its own row, and samples its first token
        as any sequence does. Full blocks are shared (reference counts); a partly filled last
        block is copied for each child (copy-on-write: each writes the last prompt token into
        it), the copy carried by the next plan. False: parent is not there yet. ResourceExhausted
        when the copies do not fit (nothing is changed then)."""
        alloc = self.allocator
        if parent.num_cached == 0 and not parent.block_table:
            self._match(parent)
        n = parent.hold if parent.hold is not None else parent.num_cached
        if parent.num_cached < n:
            return False
        full, partial = divmod(n, alloc.block_size)
        if partial and len(children) > alloc.free_blocks:
            raise ResourceExhausted(f"KV cache full: {len(children)} parallel samples need a block each, "
                                    f"{alloc.free_blocks} free", field="kv_cache")
        for c in children:
            c.block_table = alloc.share(parent.block_table, full)
            if partial:
                c.block_table.append(alloc.take())
                self._copies.append((parent.block_table[full], c.block_table[-1]))
            c.num_cached = c.cached_prompt_tokens = n
        parent.hold = None
        return True

    def prefix_hit_tokens(self) -> int:
        return self.allocator.hit_tokens

    def free_blocks(self) -> int:
        return self.allocator.free_blocks

    def shared_blocks(self) -> int:
        return self.allocator.shared_blocks

    def total_blocks(self) -> int:
        return self.allocator.num_blocks

    def release(self, seq: Sequence) -> None:
        # A step still queued on the device may write this sequence's KV into these blocks:
        # harmless, since the device runs it before any step of the blocks' next owner, and the
        # block it writes holds no full prompt block (the only kind the prefix cache shares).
        self.allocator.release(seq.block_table)
        seq.num_cached = 0
        self._scoring.pop(seq.seq_id, None)
        self._verifying.pop(seq.seq_id, None)
        if self.draft is not None:
            self.draft.release(seq)

    # ---- plans ---------------------------------------------------------------------------
    def _match(self, s: Sequence) -> None:
        if s.score_top is not None:  # a scored prompt is computed whole: cached positions have no logits
            return
        s.num_cached = s.cached_prompt_tokens = self.allocator.match_prefix(s.prompt_ids, s.block_table)

    def _schedule(self, seqs: list[Sequence], token_budget: int,
                  all_logits: bool = False) -> tuple[list[tuple[Sequence, int]], list[PlanRow]]:
        """(sequence, tokens) of each sequence with pending tokens, chunking prompts to the
        budget, and the plan's row of each; their KV blocks are allocated here. One pass, lean:
        it runs for every sequence of every step."""
        chosen, rows, budget = [], [], min(token_budget, self.max_step_tokens)
        score_rows = self.capabilities.max_logits_rows  # a scored position needs its logits row
        alloc, ctx_len = self.allocator, self.info.context_length
        bs = alloc.block_size
        for s in seqs:
            bt, out = s.block_table, s.output_ids
            if s.num_cached == 0 and not bt:
                self._match(s)
            start, p = s.num_cached, len(s.prompt_ids)
            total = p + len(out)
            stop = total if s.hold is None else s.hold
            if start >= stop:
                continue
            n = min(stop - start, budget) if start < p else stop - start
            scoring = s.score_top is not None and s.scored < p and start + n >= s.scored and not all_logits
            if scoring:
                n = min(n, max(1, score_rows))
                score_rows -= n
            if n <= 0:
                continue
            if start + n > ctx_len:
                raise OutOfRange(f"sequence {s.seq_id} exceeds the context length {ctx_len}", field="context")
            drafts = None
            if s.spec is not None and n == 1 and start >= p and not all_logits:
                drafts = self._drafts(s, start, budget, len(seqs)) or None
                if drafts:
                    n += len(drafts)
            if -(-(start + n) // bs) > len(bt):
                alloc.ensure(bt, start + n)
            budget -= n
            chosen.append((s, n))
            if drafts:  # a verify row: the engine samples from its logits (collect)
                row = PlanRow(s.seq_id, [out[-1], *drafts], start, n, bt, s.prompt_ids, out, s.row, False,
                              len(out), n, s.mask, s.bias, drafts=drafts)
                self._verifying[s.seq_id] = s
                rows.append(row)
                continue
            sample = not all_logits and start + n == total
            tokens = [out[start - p]] if n == 1 and start >= p else s.tokens(start, start + n)
            row = PlanRow(s.seq_id, tokens, start, n, bt, s.prompt_ids, out, s.row, sample, len(out),
                          n if all_logits else 0, s.step_mask() if sample else None,
                          s.bias if sample else None, s.constraint if sample else None)
            if scoring:
                row.prompt_logprobs = s.score_top
                self._scoring[s.seq_id] = s
            rows.append(row)
        return chosen, rows

    def _drafts(self, s: Sequence, start: int, budget: int, batch: int) -> list[int]:
        """s's drafts for this step: at most what the step's token budget, the context, the
        request's max_tokens (a verify step gives up to k + 1 tokens) and the free KV blocks
        (a batch's plain decode rows come first) leave room for."""
        spec, out = s.spec, s.output_ids
        k = min(speculation.room(s, start, self.info.context_length), budget - 1)
        if k <= 0:
            return []
        if spec.mode == speculation.DRAFT:
            drafts = self._proposed.pop(s.seq_id, [])[:k]
        else:
            drafts = speculation.propose_ngram(s.prompt_ids + out, k, spec.ngram_max, spec.ngram_min)
        alloc, bt = self.allocator, s.block_table
        spare = max(0, alloc.free_blocks - batch)
        if alloc.blocks_for(start + 1 + len(drafts)) - len(bt) > spare:
            drafts = drafts[:max(0, (len(bt) + spare) * alloc.block_size - start - 1)]
        return drafts

    def attach_draft(self, draft_engine) -> None:
        """Loads draft-model speculation: draft_engine (a smaller model of the same vocabulary,
        InvalidArgument "draft_path" otherwise) proposes the drafts of mode DRAFT; it is closed
        with this engine."""
        from .draft_model import DraftProposer, check_same_vocabulary

        check_same_vocabulary(self, draft_engine)
        self.draft = DraftProposer(draft_engine)
        self.info.draft_model = draft_engine.info.model_id
        self.info.draft_bytes = draft_engine.info.vram_bytes

    def _draft_proposals(self, seqs: list[Sequence]) -> None:
        """The draft model's drafts for this step of every sequence of mode DRAFT that decodes
        one token (batched in the draft engine), capped as _drafts caps them."""
        wants = []
        for s in seqs:
            spec = s.spec
            if spec is None or spec.mode != speculation.DRAFT or s.hold is not None:
                continue
            start = s.num_cached
            if start < len(s.prompt_ids) or start != s.total_len - 1:
                continue
            k = speculation.room(s, start, self.info.context_length)
            if k > 0:
                wants.append((s, k))
        self._proposed = self.draft.propose(wants) if wants else {}

    def _settle(self, row: PlanRow, res: StepResult) -> None:
        """A verify row's tokens from its logits (speculation.verify), as the row's sample (the
        first, the rest in its `following`), and its KV rolled back past the kept drafts."""
        s = self._verifying.pop(row.seq_id, None)
        logits = res.logits.pop(row.seq_id, None)
        if s is None or logits is None or not s.block_table:  # released meanwhile: nobody waits
            return
        prepare = (lambda x: masked(x, row)) if row.mask is not None or row.bias is not None else None
        tokens, kept = speculation.verify(logits, row.drafts, s.sampler, s.prompt_ids, s.output_ids, prepare)
        s.draft_tokens += len(row.drafts)
        s.accepted_drafts += kept
        s.num_cached = row.start + 1 + kept
        self.allocator.trim(s.block_table, s.num_cached + 1)
        first = tokens[0]
        first.following = tokens[1:]
        res.samples[row.seq_id] = first

    @staticmethod
    def _fed_row(s: Sequence) -> PlanRow:
        """s's next decode row when its input is the sample of the step in flight."""
        return PlanRow(s.seq_id, None, s.num_cached, 1, s.block_table, s.prompt_ids, s.output_ids, s.row, True,
                       len(s.output_ids) + 1, 0, s.mask, s.bias, s.constraint)

    def _advance(self, chosen) -> None:
        for s, n in chosen:
            before = s.num_cached
            s.num_cached += n
            if before < len(s.prompt_ids):
                self.allocator.register_prefix(s.prompt_ids, s.block_table, s.num_cached)

    # ---- stepping ------------------------------------------------------------------------
    def launch(self, seqs: list[Sequence], token_budget: int = 2048, after: Launched | None = None) -> Launched | None:
        """Starts one step of seqs and returns it (collect() gives its samples), or None when
        there is nothing to run.

        after: a launched step whose samples the caller has not collected, of exactly seqs or
        (where the runner can take a changed batch, ORCD_FEED_CHANGED) of seqs' first ones, in
        its order, without those gone since; the step planned is then the decode step of those
        that follows it, fed its tokens where they are, and seqs' others' next tokens (each new
        sequence whole and sampled, else none of this), or None when the runner cannot queue it so
        (the caller collects `after` and plans anew), the context is full or the KV cache has no
        block for it."""
        if after is None:
            if self.draft is not None:
                self._draft_proposals(seqs)
            chosen, rows = self._schedule(seqs, token_budget)
            if not chosen:
                return None
            launched = self.runner.launch(StepPlan(rows, self.allocator.block_size, copies=self._copies))
            self._copies = []
            self._advance(chosen)
            return launched
        # the runner checks that `after` is a step of these rows it can feed
        ctx_len = self.info.context_length
        if not after.feeds or self._copies or any(s.num_cached >= ctx_len or s.hold is not None for s in seqs):
            return None
        # a speculating sequence's next step is a verify row, planned from the tokens delivered
        if any(s.spec is not None for s in seqs):
            return None
        # A mask that follows the output needs the token still in flight. A constraint's matcher
        # is read when the runner samples the step, after that token is delivered; the dynamic
        # parts of a mask (banned sequences, min_tokens) are planned here: plan after it instead.
        if any(s.dynamic is not None and not s.dynamic.settled(len(s.output_ids) + 1) for s in seqs):
            return None
        before = after.plan.rows
        if len(before) == len(seqs) and all(r.seq_id == s.seq_id for r, s in zip(before, seqs)):
            fed, fresh = len(seqs), []  # the same batch: every step of an unchanged batch comes here
        else:  # a changed batch (ORCD_FEED_CHANGED)
            if not self.capabilities.overlap_changed or self.draft is not None:
                return None
            in_flight = {r.seq_id for r in before}
            fed = 0
            while fed < len(seqs) and seqs[fed].seq_id in in_flight:
                fed += 1
            fresh = seqs[fed:]
            # a new sequence's whole next step must fit and be sampled: nothing of it is in flight
            if not fed or any(s.seq_id in in_flight or s.score_top is not None or s.hold is not None for s in fresh):
                return None
        try:
            for s in seqs[:fed]:
                self.allocator.ensure(s.block_table, s.num_cached + 1)
            chosen, rows = self._schedule(fresh, token_budget - fed) if fresh else ([], [])
        except ResourceExhausted:
            return None  # the next ordinary step reports it (and the scheduler preempts)
        if len(chosen) != len(fresh) or not all(r.sample for r in rows):
            return None  # a prompt longer than the step: it is chunked, unsampled, in an ordinary one
        plan = StepPlan([self._fed_row(s) for s in seqs[:fed]] + rows, self.allocator.block_size, after=after)
        launched = self.runner.launch(plan)
        plan.after = None  # fed or declined: held on, each step would keep every earlier one alive
        if launched is not None:
            self._advance([(s, 1) for s in seqs[:fed]] + chosen)
        return launched

    def settle(self, launched: Launched) -> None:
        """The launched step's masked sampling queued now: the caller has appended the tokens of
        the step before it (so its sequences' matchers are past them) and has host work left."""
        self.runner.settle(launched)

    def collect(self, launched: Launched) -> dict[int, TokenSample]:
        """{seq_id: sample} of a launched step; a verify row's further tokens are in its
        sample's `following`. The caller appends each token it accepts to its sequence's
        output_ids (a step planned after that sees it)."""
        res = self.runner.collect(launched)
        for seq_id, sc in res.prompt_logprobs.items():
            self._keep_scores(seq_id, sc)
        if self._verifying:
            for row in launched.plan.rows:
                if row.drafts is not None:
                    self._settle(row, res)
        return res.samples

    def _keep_scores(self, seq_id: int, sc) -> None:
        """Queues a row's prompt scores on its sequence, without positions already delivered."""
        s = self._scoring.get(seq_id)
        if s is None:  # released meanwhile: nobody waits for them
            return
        skip = max(0, s.scored - sc.first)
        if skip >= len(sc.targets):
            return
        if skip:
            sc = type(sc)(sc.first + skip, sc.targets[skip:], sc.logprobs[skip:], sc.top_ids[skip:],
                          sc.top_logprobs[skip:])
        s.prompt_scores.append(sc)
        s.scored = sc.first + len(sc.targets)
        if s.scored >= len(s.prompt_ids):
            del self._scoring[seq_id]

    def step(self, seqs: list[Sequence], token_budget: int = 2048) -> dict[int, TokenSample]:
        """One step, waited for, its tokens appended (callers without a loop of their own:
        tests, tools). The scheduler overlaps steps instead (overlap.Overlap)."""
        launched = self.launch(seqs, token_budget)
        if launched is None:
            return {}
        out = self.collect(launched)
        for s in seqs:
            sample = out.get(s.seq_id)
            if sample is not None:
                for t in (sample, *sample.following):
                    s.append(int(t.token_id))
        return out

    def score(self, seq: Sequence, new_tokens: list[int] | None = None) -> np.ndarray:
        """Teacher forcing: appends new_tokens (as output), computes every pending token and
        returns the logits of each, [n, vocab]."""
        if new_tokens:
            seq.output_ids.extend(int(t) for t in new_tokens)
        chosen, rows = self._schedule([seq], 1 << 30, all_logits=True)
        if not chosen:
            raise InvalidArgument("the sequence has no token to score", field="new_tokens")
        result: StepResult = self.runner.run(StepPlan(rows, self.allocator.block_size))
        self._advance(chosen)
        return result.logits[seq.seq_id]

    def check_finite(self) -> None:
        """One test step whose logits must all be finite, before the engine serves
        (admission.check_finite_logits)."""
        from .admission import check_finite_logits

        check_finite_logits(self)

    def gpu_info(self) -> dict | None:
        return self.backend.gpu_info()

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
            self.draft = None
        self.runner.close()
        self.kv = None
        self.adapter.w = {}
        self.backend.close()
        self.model.close()
