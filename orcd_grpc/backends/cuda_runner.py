"""The CUDA runner: step plans on CudaBackend, with graphs, device sampling and queued steps.

Below the plan boundary, everything the GPU path needs and nothing above it knows of:
- Pure decode steps are padded to a batch-size bucket and replayed as CUDA graphs (cuda_padding.py:
  padding rows write their KV into the model's spare block and attend to that one slot). With ORCD_MIXED_GRAPHS
  (the default) steps carrying prompt tokens are too, padded to a (rows, tokens) bucket with the
  kernels' max_q pinned to it, every bucket captured at load (prepare); otherwise they launch
  every kernel from Python.
- Sampling runs on the device from packed parameter rows (sample.cu's RowParams), packed once
  per sequence; per step only the counter word (the token's index, Philox's counter) changes.
  A sequence without a seed gets fresh entropy as its Philox key, so unseeded requests differ.
- A plan fed by the step before it (StepPlan.after) is queued behind that step before the host
  has read its tokens: the sampled ids are copied on the device into the new step's inputs, so
  the host's work between steps (scheduling, streaming) overlaps the GPU instead of idling it.
  An eager step (prompt tokens) can feed the decode step after it too, when each of its rows
  samples one token on the device: its sampling is queued without a wait.
- A row's allowed tokens (a constraint's matcher, allowed / banned ids) reach the sample kernel
  as a packed bitmask, int32 [ceil(V / 32)] per masked row: the matchers' CPU work runs after the
  forward is queued (overlapping it), and only the bitmask crosses to the device. A queued step
  with such rows has its forward queued at once and its sampling later (_Unsampled): the masks need
  the matchers past the token of the step before, which the host reads meanwhile. The sampling is
  queued when the step after it is (it feeds that step) or when the step is collected.
- Rows with a logit bias, or whose logits are wanted, fall back to host logits and the host
  sampler (the bitmask applied there too).
- Prompt log-probs (PlanRow.prompt_logprobs) are computed where the logits are (score.cu): per
  scored position only the target's log-prob and the top-N come back, never the logits rows;
  the rows sampled beside them are then gathered into one block and sampled as usual.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from .. import logs
from ..sampling import TokenSample
from .cuda_padding import GRAPH_BUCKETS, decode_meta, mixed_bucket, mixed_meta, mixed_token_buckets, verify_meta
from .cuda_sampling import pack_sampling_row
from .cuda_step import DEEP_CTX
from .host_runner import forward_plan, host_result
from .runner import (MAX_SCORE_TOP, Capabilities, Launched, PlanRow, PromptScores, RowSampling, Runner, RunnerModel,
                     StepPlan, StepResult, fill_bitmasks, logits_layout, max_logits_rows, max_step_tokens, score_targets)

class _RowState:
    """What the runner keeps per sequence (RowSampling.state): its Philox key and packed row."""
    __slots__ = ("seed", "row")

    def __init__(self, seed: int, row: np.ndarray):
        self.seed, self.row = seed, row


def _samples(res, rows: list[PlanRow]) -> dict[int, TokenSample]:
    """{seq_id: sample} of a device sampling's result (ids, logprobs[, top ids, top logprobs])."""
    toks, lps = res[0].tolist(), res[1].tolist()
    out = {}
    for i, r in enumerate(rows):
        k = r.sampling.params.top_logprobs
        # a masked row lists no disallowed token (the kernel gives them -inf), as the host sampler
        top = [(int(t), float(lp)) for t, lp in zip(res[2][i, :k], res[3][i, :k]) if lp > -np.inf] if k else []
        out[r.seq_id] = TokenSample(toks[i], lps[i], top)
    return out


log = logs.get_logger("orcd.cuda")

VERIFY_MAX_BATCH = 8  # speculation is for latency: verify steps of more sequences stay eager


class _Unsampled:
    """A queued step's forward whose sampling is not queued yet (Launched.pending until
    _sample_queued queues it): a step with masked rows waits for their masks."""
    __slots__ = ("logits",)

    def __init__(self, logits):
        self.logits = logits


class CudaRunner(Runner):
    def __init__(self, backend, model: RunnerModel):
        self.backend, self.model = backend, model
        tuning = backend.tuning  # ORCD_CUDA_GRAPHS, ORCD_LOOKAHEAD (orcd_grpc/tuning.py)
        self.buckets = [b for b in GRAPH_BUCKETS if b <= max(1, model.max_sequences)] if tuning.cuda_graphs else []
        # Queuing a step behind the one in flight needs that step on a captured graph (an eager
        # one would keep the host busy launching).
        self.lookahead = bool(self.buckets) and tuning.lookahead
        self.feed_eager = tuning.feed_eager  # ORCD_FEED_EAGER (with lookahead)
        self.mixed_graphs = bool(self.buckets) and tuning.mixed_graphs  # ORCD_MIXED_GRAPHS
        self.feed_changed = self.lookahead and tuning.feed_changed  # ORCD_FEED_CHANGED
        self.deep_graphs = bool(tuning.attn_splits_deep)  # ORCD_ATTN_SPLITS_DEEP: _decode_key
        self.mixed_tokens = mixed_token_buckets(tuning)
        self.verify_buckets = [b for b in self.buckets if b <= VERIFY_MAX_BATCH] if tuning.verify_graphs else []
        ws = int(backend.workspace_bytes)
        self.capabilities = Capabilities(
            name=backend.name, memory="host" if backend.host_memory else "device", device_sampling=True,
            device_penalties=True, overlap=self.lookahead, overlap_changed=self.feed_changed, graphs=bool(self.buckets),
            max_step_tokens=max_step_tokens(model.hp, ws, model.n_experts_used, model.max_sequences),
            workspace_bytes=ws,
            # max_step_tokens leaves half the workspace beside the activations; a quarter of it
            # for a scoring chunk's logits rows
            max_logits_rows=max_logits_rows(model.hp.vocab_size, ws // 4, model.max_sequences) if ws else 1 << 30)

    # ---- at load ------------------------------------------------------------------------------
    def mixed_keys(self) -> list[tuple[int, int]]:
        """Every (row bucket, token bucket) a mixed step can pad to: a step carries at least a token
        a row, so a token bucket's rows, its padding row included, fit the first row bucket that
        holds as many rows as it has tokens (mixed_bucket's rule, over all steps at once)."""
        keys = []
        for tb in self.mixed_tokens:
            if tb > self.capabilities.max_step_tokens:
                break
            top = next((b for b in self.buckets if b >= tb), self.buckets[-1])
            keys += [(nb, tb) for nb in self.buckets if nb <= top]
        return keys

    def prepared_keys(self) -> list[tuple]:
        """The graph keys prepare captures (with ORCD_MIXED_GRAPHS): every decode bucket, and every
        mixed one whose tokens the padding row's table spans (that row takes all of them there)."""
        room = self.model.table_width * self.model.block_size
        return ([("decode", nb) for nb in self.buckets]
                + [("mixed", nb, tb) for nb, tb in self.mixed_keys() if tb <= room])

    def prepare(self) -> None:
        """Sizes the step metadata for the largest step the model can run (growing it later would
        drop every graph captured by then); with ORCD_MIXED_GRAPHS, captures the graph of every
        decode and mixed bucket at load, on steps of padding rows alone: a serving load meets a
        hundred-odd buckets, and each one's first steps would otherwise run eagerly and then
        capture while every stream waits."""
        rows = max(1, self.model.max_sequences)  # the graph buckets stop there too
        self.backend.reserve_step_meta(max(min(self.capabilities.max_step_tokens, 65535), rows), rows,
                                       rows * self.model.table_width)
        if not self.mixed_graphs:
            return
        empty = StepPlan([], self.model.block_size)
        keys = self.prepared_keys()
        t0, before = time.perf_counter(), self.backend.gpu_info()
        for key in keys:
            for _ in range(2):  # graph_step: the first step of a key runs eagerly, the second captures
                if not self.backend.graph_ready(key):
                    meta = (self._decode_meta(empty, key) if key[0] == "decode"
                            else mixed_meta(empty, *key[1:], self.model))
                    self.backend.graph_step(key, meta, self.model.forward)
        after = self.backend.gpu_info()
        fields = {"graphs": len(keys), "seconds": round(time.perf_counter() - t0, 3)}
        if before and after:  # what the captured graphs hold of the device (beside the reserve)
            fields["vram_mib"] = round((before["vram_free"] - after["vram_free"]) / 2**20, 1)
        log.info("graphs captured at load", extra={"fields": fields})

    # ---- launching -------------------------------------------------------------------------
    def launch(self, plan: StepPlan) -> Launched | None:
        key = self._decode_key(plan)  # None: not a pure decode step a graph bucket holds
        after = plan.after
        if after is not None:
            runs = self._feed_runs(after, plan) if after.feeds and after.result is None else None
            decode = runs is not None and self._queueable(plan, key)
            mixed = None if runs is None or decode else self._queueable_mixed(plan)
            if not decode and mixed is None:
                return None
            self._sample_queued(after)
            if decode:
                return self._queue(plan, key, feed=after.pending, runs=runs)
            return self._queued_sampling(plan, self._mixed_step(plan, *mixed, feed=after.pending, runs=runs))
        self._copy_blocks(plan)  # on the stream, ahead of the step's kernels
        if self._queueable(plan, key):
            return self._queue(plan, key, feed=None)
        verify = None if key else self._verify_key(plan)
        if key:
            logits = self.backend.graph_step(key, self._decode_meta(plan, key), self.model.forward)
        elif verify:
            nb, n = verify
            logits = self.backend.graph_step(("verify", nb, n), verify_meta(plan, nb, n, self.model),
                                             self.model.forward)
            if logits.shape[0] != len(plan.rows) * n:  # padding rows come last
                logits = logits.row_slice(0, len(plan.rows) * n)
        else:
            mixed = self._mixed_key(plan)
            if mixed:
                logits = self._mixed_step(plan, *mixed)
            else:
                logits = forward_plan(self.backend, self.model, plan)
            if self.lookahead and self.feed_eager and self._feedable(plan):
                # sampled on the device without a wait, so the decode step after it can be queued
                # behind it while the host is still to read these tokens (as behind a queued step)
                launched = Launched(plan, pending=_Unsampled(logits), feeds=True)
                self._sample_queued(launched)  # nothing is in flight for these rows: masks are current
                return launched
        return Launched(plan, result=self._sample(plan, logits))

    @staticmethod
    def _feedable(plan: StepPlan) -> bool:
        """An eager step whose samples can feed the step after it: every row samples one token on
        the device (no logits to the host, bias, scoring, drafts or penalties) from its one logits row."""
        return all(r.sample and not r.logits and r.bias is None and not r.scored and r.drafts is None
                   and not r.sampling.penalised for r in plan.rows)

    def collect(self, launched: Launched) -> StepResult:
        if launched.result is None:
            self._sample_queued(launched)
            res = self.backend.sample_result(launched.pending)
            launched.result = StepResult(_samples(res, launched.plan.rows))
        return launched.result

    def settle(self, launched: Launched) -> None:
        self._sample_queued(launched)

    def _bucket(self, plan: StepPlan) -> int:
        """The graph bucket of a pure decode step (every sequence adds its one new token), or 0."""
        rows = plan.rows
        if not self.buckets or len(rows) > self.buckets[-1]:
            return 0
        if any(r.n != 1 or r.logits or not r.sample or r.start < len(r.prompt_ids) for r in rows):
            return 0
        return next(b for b in self.buckets if b >= len(rows))

    def _decode_key(self, plan: StepPlan) -> tuple | None:
        """The graph key of a pure decode step, ("decode", bucket), or None (_bucket). With
        ORCD_ATTN_SPLITS_DEEP, a step whose deepest row holds more than DEEP_CTX keys has a graph of its
        own per bucket ("decode", nb, "deep"), whose attention may take that many key slices."""
        bucket = self._bucket(plan)
        if not bucket:
            return None
        deep = self.deep_graphs and max(r.start + 1 for r in plan.rows) > DEEP_CTX
        return ("decode", bucket, "deep") if deep else ("decode", bucket)

    def _decode_meta(self, plan: StepPlan, key: tuple):
        """The padded metadata of a decode step replaying graph `key` (_decode_key)."""
        return decode_meta(plan, key[1], self.model, deep=len(key) > 2)

    def _verify_key(self, plan: StepPlan) -> tuple[int, int] | None:
        """(batch bucket, tokens per row) of a speculative verify step that can replay a graph: every
        row a verify row (its last token and drafts, every position's logits back) with the same
        number of tokens, at most a block (padding rows keep theirs in the one spare block)."""
        rows = plan.rows
        if not self.verify_buckets or len(rows) > self.verify_buckets[-1]:
            return None
        n = rows[0].n
        if n > plan.block_size or any(not r.drafts or r.n != n or r.logits != n or r.scored or r.bias is not None
                                      or r.mask is not None for r in rows):
            return None
        return next(b for b in self.verify_buckets if b >= len(rows)), n

    def _mixed_key(self, plan: StepPlan) -> tuple[int, int] | None:
        """(row bucket, token bucket) of a step with prompt tokens that can replay a graph
        (ORCD_MIXED_GRAPHS): no row wants logits beyond its sampled one (host logits, scoring,
        drafts), and its tokens and rows, with a padding row for the tokens it lacks, fit buckets
        the workspace holds."""
        if not self.mixed_graphs:
            return None
        rows = plan.rows
        if any(r.logits or r.scored or r.drafts is not None for r in rows):
            return None
        return mixed_bucket(sum(r.n for r in rows), len(rows), self.buckets, self.mixed_tokens,
                            self.capabilities.max_step_tokens, self.model.table_width * plan.block_size)

    def _feed_runs(self, after: Launched, plan: StepPlan) -> list[tuple[int, int, int]] | None:
        """Where the fed rows' tokens come from: [(row, after's sample, count)], the rows with
        tokens None being plan's first ones, each a sequence of `after` in after's order; None
        where the plan is not such a step. Any other shape of plan (sequences gone, new ones after
        the fed rows) needs ORCD_FEED_CHANGED."""
        before = after.plan.rows
        if len(before) == len(plan.rows) and all(a.seq_id == b.seq_id and b.tokens is None
                                                 for a, b in zip(before, plan.rows)):
            return [(0, 0, len(before))]  # the same batch: every step of an unchanged batch
        if not self.feed_changed:
            return None
        src = {r.seq_id: i for i, r in enumerate(before)}
        fed = 0
        while fed < len(plan.rows) and plan.rows[fed].tokens is None:
            fed += 1
        idx = [src.get(r.seq_id, -1) for r in plan.rows[:fed]]
        if any(i < 0 for i in idx) or any(b <= a for a, b in zip(idx, idx[1:])):
            return None
        if any(r.tokens is None for r in plan.rows[fed:]):
            return None
        runs: list[tuple[int, int, int]] = []
        for row, i in enumerate(idx):
            if runs and runs[-1][1] + runs[-1][2] == i:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((row, i, 1))
        return runs

    def _queueable_mixed(self, plan: StepPlan) -> tuple[int, int] | None:
        """The mixed bucket of a changed batch's step (ORCD_FEED_CHANGED) that can be queued: its
        graph captured, and every row sampling one token on the device without penalties or bias,
        so its samples can feed the step after it in turn."""
        mixed = self._mixed_key(plan) if self.feed_changed else None
        if mixed is None or not self.backend.graph_ready(("mixed", *mixed)) or not self._feedable(plan):
            return None
        return mixed

    def _queued_sampling(self, plan: StepPlan, logits) -> Launched:
        """A queued step's Launched: its sampling queued now unless a row is masked (then once the
        step before it is delivered: _sample_queued)."""
        launched = Launched(plan, pending=_Unsampled(logits), feeds=True)
        if not any(r.masked for r in plan.rows):
            self._sample_queued(launched, masked=False)
        return launched

    def _mixed_step(self, plan: StepPlan, nb: int, tb: int, feed=None, runs=None):
        """Replays (or captures) the graph of a mixed step's bucket; the sampled rows' logits.
        feed: queued behind the step in flight, its samples fed to the rows `runs` says."""
        logits = self.backend.graph_step(("mixed", nb, tb), mixed_meta(plan, nb, tb, self.model), self.model.forward,
                                         feed=feed, overlap=feed is not None, feed_rows=runs)
        n = sum(1 for r in plan.rows if r.sample)
        return logits if logits.shape[0] == n else logits.row_slice(0, n)

    def _queueable(self, plan: StepPlan, key: tuple | None) -> bool:
        """A pure decode step (its graph key, _decode_key) on a captured graph, sampled on the device
        without penalties (which need the host's token history) or a logit bias (sampled on the
        host): the kind of step that can be queued."""
        return (self.lookahead and key is not None and self.backend.graph_ready(key)
                and not any(r.sampling.penalised or r.bias is not None for r in plan.rows))

    def _queue(self, plan: StepPlan, key: tuple, feed, runs=None) -> Launched:
        """Queues a decode step and, unless a row is masked, its sampling, without waiting.
        feed: the sampling of the step before (its tokens, not yet on the host, are this step's
        inputs; runs: which go to which row, _feed_runs)."""
        rows = plan.rows
        logits = self.backend.graph_step(key, self._decode_meta(plan, key), self.model.forward, feed=feed, overlap=True,
                                         feed_rows=runs)
        if logits.shape[0] != len(rows):
            logits = logits.row_slice(0, len(rows))
        return self._queued_sampling(plan, logits)

    def _sample_queued(self, launched: Launched, masked: bool = True) -> None:
        """Queues the sampling of a queued step whose sampling is not queued yet, masks filled now:
        for a step with masked rows that is once the step before it has been delivered, so each
        matcher is past the token this step was fed (the forward meanwhile runs on the device).
        masked=False: the caller knows no row has a mask (no second look at every row)."""
        if not isinstance(launched.pending, _Unsampled):
            return
        rows, logits = launched.plan.rows, launched.pending.logits
        bits = fill_bitmasks(rows, logits.shape[-1]) if masked else None
        n_top = max(r.sampling.params.top_logprobs for r in rows)
        launched.pending = self.backend.sample_packed_async(logits, self._packed_rows(rows), np.zeros(2, np.int32),
                                                            n_top, bits)

    # ---- sampling --------------------------------------------------------------------------
    def _state(self, s: RowSampling) -> _RowState:
        st = s.state
        if st is None:
            p = s.params
            seed = int(p.seed) if p.seed is not None else int.from_bytes(os.urandom(8), "little")
            st = s.state = _RowState(seed, pack_sampling_row(p.temperature, p.top_k, p.top_p, p.min_p, seed))
        return st

    def _packed_rows(self, rows: list[PlanRow]) -> np.ndarray:
        """sample.cu's rows for the packed sampler: each sequence's packed once; per step only
        the Philox counter (word 6: the index of the token sampled) changes."""
        state = self._state
        prm = np.array([(r.sampling.state or state(r.sampling)).row for r in rows], np.uint32).reshape(len(rows), 16)
        prm[:, 6] = np.fromiter((r.token_index for r in rows), np.uint32, len(rows))
        return prm

    def _sample(self, plan: StepPlan, logits) -> StepResult:
        if not any(r.scored for r in plan.rows):
            return self._sample_rows(plan, logits)
        scores = self._score(plan, logits)
        plan, logits = self._without_scored(plan, logits)
        res = self._sample_rows(plan, logits) if plan.rows else StepResult()
        res.prompt_logprobs = scores
        return res

    def _score(self, plan: StepPlan, logits) -> dict[int, PromptScores]:
        """The scored rows' PromptScores, from one kernel over every scored position of the step."""
        where, targets, parts = [], [], []
        for r, (at, k) in zip(plan.rows, logits_layout(plan)):
            m = r.scored
            if m:
                end = at + k - (1 if r.sample else 0)
                where.append(np.arange(end - m, end, dtype=np.int32))
                targets.append(score_targets(r))
                parts.append((r, m))
        n_top = max(min(int(r.prompt_logprobs), MAX_SCORE_TOP) for r, _ in parts)
        lp, tid, tlp = self.backend.prompt_logprobs(logits, np.concatenate(where), np.concatenate(targets), n_top)
        out, a = {}, 0
        for (r, m), t in zip(parts, targets):
            k = min(int(r.prompt_logprobs), MAX_SCORE_TOP)
            out[r.seq_id] = PromptScores(r.start + 1, t, lp[a:a + m], tid[a:a + m, :k], tlp[a:a + m, :k])
            a += m
        return out

    def _without_scored(self, plan: StepPlan, logits):
        """The plan without its scoring, and its remaining logits rows (the sampled ones, and any
        wanted on the host) gathered into one block in logits_layout's order."""
        rows = [dataclasses.replace(r, prompt_logprobs=None) for r in plan.rows]
        keep = [(at + k - r.logits_count, r.logits_count) for r, (at, k) in zip(rows, logits_layout(plan))]
        total = sum(n for _, n in keep)
        if not total:
            return StepPlan([], plan.block_size), logits
        return StepPlan(rows, plan.block_size), self.backend.gather_row_blocks(logits, keep)

    def _sample_rows(self, plan: StepPlan, logits) -> StepResult:
        # The forward is queued on the stream: the matchers' masks are computed while it runs.
        bits = fill_bitmasks(plan.rows, logits.shape[-1])
        if any(r.logits or r.bias is not None for r in plan.rows):
            return host_result(plan, self.backend.to_host(logits), bits)  # padding rows come last: unread
        rows = [r for r in plan.rows if r.sample]
        if bits is not None and len(rows) != len(plan.rows):
            bits = np.ascontiguousarray(bits[[i for i, r in enumerate(plan.rows) if r.sample]])
        if not rows:
            return StepResult()
        if logits.shape[0] != len(rows):  # a padded graph step: the real rows come first
            logits = logits.row_slice(0, len(rows))
        n_top = max(r.sampling.params.top_logprobs for r in rows)
        if not any(r.sampling.penalised for r in rows):
            res = self.backend.sample_packed(logits, self._packed_rows(rows), np.zeros(2, np.int32), n_top, bits)
        else:
            dicts = []
            for r in rows:
                p, pen = r.sampling.params, r.sampling.penalised
                dicts.append({"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
                              "seed": self._state(r.sampling).seed, "counter": r.token_index,
                              "repetition_penalty": p.repetition_penalty, "presence_penalty": p.presence_penalty,
                              "frequency_penalty": p.frequency_penalty,
                              "prompt_ids": r.prompt_ids if pen else (), "output_ids": r.output_ids if pen else ()})
            res = self.backend.sample(logits, dicts, n_top, bits)
        return StepResult(_samples(res, rows))
