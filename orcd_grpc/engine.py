"""The engine: a loaded model (weights, tokenizer, KV cache) and the plans of its steps.

It turns the scheduler's batch into a `StepPlan` (which tokens of which sequence, where KV goes,
what is sampled) and hands it to the backend's runner (backends/runner.py); how the runner
executes it is not the engine's business. Scheduling policy (who runs, when to stop, overlapping
steps) lives in the scheduler, not here. docs/architecture.md draws the boundary.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import numpy as np

from . import quants
from .adapters import adapter_for
from .backends.base import Backend
from .backends.factory import make_backend
from .backends.runner import Launched, PlanRow, RowSampling, RunnerModel, StepPlan, StepResult
from .errors import InvalidArgument, OutOfRange, ResourceExhausted
from .gguf_model import GGUFModel
from .kv_cache import BlockAllocator
from .sampling import Sampler, TokenSample

DEFAULT_MAX_CONTEXT = 8192
CPU_KV_BUDGET = 1 << 30


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
        # Applied to the logits of its next samples (grammars, logit_bias); None: none.
        self.mask: np.ndarray | None = None
        self.bias: dict[int, float] | np.ndarray | None = None

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


class Engine:
    def __init__(self, model: GGUFModel, adapter, backend: Backend, tokenizer, info: ModelInfo,
                 kv, allocator: BlockAllocator):
        self.model, self.adapter, self.backend = model, adapter, backend
        self.tokenizer, self.info, self.kv, self.allocator = tokenizer, info, kv, allocator
        self._ids = itertools.count(1)
        # The block past the allocator's range is the runner's, for rows that pad a step.
        self.runner = backend.runner(RunnerModel(
            forward=lambda ctx: self.adapter.forward(ctx, self.kv), hp=adapter.hp,  # close() drops the KV
            n_experts_used=int(getattr(adapter, "n_used", 0) or 0), block_size=allocator.block_size,
            pad_block=allocator.num_blocks, table_width=allocator.blocks_for(info.context_length),
            max_sequences=info.max_sequences))
        self.capabilities = self.runner.capabilities
        self.max_step_tokens = self.capabilities.max_step_tokens

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
        return Sequence(next(self._ids), [int(t) for t in prompt_ids], sampling, Sampler(sampling))

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
        # A step still queued on the device may write this sequence's KV into these blocks:
        # harmless, since the device runs it before any step of the blocks' next owner, and the
        # block it writes holds no full prompt block (the only kind the prefix cache shares).
        self.allocator.release(seq.block_table)
        seq.num_cached = 0

    # ---- plans ---------------------------------------------------------------------------
    def _schedule(self, seqs: list[Sequence], token_budget: int,
                  all_logits: bool = False) -> tuple[list[tuple[Sequence, int]], list[PlanRow]]:
        """(sequence, tokens) of each sequence with pending tokens, chunking prompts to the
        budget, and the plan's row of each; their KV blocks are allocated here. One pass, lean:
        it runs for every sequence of every step."""
        chosen, rows, budget = [], [], min(token_budget, self.max_step_tokens)
        alloc, ctx_len = self.allocator, self.info.context_length
        bs = alloc.block_size
        for s in seqs:
            bt, out = s.block_table, s.output_ids
            if s.num_cached == 0 and not bt:
                s.num_cached = s.cached_prompt_tokens = alloc.match_prefix(s.prompt_ids, bt)
            start, p = s.num_cached, len(s.prompt_ids)
            total = p + len(out)
            if start >= total:
                continue
            n = min(total - start, budget) if start < p else total - start
            if n <= 0:
                continue
            if start + n > ctx_len:
                raise OutOfRange(f"sequence {s.seq_id} exceeds the context length {ctx_len}", field="context")
            if -(-(start + n) // bs) > len(bt):
                alloc.ensure(bt, start + n)
            budget -= n
            chosen.append((s, n))
            sample = not all_logits and start + n == total
            tokens = [out[start - p]] if n == 1 and start >= p else s.tokens(start, start + n)
            rows.append(PlanRow(s.seq_id, tokens, start, n, bt, s.prompt_ids, out, s.row, sample, len(out),
                                n if all_logits else 0, s.mask if sample else None, s.bias if sample else None))
        return chosen, rows

    @staticmethod
    def _fed_row(s: Sequence) -> PlanRow:
        """s's next decode row when its input is the sample of the step in flight."""
        return PlanRow(s.seq_id, None, s.num_cached, 1, s.block_table, s.prompt_ids, s.output_ids, s.row, True,
                       len(s.output_ids) + 1, 0, s.mask, s.bias)

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

        after: a launched step of exactly seqs whose samples the caller has not collected; the
        step planned is then the decode step that follows it, fed its tokens where they are, or
        None when the runner cannot queue it so (the caller collects `after` and plans anew), the
        context is full or the KV cache has no block for it."""
        if after is None:
            chosen, rows = self._schedule(seqs, token_budget)
            if not chosen:
                return None
            launched = self.runner.launch(StepPlan(rows, self.allocator.block_size))
            self._advance(chosen)
            return launched
        # the runner checks that `after` is a step of these rows it can feed
        ctx_len = self.info.context_length
        if not after.feeds or any(s.num_cached >= ctx_len for s in seqs):
            return None
        try:
            for s in seqs:
                self.allocator.ensure(s.block_table, s.num_cached + 1)
        except ResourceExhausted:
            return None  # the next ordinary step reports it (and the scheduler preempts)
        plan = StepPlan([self._fed_row(s) for s in seqs], self.allocator.block_size, after=after)
        launched = self.runner.launch(plan)
        plan.after = None  # fed or declined: held on, each step would keep every earlier one alive
        if launched is not None:
            self._advance([(s, 1) for s in seqs])
        return launched

    def collect(self, launched: Launched) -> dict[int, TokenSample]:
        """{seq_id: sample} of a launched step. The caller appends each token it accepts to its
        sequence's output_ids (a step planned after that sees it)."""
        return self.runner.collect(launched).samples

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
                s.output_ids.append(int(sample.token_id))
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
        self.runner.close()
        self.kv = None
        self.adapter.w = {}
        self.backend.close()
        self.model.close()


def load_engine(path, *, model_id: str | None = None, backend: str | Backend = "auto", context_length: int = 0,
                max_sequences: int = 64, max_vram: int = 0, kv_cache_bytes: int = 0, block_size: int = 16,
                max_context: int = DEFAULT_MAX_CONTEXT, progress=None, max_ram: int = 0) -> Engine:
    """Opens, validates and loads a GGUF model. Everything is checked and sized before memory is
    committed, so a bad or oversized file leaves nothing allocated. max_ram: bytes the CPU backend
    may plan for (0: what the machine has available, less a margin)."""
    model = GGUFModel(os.fspath(path))
    try:
        return _load(model, model_id=model_id, backend=backend, context_length=context_length,
                     max_sequences=max_sequences, max_vram=max_vram, max_ram=max_ram,
                     kv_cache_bytes=kv_cache_bytes, block_size=block_size, max_context=max_context,
                     progress=progress)
    except BaseException:
        model.close()
        raise


def _load(model: GGUFModel, *, model_id, backend, context_length, max_sequences, max_vram, max_ram,
          kv_cache_bytes, block_size, max_context, progress) -> Engine:
    from .admission import check_fits, cpu_step_bytes
    from .tokenizer import Tokenizer
    from .validation import check_hparams, validate_model

    t0 = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    path = model.path
    report("opening", 0, 0)
    total = model.tensor_bytes()
    report("validating", 0, total)
    adapter_cls = adapter_for(model.arch)
    check_hparams(model)  # before the adapter divides by them
    adapter = adapter_cls(model)
    validate_model(model, adapter)
    # Tensors no forward pass reads are neither loaded nor counted: on the CPU each would be
    # dequantized whole into float32 (a hostile file can carry gigabytes of them).
    used = set(adapter.required()) | adapter.optional_tensors()
    tensors = [t for t in model.reader.tensors if t.name in used]
    tokenizer = Tokenizer.from_gguf(model.fields)
    hp = adapter.hp

    trained = hp.context_length
    if context_length and context_length > trained:
        raise OutOfRange(f"{context_length} exceeds the model's trained context length {trained}",
                         field="context_length")
    ctx_len = int(context_length or min(trained, max_context))

    be = backend if isinstance(backend, Backend) else make_backend(backend, max_vram, max_ram)
    try:
        # Parts of types that widen exactly to Q8_0 (qwen2.5's Q4_K_M files: Q/K Q5_0, V Q8_0) fuse
        # as one Q8_0 matrix: qwen2.5-0.5b's B=1 step 1,157 -> 1,048 us (H100, 2026-11-23);
        # ORCD_FUSE_WIDEN=0 off. Failing that, Q and K fused where V's type differs (1,318 -> 1,232
        # us with ORCD_SPLIT_VIEWS, same day); ORCD_FUSE_QK=0 off.
        fused = (adapter.fused_weights(qk=os.environ.get("ORCD_FUSE_QK", "1") == "1",
                                       widen=os.environ.get("ORCD_FUSE_WIDEN", "1") == "1")
                 if os.environ.get("ORCD_FUSE_WEIGHTS", "1") != "0" else {})
        # the groups whose types differ: the adapter grouped them because they widen to Q8_0
        widened = {n for names in fused.values() if len({int(model.tensor(n).tensor_type) for n in names}) > 1
                   for n in names}
        weights_bytes = largest = 0
        for t in tensors:  # as loaded: widened parts take Q8_0's bytes
            shape = GGUFModel.logical_shape(t)
            qt, nb = ((quants.T.Q8_0, quants.nbytes(quants.T.Q8_0, shape)) if t.name in widened
                      else (t.tensor_type, int(t.n_bytes)))
            n = be.weight_nbytes(qt, shape, nb)
            weights_bytes, largest = weights_bytes + n, max(largest, n)
        per_token = adapter.kv_layout(1, 1).bytes(be.kv_elem_size)
        min_blocks = -(-ctx_len // block_size)
        available = be.memory_available()
        # a host backend's step activations are allocated per step, not reserved up front
        step_bytes = cpu_step_bytes(hp, max_sequences, ctx_len, largest) if be.host_memory else 0
        if kv_cache_bytes:
            budget = kv_cache_bytes
        elif available is None:
            budget = min(CPU_KV_BUDGET, max_sequences * ctx_len * per_token)
        else:
            budget = min(int((available - weights_bytes - step_bytes) * 0.9), max_sequences * ctx_len * per_token)
            if be.host_memory:
                budget = min(budget, CPU_KV_BUDGET)
        num_blocks = max(min_blocks, budget // (per_token * block_size) - 1)
        kv_bytes = adapter.kv_layout(num_blocks + 1, block_size).bytes(be.kv_elem_size)
        needed = {"weights": weights_bytes, "KV cache": kv_bytes}
        if step_bytes:
            needed["step activations"] = step_bytes
        check_fits(needed, available, be.memory_name)

        weights, done = {}, 0
        members = {n: new for new, names in fused.items() for n in names}
        for t in tensors:
            if t.name not in members:
                weights[t.name] = be.load_weight(t.name, t.data, t.tensor_type, GGUFModel.logical_shape(t))
            done += int(t.n_bytes)
            report("loading", done, total)
        for new, names in fused.items():  # row-concatenated copies replace their parts
            parts = [model.tensor(n) for n in names]
            shapes = [GGUFModel.logical_shape(t) for t in parts]
            qtype = parts[0].tensor_type
            raws = [np.ascontiguousarray(t.data).reshape(-1).view(np.uint8) for t in parts]
            if names[0] in widened:
                qtype = quants.T.Q8_0
                raws = [quants.widen_to_q8_0(r, t.tensor_type) for r, t in zip(raws, parts)]
            shape = (sum(sh[0] for sh in shapes), *shapes[0][1:])
            weights[new] = be.load_weight(new, np.concatenate(raws), qtype, shape)
        kv = be.alloc_kv(adapter.kv_layout(num_blocks + 1, block_size))  # + the padding rows' block
        report("warming", total, total)
        adapter.n_ctx = ctx_len  # the context served per sequence (phi3 picks its rope factors by it)
        adapter.bind(be, weights)
    except BaseException:
        be.close()
        raise

    name = model_id or os.path.basename(path).removesuffix(".gguf")
    info = ModelInfo(
        model_id=name, path=path, architecture=model.arch, name=model.name(), parameters=model.parameters(),
        tensor_types=model.tensor_types(), context_length=ctx_len, trained_context_length=trained,
        vocab_size=hp.vocab_size, weights_bytes=weights_bytes, kv_cache_bytes=kv_bytes,
        workspace_bytes=int(be.workspace_bytes), backend=be.name,
        has_chat_template=bool(tokenizer.chat_template), load_seconds=time.perf_counter() - t0,
        max_sequences=max_sequences)
    engine = Engine(model, adapter, be, tokenizer, info, kv, BlockAllocator(num_blocks, block_size))
    report("ready", total, total)
    return engine

