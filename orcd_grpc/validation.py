"""Pre-load validation of a GGUF model against its adapter, before any memory is committed.

Checks, in order, each failure an InvalidArgument that names the tensor:
1. every tensor's storage type is one orcd supports (quants.SUPPORTED);
2. every tensor the adapter requires is present, with the logical shape the metadata implies;
3. every tensor's byte size agrees with its shape and type (a truncated or inconsistent tensor
   table would otherwise surface as a reshape error deep inside loading).

`check_hparams` runs before those (and before the adapter reads the hyperparameters): the
metadata's meaning, each failure an InvalidArgument that names the metadata key.
"""
from __future__ import annotations

from . import quants
from .errors import InvalidArgument
from .gguf_model import GGUFModel


def validate_model(model: GGUFModel, adapter) -> None:
    for t in model.tensors.values():
        quants.check_supported(t.tensor_type, t.name)
    for name, shape in adapter.required().items():
        if not model.has(name):
            raise InvalidArgument(f"required tensor {name!r} is missing from the file", field=name)
        got = GGUFModel.logical_shape(model.tensor(name))
        if len(got) != len(shape) or any(s is not None and g != int(s) for g, s in zip(got, shape)):
            raise InvalidArgument(f"tensor {name!r} has shape {got}, but the metadata implies {tuple(shape)}",
                                  field=name)
    for t in model.tensors.values():
        shape = GGUFModel.logical_shape(t)
        try:
            expect = quants.nbytes(t.tensor_type, shape)
        except InvalidArgument as exc:
            raise InvalidArgument(f"tensor {t.name!r}: {exc}", field=t.name) from None
        if int(t.n_bytes) != expect:
            raise InvalidArgument(f"tensor {t.name!r} holds {int(t.n_bytes)} bytes, its shape {shape} as "
                                  f"{quants.qtype_name(t.tensor_type)} needs {expect}", field=t.name)


# ---- the metadata's meaning ----------------------------------------------------------------------
# gguf_guard bounds every value the loader sizes things by, so nothing loops forever or allocates
# absurdly; these check that the values make a model that can run. Each of them once let a file
# load and replace the served model, after which every request failed INTERNAL (a ZeroDivisionError
# or IndexError inside a step) or answered garbage (NaN from a negative epsilon, no positional
# signal from rope base 0). Bounds are far outside any real model's values.

MAX_NORM_EPS = 0.1  # real models use 1e-6..1e-5; larger drowns the activations' own scale


def _key(model, suffix: str) -> str:
    return f"{model.arch}.{suffix}"


def _num(model, suffix: str, *, integer: bool = False):
    """The value of <arch>.<suffix> as a number (None when absent); a per-layer array must hold one
    value for every layer (per-layer differences are not supported)."""
    value = model.hp(suffix)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value or len(set(value)) != 1:
            raise InvalidArgument(f"per-layer values {list(value)[:8]} differ; orcd serves one value for all layers",
                                  field=_key(model, suffix))
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"must be a number, not {type(value).__name__}", field=_key(model, suffix))
    if integer and int(value) != value:
        raise InvalidArgument(f"must be an integer, got {value}", field=_key(model, suffix))
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidArgument(f"{value} is not finite", field=_key(model, suffix))
    return int(value) if integer else float(value)


def _require(cond: bool, model, suffix: str, msg: str) -> None:
    if not cond:
        raise InvalidArgument(msg, field=_key(model, suffix))


def check_hparams(model: GGUFModel) -> None:
    """Raises InvalidArgument naming the metadata key whose value no forward pass can run with.
    Runs before the adapter reads the values (it divides by some of them)."""
    m = model
    n_layers = _num(m, "block_count", integer=True)
    d = _num(m, "embedding_length", integer=True)
    heads = _num(m, "attention.head_count", integer=True)
    _require(n_layers is not None and n_layers >= 1, m, "block_count", f"must be >= 1, got {n_layers}")
    _require(d is not None and d >= 1, m, "embedding_length", f"must be >= 1, got {d}")
    _require(heads is not None and heads >= 1, m, "attention.head_count", f"must be >= 1, got {heads}")
    kv = _num(m, "attention.head_count_kv", integer=True)
    if kv is not None:
        _require(kv >= 1 and heads % kv == 0, m, "attention.head_count_kv",
                 f"{kv} does not divide attention.head_count {heads}")
    head_dim = _num(m, "attention.key_length", integer=True)
    if head_dim is None:
        _require(d % heads == 0, m, "attention.head_count",
                 f"{heads} heads do not divide embedding_length {d} (and attention.key_length is absent)")
        head_dim = d // heads
    _require(head_dim >= 1, m, "attention.key_length", f"must be >= 1, got {head_dim}")
    v_dim = _num(m, "attention.value_length", integer=True)
    _require(v_dim is None or v_dim >= 1, m, "attention.value_length", f"must be >= 1, got {v_dim}")
    rope_dim = _num(m, "rope.dimension_count", integer=True)
    if rope_dim is not None:
        # rope rotates pairs of features inside each head: an odd count leaves half a pair, one
        # larger than the head reads past it, and 0 or 1 rotates nothing (no positions at all)
        _require(2 <= rope_dim <= head_dim and rope_dim % 2 == 0, m, "rope.dimension_count",
                 f"must be even and in [2, head size {head_dim}], got {rope_dim}")
    elif head_dim % 2:
        _require(False, m, "attention.key_length", f"rope needs an even head size, got {head_dim}")
    for suffix in ("rope.freq_base", "rope.freq_base_swa"):
        base = _num(m, suffix)
        # the inverse frequencies are base^(-2i/d): 0 or below gives inf/NaN, 1 gives one frequency
        _require(base is None or base > 1.0, m, suffix, f"must be > 1, got {base}")
    for suffix in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        eps = _num(m, suffix)
        # negative: sqrt of a negative mean square (NaN); zero: 0/0 on an all-zero row
        _require(eps is None or 0.0 < eps <= MAX_NORM_EPS, m, suffix,
                 f"must be in (0, {MAX_NORM_EPS}], got {eps}")
    ctx = _num(m, "context_length", integer=True)
    _require(ctx is None or ctx >= 2, m, "context_length", f"must be >= 2, got {ctx}")
    ff = _num(m, "feed_forward_length", integer=True)
    if m.arch == "gpt-oss":
        _check_experts(m, ff)
    else:
        _require(ff is not None and ff >= 1, m, "feed_forward_length", f"must be >= 1, got {ff}")
    window = _num(m, "attention.sliding_window", integer=True)
    _require(window is None or window >= 0, m, "attention.sliding_window", f"must be >= 0, got {window}")
    pattern = m.hp("attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):
        _require(len(pattern) == n_layers, m, "attention.sliding_window_pattern",
                 f"lists {len(pattern)} layers, block_count is {n_layers}")
    elif pattern is not None:
        period = _num(m, "attention.sliding_window_pattern", integer=True)
        _require(period >= 1, m, "attention.sliding_window_pattern", f"must be >= 1, got {period}")
    for suffix in ("rope.scaling.factor", "rope.scaling.attn_factor"):
        v = _num(m, suffix)
        _require(v is None or v > 0, m, suffix, f"must be > 0, got {v}")
    orig = _num(m, "rope.scaling.original_context_length", integer=True)
    # phi3 and YaRN divide by its logarithm
    _require(orig is None or orig >= 2, m, "rope.scaling.original_context_length", f"must be >= 2, got {orig}")
    scale = _num(m, "attention.scale")
    _require(scale is None or scale >= 0, m, "attention.scale", f"must be >= 0, got {scale}")
    _check_vocab(m)
    _check_layers(m, n_layers)


def _check_experts(m: GGUFModel, ff) -> None:
    experts = _num(m, "expert_count", integer=True)
    used = _num(m, "expert_used_count", integer=True)
    _require(experts is not None and experts >= 1, m, "expert_count", f"must be >= 1, got {experts}")
    _require(used is not None and 1 <= used <= experts, m, "expert_used_count",
             f"must be in [1, expert_count {experts}], got {used}")
    eff = _num(m, "expert_feed_forward_length", integer=True)
    if eff is None:
        _require(ff is not None and ff >= 1, m, "feed_forward_length", f"must be >= 1, got {ff}")
    else:
        _require(eff >= 1, m, "expert_feed_forward_length", f"must be >= 1, got {eff}")


def _check_vocab(m: GGUFModel) -> None:
    """The token list, vocab_size and the embedding's rows describe one vocabulary: a token the
    tokenizer makes must have an embedding row, and a sampled row must have a token."""
    if m.meta("orcd.stage.first_layer") is not None:
        return  # a stage file's embedding is a slice or a hidden-state table
    n_tokens = m.fields.count("tokenizer.ggml.tokens")
    vocab = _num(m, "vocab_size", integer=True)
    if vocab is not None and n_tokens is not None:
        _require(vocab == n_tokens, m, "vocab_size", f"{vocab}, but tokenizer.ggml.tokens has {n_tokens} tokens")
    rows = GGUFModel.logical_shape(m.tensors["token_embd.weight"])[0] if m.has("token_embd.weight") else None
    want = vocab if vocab is not None else n_tokens
    if rows is not None and want is not None and rows != want:
        raise InvalidArgument(f"{want} tokens, but token_embd.weight has {rows} rows",
                              field=_key(m, "vocab_size") if vocab is not None else "tokenizer.ggml.tokens")


def _check_layers(m: GGUFModel, n_layers: int) -> None:
    """A file with more layers of tensors than block_count says would run only the first ones
    (garbage); fewer are caught as missing tensors."""
    for name in m.tensors:
        if name.startswith("blk."):
            part = name.split(".")[1]
            if not part.isdigit() or int(part) >= n_layers:
                raise InvalidArgument(f"is {n_layers}, but the file has tensor {name}", field=_key(m, "block_count"))
