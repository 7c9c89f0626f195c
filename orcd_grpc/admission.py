"""What a model must pass before it replaces the served one: the host-RAM budget of the CPU backend
(what --max-vram is to the GPU) and a test step whose logits must be finite.

Both exist because a model that loads but cannot serve is worse than one refused: the swap
cancels the old model's requests and frees it, and every later request fails (MemoryError halfway
through dequantizing, NaN logits sampled as token 0, ...). Each check answers before the swap,
and the RAM check before anything is allocated.
"""
from __future__ import annotations

import numpy as np

from .errors import FailedPrecondition, OrcdError, ResourceExhausted

MiB, GiB = 1 << 20, 1 << 30
# Tokens of one CPU step used for sizing its activations: the scheduler's default token budget.
CPU_STEP_TOKENS = 2048
TEST_STEP_TOKENS = 4


# ---- host RAM ------------------------------------------------------------------------------------

def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes (what the kernel can hand out without swapping), None when unknown."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ram_margin(available: int) -> int:
    """Left to the rest of the process and the machine (the Python heap, gRPC, other programs)."""
    return max(512 * MiB, available // 20)


def ram_limit(max_ram: int = 0, meminfo: str = "/proc/meminfo") -> int | None:
    """The bytes a CPU load may plan for: --max-ram when given, never more than what the machine
    has available now less a margin; None when neither is known (no /proc, no flag)."""
    avail = meminfo_available(meminfo)
    machine = None if avail is None else max(0, avail - ram_margin(avail))
    limits = [x for x in (int(max_ram) if max_ram and max_ram > 0 else None, machine) if x is not None]
    return min(limits) if limits else None


def cpu_step_bytes(hp, max_sequences: int, context_length: int, largest_weight: int = 0) -> int:
    """Peak host bytes of one CPU step beyond weights and KV cache: a CPU_STEP_TOKENS chunk's float32
    activations (two layers' worth alive), its attention scores against the whole context (the
    NumPy attention materialises scores, probabilities and the mask per sequence), the sampled
    rows' logits; plus, while loading, the largest weight twice (dequantized, then re-laid out)."""
    t = min(CPU_STEP_TOKENS, max(1, context_length))
    attn = 2 * (hp.n_heads * hp.head_dim + hp.n_kv_heads * (hp.head_dim + hp.head_dim_v))
    per_token = 4 * (6 * hp.d_model + attn + 3 * max(1, hp.d_ff))
    scores = 3 * 4 * hp.n_heads * t * max(1, context_length)
    logits = 2 * 4 * hp.vocab_size * max(1, max_sequences)
    return 2 * per_token * t + scores + logits + 2 * int(largest_weight)


def check_fits(needed: dict[str, int], allowed: int | None, what: str) -> None:
    """ResourceExhausted when the parts in `needed` sum to more than `allowed` (None: no limit)."""
    total = sum(needed.values())
    if allowed is None or total <= allowed:
        return
    parts = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in needed.items())
    raise ResourceExhausted(f"model needs {total / GiB:.2f} GiB of {what} ({parts}), {allowed / GiB:.2f} GiB allowed",
                            field="path")


# ---- the test step -------------------------------------------------------------------------------

def check_finite_logits(engine) -> None:
    """Runs one prefill step of a few tokens on the engine's own backend and raises
    FailedPrecondition unless every logit is finite. The engine is left as it was (no KV blocks
    held, nothing in the prefix cache)."""
    from .engine import Sequence

    info, alloc = engine.info, engine.allocator
    n = max(1, min(TEST_STEP_TOKENS, info.context_length - 1, alloc.block_size - 1))
    # spread over the vocabulary rather than the first ids, which are mostly special tokens
    ids = [int(i) for i in np.linspace(0, info.vocab_size - 1, n)]
    seq = Sequence(0, ids, None, None)
    try:
        host = np.asarray(engine.score(seq), dtype=np.float32)
    except OrcdError as exc:
        if isinstance(exc, (ResourceExhausted, FailedPrecondition)):
            raise
        raise FailedPrecondition(f"the model failed a test step: {exc}") from exc
    except MemoryError as exc:
        raise ResourceExhausted("the model's test step ran out of memory", field="path") from exc
    except Exception as exc:
        raise FailedPrecondition(f"the model failed a test step: {type(exc).__name__}: {exc}") from exc
    finally:
        engine.release(seq)
    if host.shape != (n, info.vocab_size):
        raise FailedPrecondition(f"the model's test step gave logits of shape {host.shape}, "
                                 f"expected {(n, info.vocab_size)}")
    bad = int(host.size - np.count_nonzero(np.isfinite(host)))
    if bad:
        worst = "NaN" if np.isnan(host).any() else "inf"
        raise FailedPrecondition(f"model produced non-finite logits on a test step ({bad} of {host.size} "
                                 f"values are {worst}); its weights or metadata are broken")
