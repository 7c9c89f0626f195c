"""Loading a GGUF model into an Engine: open, validate, size, then commit memory.

Everything is checked and sized before the first weight is made resident, so a bad or oversized
file leaves nothing allocated. The weights sized and the weights loaded are one list, the
`weight_packing.Plan` of the file under its adapter's packs.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

from . import weight_packing
from .adapters import adapter_for
from .backends.base import Backend
from .backends.factory import make_backend
from .engine import Engine, ModelInfo
from .errors import InvalidArgument, OutOfRange
from .gguf_model import GGUFModel
from .kv_cache import BlockAllocator
from .prompt_guard import trim_heap

DEFAULT_MAX_CONTEXT = 8192
#: weight bytes loaded between two Backend.release_map calls
LOAD_RELEASE_BYTES = 4 << 20


def load_engine(path, *, model_id: str | None = None, backend: str | Backend = "auto", context_length: int = 0,
                max_sequences: int = 64, max_vram: int = 0, kv_cache_bytes: int = 0, block_size: int = 16,
                max_context: int = DEFAULT_MAX_CONTEXT, progress=None, max_ram: int = 0,
                kv_cache_type: str = "") -> Engine:
    """Opens, validates and loads a GGUF model. max_ram: bytes the CPU backend may plan for (0: what
    the machine has available, less a margin). kv_cache_type: f16, q8_0 or f32 where the backend
    stores it ("": the backend's kv_type, its default unless set)."""
    model = GGUFModel(os.fspath(path))
    try:
        return _load(model, model_id=model_id, backend=backend, context_length=context_length,
                     max_sequences=max_sequences, max_vram=max_vram, max_ram=max_ram,
                     kv_cache_bytes=kv_cache_bytes, block_size=block_size, max_context=max_context,
                     progress=progress, kv_cache_type=kv_cache_type)
    except BaseException:
        model.close()
        raise


@dataclass
class Sizing:
    """What a load of a model will take, computed from the file's header and tensor infos alone:
    the numbers LoadModel's admission check compares and a dry run (LoadModel dry_run) reports."""
    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int  # the step workspace a device backend reserves (0 on the CPU backend)
    step_bytes: int  # the CPU backend's peak per-step activations (0 on a device backend)
    num_blocks: int
    context_length: int
    available: int | None  # what the backend may allocate (None: unbounded)
    memory_name: str
    backend: str
    kv_cache_type: str
    needed: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.needed.values())


class _Opened:
    """A validated model: its adapter, the weights to load, tokenizer and served context length."""

    def __init__(self, model: GGUFModel, context_length: int, max_context: int):
        from .tokenizer import Tokenizer
        from .validation import check_hparams, validate_model

        adapter_cls = adapter_for(model.arch)
        check_hparams(model)  # before the adapter divides by them
        self.adapter = adapter = adapter_cls(model)
        validate_model(model, adapter)
        # Tensors no forward pass reads are neither loaded nor counted: on the CPU each would be
        # dequantized whole into float32 (a hostile file can carry gigabytes of them).
        used = set(adapter.required()) | adapter.optional_tensors()
        self.tensors = [t for t in model.tensors.values() if t.name in used]
        self._plans: dict = {}
        self.tokenizer = Tokenizer.from_gguf(model.fields)
        # The header's checks and the vocabulary's construction freed tens of MiB (Gemma 3's
        # 262k tokens) that glibc would keep beside the weights
        trim_heap()
        self.hp = hp = adapter.hp
        trained = hp.context_length
        if context_length and context_length > trained:
            raise OutOfRange(f"{context_length} exceeds the model's trained context length {trained}",
                             field="context_length")
        self.ctx_len = int(context_length or min(trained, max_context))

    def plan(self, be: Backend) -> weight_packing.Plan:
        """The weights to load on `be`: the adapter's packs under the tuning switches, less the
        widening a backend without it asks (the CPU's products read every byte of a widened part)."""
        switches = weight_packing.Switches.from_env()
        if not be.widen_packs:
            switches = dataclasses.replace(switches, widen=False)
        if switches not in self._plans:
            self._plans[switches] = weight_packing.plan(self.tensors, self.adapter.packing, self.hp.n_layers, switches)
        return self._plans[switches]


def _choose_kv_type(be: Backend, adapter, kind: str) -> None:
    """Sets be.kv_type, or raises InvalidArgument naming kv_cache_type."""
    kind = kind or be.kv_type
    if kind not in be.kv_types:
        raise InvalidArgument(f"{kind!r} is not a KV cache type the {be.name} backend stores "
                              f"(it stores {', '.join(be.kv_types)})", field="kv_cache_type")
    layout = adapter.kv_layout(1, 1)
    if kind == "q8_0" and (layout.head_dim_k % 32 or layout.head_dim_v % 32):
        raise InvalidArgument(f"q8_0 needs head dimensions in blocks of 32; this model's are "
                              f"{layout.head_dim_k} (keys) and {layout.head_dim_v} (values)",
                              field="kv_cache_type")
    be.kv_type = kind


def _size(opened: _Opened, be: Backend, *, max_sequences: int, kv_cache_bytes: int, block_size: int) -> Sizing:
    adapter, hp, ctx_len = opened.adapter, opened.hp, opened.ctx_len
    weights_bytes, largest = opened.plan(be).nbytes(be)
    per_token = adapter.kv_layout(1, 1).bytes(be.kv_elem_size)
    min_blocks = -(-ctx_len // block_size)
    # The workspace this model's sequences need: the load grows the backend's to it after the
    # admission check (a dry run allocates nothing). Like the part already reserved, the growth
    # is out of what is available to weights and KV cache.
    workspace = be.workspace_for(hp.vocab_size, max_sequences)
    available = be.memory_available()
    if available is not None:
        available = max(0, available - max(0, workspace - int(be.workspace_bytes)))
    # a host backend's step activations are allocated per step, not reserved up front
    step_bytes = be.step_bytes(hp, max_sequences, ctx_len, largest) if be.host_memory else 0
    # The KV cache holds what was asked for, a full context for each sequence, unless the memory
    # left beside weights and step does not hold that much (then as much as fits, at least one
    # context: a load that cannot hold one fails the admission check).
    asked = max_sequences * ctx_len * per_token
    if kv_cache_bytes:
        budget = kv_cache_bytes
    elif available is None:
        budget = asked
    else:
        budget = min(int((available - weights_bytes - step_bytes) * 0.9), asked)
    num_blocks = max(min_blocks, budget // (per_token * block_size) - 1)
    kv_bytes = adapter.kv_layout(num_blocks + 1, block_size).bytes(be.kv_elem_size)  # + the padding rows' block
    needed = {"weights": weights_bytes, "KV cache": kv_bytes}
    if step_bytes:
        needed["step activations"] = step_bytes
    return Sizing(weights_bytes=weights_bytes, kv_cache_bytes=kv_bytes, workspace_bytes=workspace,
                  step_bytes=step_bytes, num_blocks=num_blocks, context_length=ctx_len, available=available,
                  memory_name=be.memory_name, backend=be.name, kv_cache_type=be.kv_type, needed=needed)


def plan_load(path, *, backend: str | Backend = "auto", context_length: int = 0, max_sequences: int = 64,
              max_vram: int = 0, kv_cache_bytes: int = 0, block_size: int = 16,
              max_context: int = DEFAULT_MAX_CONTEXT, max_ram: int = 0, kv_cache_type: str = "") -> Sizing:
    """Sizes a load of `path` exactly as load_engine would, reading only the GGUF header and
    tensor infos (the weights stay on disk, nothing is allocated for them). Errors a load would
    raise before its first weight (a bad file, OUT_OF_RANGE context) are raised here too; whether
    it fits is the caller's to judge from `needed` and `available`."""
    model = GGUFModel(os.fspath(path))
    try:
        opened = _Opened(model, context_length, max_context)
        be = backend if isinstance(backend, Backend) else make_backend(backend, max_vram, max_ram)
        try:
            _choose_kv_type(be, opened.adapter, kv_cache_type)
            return _size(opened, be, max_sequences=max_sequences, kv_cache_bytes=kv_cache_bytes,
                         block_size=block_size)
        finally:
            if not isinstance(backend, Backend):
                be.close()
    finally:
        model.close()


def _load(model: GGUFModel, *, model_id, backend, context_length, max_sequences, max_vram, max_ram,
          kv_cache_bytes, block_size, max_context, progress, kv_cache_type) -> Engine:
    from .admission import check_fits

    t0 = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    path = model.path
    report("opening", 0, 0)
    total = model.tensor_bytes()
    report("validating", 0, total)
    opened = _Opened(model, context_length, max_context)
    adapter, tokenizer, hp, ctx_len = opened.adapter, opened.tokenizer, opened.hp, opened.ctx_len
    trained = hp.context_length

    be = backend if isinstance(backend, Backend) else make_backend(backend, max_vram, max_ram)
    try:
        _choose_kv_type(be, adapter, kv_cache_type)
        plan = opened.plan(be)
        size = _size(opened, be, max_sequences=max_sequences, kv_cache_bytes=kv_cache_bytes, block_size=block_size)
        weights_bytes, kv_bytes, num_blocks = size.weights_bytes, size.kv_cache_bytes, size.num_blocks
        check_fits(size.needed, size.available, be.memory_name)

        be.fit_workspace(size.workspace_bytes)
        be.before_weights()
        weights, done, released = {}, 0, 0
        for e in plan.entries:
            weights[e.name] = be.load_weight(e.name, e.raw(), e.qtype, e.shape)
            done += e.file_bytes
            report("loading", done, total)
            if done - released >= LOAD_RELEASE_BYTES:
                be.release_map(model)
                released = done
        be.release_map(model)
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
        workspace_bytes=int(be.workspace_bytes), backend=be.name, kv_cache_type=be.kv_type,
        has_chat_template=bool(tokenizer.chat_template), load_seconds=0.0,
        max_sequences=max_sequences)  # load_seconds: once the runner's graphs are captured, below
    engine = Engine(model, adapter, be, tokenizer, info, kv, BlockAllocator(num_blocks, block_size))
    try:
        engine.runner.prepare()
    except BaseException:
        engine.close()
        raise
    info.load_seconds = time.perf_counter() - t0
    report("ready", total, total)
    return engine
