"""The engine: a loaded model (weights, tokenizer, KV cache) and a step that advances a batch.

`step` runs one forward pass over a batch of sequences — prompt chunks of those still prefilling
and one token of each decoding one — and samples a token for every sequence whose prompt is
complete. Scheduling policy (who runs, when to stop) lives in the scheduler, not here.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend, StepMeta
from .errors import InvalidArgument, OutOfRange, ResourceExhausted
from .gguf_model import GGUFModel
from .kv_cache import BlockAllocator
from .sampling import Sampler, TokenSample

# Batch sizes that decode steps are padded to and captured at as CUDA graphs.
GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _max_step_tokens(hp, workspace_bytes: int, n_exp: int = 0, max_sequences: int = 1) -> int:
    """Tokens one step may carry so that its activations fit the backend's step workspace
    (0: no limit): what the sampled rows' logits and sampling buffers leave, over twice the
    float32 rows a layer keeps alive at once per token. At most 65,535 (a kernel grid's rows)."""
    if not workspace_bytes:
        return 1 << 30
    workspace_bytes -= 2 * 4 * hp.vocab_size * max(1, max_sequences)
    ffn = 3 * hp.d_ff * max(1, n_exp) + (n_exp * hp.d_model if n_exp else 0)
    attn = 2 * (hp.n_heads * hp.head_dim + hp.n_kv_heads * (hp.head_dim + hp.head_dim_v))
    per_token = 4 * (6 * hp.d_model + attn + ffn)
    return max(16, min(65535, int(workspace_bytes) // (2 * per_token)))


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

    @property
    def vram_bytes(self) -> int:
        """What the loaded model holds on its device: weights, KV cache and step workspace."""
        return int(self.weights_bytes) + int(self.kv_cache_bytes) + int(self.workspace_bytes)


@dataclass
class _Inflight:
    """A decode step queued on the device whose tokens the host has not read: its batch, the
    backend's handle, and each sequence's release count when it was queued (one released
    meanwhile has moved on)."""
    seqs: list
    handle: object
    epochs: list

    def intact(self) -> bool:
        return all(s.epoch == e for s, e in zip(self.seqs, self.epochs))


class Sequence:
    """Engine-side state of one request."""

    def __init__(self, seq_id: int, prompt_ids: list[int], sampling, sampler, max_tokens: int = 0):
        self.seq_id = seq_id
        # output tokens at which the caller stops it (0: not known): lookahead queues no step past it
        self.max_tokens = int(max_tokens)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.sampler = sampler
        self.num_cached = 0            # tokens whose KV is in the cache
        self.cached_prompt_tokens = 0  # prompt tokens reused from the prefix cache
        self.block_table: list[int] = []
        # The GPU sampler's Philox key: the request's seed, or fresh entropy when it has none
        # (so unseeded requests differ, as on the host sampler).
        seed = getattr(sampling, "seed", None)
        self.device_seed = int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little")
        self.device_row = None  # its packed GPU sampling parameters, made on first use
        self.epoch = 0  # times its KV was released (a step queued before that is not its own any more)

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


def _take_sample(s: Sequence, res, r: int) -> TokenSample:
    """Row r of a device sampling's result (ids, logprobs[, top ids, top logprobs]) as s's next token."""
    top = []
    if s.sampling.top_logprobs:
        k = s.sampling.top_logprobs
        top = [(int(i), float(lp)) for i, lp in zip(res[2][r, :k], res[3][r, :k])]
    sample = TokenSample(token_id=int(res[0][r]), logprob=float(res[1][r]), top=top)
    s.output_ids.append(sample.token_id)
    return sample


def _penalised(p) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def make_backend(kind: str = "auto", max_vram: int = 0, max_ram: int = 0) -> Backend:
    if kind in ("auto", "cuda"):
        try:
            from .backends.cuda import CudaBackend, cuda_present
            if cuda_present():
                return CudaBackend(max_vram=max_vram)
            if kind == "cuda":
                raise InvalidArgument("no CUDA GPU is visible to this process", field="backend")
        except ImportError as exc:
            if kind == "cuda":
                raise InvalidArgument(f"the CUDA backend is unavailable: {exc}", field="backend") from exc
    elif kind != "cpu":
        raise InvalidArgument(f"unknown backend {kind!r} (auto, cpu, cuda)", field="backend")
    from .admission import ram_limit
    from .backends.numpy_backend import NumpyBackend
    return NumpyBackend(max_ram=ram_limit(max_ram))


class Engine:
    def __init__(self, model: GGUFModel, adapter, backend: Backend, tokenizer, info: ModelInfo,
                 kv, allocator: BlockAllocator):
        self.model, self.adapter, self.backend = model, adapter, backend
        self.tokenizer, self.info, self.kv, self.allocator = tokenizer, info, kv, allocator
        self._ids = itertools.count(1)
        # The block past the allocator's range takes the KV writes of padding rows (see _meta).
        self.pad_block = allocator.num_blocks
        self._table_width = allocator.blocks_for(info.context_length)  # padded steps' block-table width
        self.max_step_tokens = _max_step_tokens(adapter.hp, getattr(backend, "workspace_bytes", 0),
                                                 int(getattr(adapter, "n_used", 0) or 0), info.max_sequences)
        graphs = getattr(backend, "supports_graphs", False) and os.environ.get("ORCD_CUDA_GRAPHS", "1") != "0"
        self.graph_buckets = [b for b in GRAPH_BUCKETS if b <= max(1, info.max_sequences)] if graphs else []
        self.device_sampling = callable(getattr(backend, "sample", None))
        # The backend's packed-row sampler and its row packer, when it has them (CUDA): resolved
        # once here, not on every step.
        self._pack_row = getattr(backend, "pack_sampling_row", None)
        self._sample_packed = getattr(backend, "sample_packed", None) if self._pack_row is not None else None
        # Lookahead: a decode step of an unchanged batch is queued on the device before the host
        # reads the previous step's tokens (they are fed to it on the device), so the host's work
        # between steps (planning, the scheduler, streaming) overlaps the GPU instead of idling it.
        # ORCD_LOOKAHEAD=0 turns it off.
        self.lookahead = (self._sample_packed is not None and hasattr(backend, "sample_packed_async")
                          and bool(self.graph_buckets) and os.environ.get("ORCD_LOOKAHEAD", "1") != "0")
        self._inflight: _Inflight | None = None

    # ---- sequences -----------------------------------------------------------------------
    def new_sequence(self, prompt_ids: list[int], sampling, max_tokens: int = 0) -> Sequence:
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
        # Edge values run as their limit here, so the packed device rows get them too.
        sampling = sampling.effective(vocab)
        return Sequence(next(self._ids), [int(t) for t in prompt_ids], sampling, Sampler(sampling), max_tokens)

    def can_admit(self, seq: Sequence) -> bool:
        # Conservative: ignores blocks the prefix cache may supply.
        return self.allocator.can_fit(seq.block_table, seq.total_len + 1)

    def prefix_hit_tokens(self) -> int:
        return self.allocator.hit_tokens

    def free_blocks(self) -> int:
        return self.allocator.free_blocks

    def total_blocks(self) -> int:
        return self.allocator.num_blocks

    def release(self, seq: Sequence) -> None:
        # A queued lookahead step may still write this sequence's KV into these blocks: harmless,
        # since the device runs it before any step of the blocks' next owner, and the block it
        # writes holds no full prompt block (the only kind the prefix cache shares).
        self.allocator.release(seq.block_table)
        seq.num_cached = 0
        seq.epoch += 1

    # ---- stepping ------------------------------------------------------------------------
    def _plan(self, seqs: list[Sequence], token_budget: int) -> list[tuple[Sequence, int]]:
        plan, budget = [], min(token_budget, self.max_step_tokens)
        for s in seqs:
            if s.num_cached == 0 and not s.block_table:
                s.num_cached = s.cached_prompt_tokens = self.allocator.match_prefix(s.prompt_ids, s.block_table)
            pending = s.total_len - s.num_cached
            if pending <= 0:
                continue
            n = min(pending, budget) if s.prefill_remaining > 0 else pending
            if n <= 0:
                continue
            if s.num_cached + n > self.info.context_length:
                raise OutOfRange(f"sequence {s.seq_id} exceeds the context length {self.info.context_length}",
                                 field="context")
            self.allocator.ensure(s.block_table, s.num_cached + n)
            budget -= n
            plan.append((s, n))
        return plan

    def _meta(self, plan, all_logits: bool, pad_to: int = 0) -> StepMeta:
        """The step's metadata. With pad_to (decode steps replayed as a CUDA graph) the batch is
        padded to pad_to one-token rows and the block tables to the longest a sequence can have,
        so every step of a bucket has the same shapes; padding rows write their KV into
        pad_block and attend to that one slot."""
        bs = self.allocator.block_size
        B = len(plan)
        if pad_to:
            nb = max(pad_to, B)
            tables = np.full((nb, self._table_width), -1, np.int32)
            tables[B:, 0] = self.pad_block
            pos = np.zeros(nb, np.int32)
            ids = np.zeros(nb, np.int32)
            slots = np.full(nb, self.pad_block * bs, np.int32)
            for b, (s, _) in enumerate(plan):
                p = s.num_cached
                tables[b, : len(s.block_table)] = s.block_table
                pos[b] = p
                ids[b] = s.output_ids[-1]  # a padded step is all decode (_bucket): its token was generated
                slots[b] = s.block_table[p // bs] * bs + p % bs
            ar = np.arange(nb + 1, dtype=np.int32)
            return StepMeta(token_ids=ids, positions=pos, q_starts=ar, ctx_lens=pos + 1, slot_mapping=slots,
                            block_tables=tables, block_size=bs, logits_rows=ar[:nb])
        ids, pos, slots, starts, ctx_lens, rows = [], [], [], [0], [], []
        width = max(len(s.block_table) for s, _ in plan)
        tables = np.full((B, width), -1, np.int32)
        for b, (s, n) in enumerate(plan):
            p = np.arange(s.num_cached, s.num_cached + n, dtype=np.int32)
            table = np.asarray(s.block_table, np.int32)
            tables[b, : len(table)] = table
            ids.extend(s.tokens(s.num_cached, s.num_cached + n))
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            if all_logits:
                rows.extend(range(starts[-1], starts[-1] + n))
            elif s.num_cached + n == s.total_len:
                rows.append(starts[-1] + n - 1)
            starts.append(starts[-1] + n)
            ctx_lens.append(s.num_cached + n)
        return StepMeta(
            token_ids=np.asarray(ids, np.int32), positions=np.concatenate(pos),
            q_starts=np.asarray(starts, np.int32), ctx_lens=np.asarray(ctx_lens, np.int32),
            slot_mapping=np.concatenate(slots).astype(np.int32), block_tables=tables,
            block_size=bs, logits_rows=np.asarray(rows, np.int32))

    def _bucket(self, plan) -> int:
        """The graph bucket of a pure decode step (every sequence adds its one new token), or 0."""
        if not self.graph_buckets or len(plan) > self.graph_buckets[-1]:
            return 0
        if any(n != 1 or s.num_cached < len(s.prompt_ids) for s, n in plan):
            return 0
        return next(b for b in self.graph_buckets if b >= len(plan))

    def _forward(self, plan, all_logits: bool = False, feed=None, overlap: bool = False):
        """overlap (lookahead, a captured decode graph): queued behind the step already on the
        device instead of after waiting for it; feed: that step's sampling, whose tokens are this
        step's inputs."""
        bucket = 0 if all_logits else self._bucket(plan)
        meta = self._meta(plan, all_logits, pad_to=bucket)
        if bucket:
            queued = {"feed": feed, "overlap": True} if overlap else {}
            logits = self.backend.graph_step(("decode", bucket), meta, lambda ctx: self.adapter.forward(ctx, self.kv),
                                             **queued)
        else:
            if not len(meta.logits_rows):
                # Only prompt chunks that do not finish their prompt: nothing is sampled, but the
                # forward must still run to write their KV. One throwaway logits row keeps the
                # output projection at a non-empty shape on every backend.
                meta.logits_rows = np.asarray([meta.num_tokens - 1], np.int32)
            ctx = self.backend.begin_step(meta)
            logits = self.adapter.forward(ctx, self.kv)
        for s, n in plan:
            before = s.num_cached
            s.num_cached += n
            if before < len(s.prompt_ids):
                self.allocator.register_prefix(s.prompt_ids, s.block_table, s.num_cached)
        return meta, logits

    def step(self, seqs: list[Sequence], token_budget: int = 2048) -> dict:
        fl, self._inflight = self._inflight, None
        if fl is not None:  # a changed batch only settles what was queued ahead
            if len(fl.seqs) == len(seqs) and all(a is b for a, b in zip(fl.seqs, seqs)) and fl.intact():
                self._inflight = self._launch_ahead(fl)
            return self._collect(fl, seqs)
        plan = self._plan(seqs, token_budget)
        if not plan:
            return {}
        if self._lookahead_ok(plan, self._bucket(plan)):
            cur = self._launch(plan, feed=None)
            self._inflight = self._launch_ahead(cur)
            return self._collect(cur, seqs)
        meta, logits = self._forward(plan)
        sampling = [s for s, n in plan if s.num_cached == s.total_len]
        if not sampling:
            return {}
        if self.device_sampling:
            return self._sample_on_device(logits, sampling)
        host = self.backend.to_host(logits)
        out = {}
        for row, s in enumerate(sampling):
            sample = s.sampler.sample(host[row], s.prompt_ids, s.output_ids)
            s.output_ids.append(int(sample.token_id))
            out[s.seq_id] = sample
        return out

    # ---- lookahead ------------------------------------------------------------------------
    def _lookahead_ok(self, plan, bucket: int) -> bool:
        """A pure decode step on a captured graph, sampled on the device without penalties (which
        need the host's token history): the kind of step that can be queued ahead."""
        return (self.lookahead and bucket > 0 and self.backend.graph_ready(("decode", bucket))
                and all(s.num_cached >= len(s.prompt_ids) and not _penalised(s.sampling) for s, _ in plan))

    def _launch(self, plan, feed) -> "_Inflight":
        """Queues a decode step and its sampling without waiting. feed: the step queued before it,
        whose sampled tokens (not yet on the host) are this step's inputs."""
        seqs = [s for s, _ in plan]
        _, logits = self._forward(plan, feed=None if feed is None else feed.handle, overlap=True)
        if logits.shape[0] != len(seqs):
            logits = logits.row_slice(0, len(seqs))
        # a fed step samples the token after the one still in flight
        prm = self._packed_rows(seqs, ahead=0 if feed is None else 1)
        n_top = max(s.sampling.top_logprobs for s in seqs)
        handle = self.backend.sample_packed_async(logits, prm, np.zeros(2, np.int32), n_top)
        return _Inflight(seqs, handle, [s.epoch for s in seqs])

    def _launch_ahead(self, cur: "_Inflight") -> "_Inflight | None":
        """Queues the next decode step of cur's batch, fed cur's tokens, or None when it cannot
        or need not be queued (the context is full, the KV cache has no block for it, cur ends a
        sequence by its max_tokens)."""
        seqs = cur.seqs
        # cur's token is not in output_ids yet: a sequence it brings to its max_tokens ends there,
        # and a step queued past that would only keep the GPU from the next request
        if any(s.num_cached + 1 > self.info.context_length or 0 < s.max_tokens <= len(s.output_ids) + 1
               for s in seqs):
            return None
        try:
            for s in seqs:
                self.allocator.ensure(s.block_table, s.num_cached + 1)
        except ResourceExhausted:
            return None  # the next ordinary step reports it (and the scheduler preempts)
        plan = [(s, 1) for s in seqs]
        bucket = self._bucket(plan)
        if not self._lookahead_ok(plan, bucket):
            return None
        return self._launch(plan, feed=cur)

    def _collect(self, fl: "_Inflight", keep: list[Sequence]) -> dict:
        """Waits for a queued step's tokens and hands them to the sequences of `keep`. A sequence
        released meanwhile (finished, cancelled) drops its token; one that is intact but no longer
        in the batch (only a step queued ahead can have such) drops it too and gives back the KV
        position it computed, so its next step computes it again (the same token: sampling is a
        function of the position)."""
        res = self.backend.sample_result(fl.handle)
        kept = {id(s) for s in keep}
        out = {}
        for r, s in enumerate(fl.seqs):
            if s.epoch != fl.epochs[r]:
                continue  # released while the step ran
            if id(s) not in kept:
                s.num_cached -= 1
                continue
            out[s.seq_id] = _take_sample(s, res, r)
        return out

    def drain(self) -> None:
        """Settles a step queued ahead (its tokens are kept by the sequences it ran for)."""
        fl, self._inflight = self._inflight, None
        if fl is not None:
            self._collect(fl, fl.seqs)

    def _packed_rows(self, seqs: list[Sequence], ahead: int = 0) -> np.ndarray:
        """The sampling rows of seqs for the backend's packed sampler. Kept cheap for large batches:
        each row's parameters are packed once per sequence; per step only the Philox counter (the
        index of the token sampled: ahead more than the tokens on the host) changes."""
        prm = np.empty((len(seqs), 16), np.uint32)
        for r, s in enumerate(seqs):
            row = s.device_row
            if row is None:
                p = s.sampling
                row = s.device_row = self._pack_row(p.temperature, p.top_k, p.top_p, p.min_p, s.device_seed)
            prm[r] = row
        prm[:, 6] = [len(s.output_ids) + ahead for s in seqs]
        return prm

    def _sample_on_device(self, logits, seqs: list[Sequence]) -> dict:
        """Sampling on the backend: only token ids and logprobs cross to the host."""
        if logits.shape[0] != len(seqs):  # a padded graph step: the real rows come first
            logits = logits.row_slice(0, len(seqs))
        n_top = max(s.sampling.top_logprobs for s in seqs)
        penalised = any(_penalised(s.sampling) for s in seqs)
        if not penalised and self._sample_packed is not None:
            res = self._sample_packed(logits, self._packed_rows(seqs), np.zeros(2, np.int32), n_top)
        else:
            rows = []
            for s in seqs:
                p = s.sampling
                pen = _penalised(p)
                rows.append({"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
                             "seed": s.device_seed, "counter": len(s.output_ids),
                             "repetition_penalty": p.repetition_penalty, "presence_penalty": p.presence_penalty,
                             "frequency_penalty": p.frequency_penalty,
                             "prompt_ids": s.prompt_ids if pen else (), "output_ids": s.output_ids if pen else ()})
            res = self.backend.sample(logits, rows, n_top)
        return {s.seq_id: _take_sample(s, res, r) for r, s in enumerate(seqs)}

    def check_finite(self) -> None:
        """One test step whose logits must all be finite, before the engine serves
        (admission.check_finite_logits)."""
        from .admission import check_finite_logits

        check_finite_logits(self)

    def gpu_info(self) -> dict | None:
        fn = getattr(self.backend, "gpu_info", None)
        return fn() if callable(fn) else None

    def score(self, seq: Sequence, new_tokens: list[int] | None = None) -> np.ndarray:
        """Teacher forcing for tests: appends new_tokens (as output), computes every pending
        token and returns the logits of each, [n, vocab]."""
        self.drain()
        if new_tokens:
            seq.output_ids.extend(int(t) for t in new_tokens)
        plan = self._plan([seq], 1 << 30)
        if not plan:
            raise InvalidArgument("the sequence has no token to score", field="new_tokens")
        _, logits = self._forward(plan, all_logits=True)
        return self.backend.to_host(logits)

    def close(self) -> None:
        self._inflight = None
        self.kv = None
        self.adapter.w = {}
        self.backend.close()
        self.model.close()


def __getattr__(name: str):
    # load_engine lives in loader.py (which imports this module); kept importable from here
    if name == "load_engine":
        from .loader import load_engine

        return load_engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
