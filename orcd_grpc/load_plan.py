"""LoadModel's dry run: what a load would take and whether it would be admitted, without loading.

The numbers are the load's own: loader.plan_load runs the sizing load_engine runs (the same
weight plan, KV budget and step activations), the memory left beside the loaded models comes
from lifecycle.left_beside and the verdict from admission.check_fits, so a plan and the load
after it cannot disagree by construction, only by the memory available changing in between.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import lifecycle
from .admission import check_fits
from .errors import ResourceExhausted


@dataclass
class LoadPlan:
    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    step_bytes: int
    total_bytes: int
    available_bytes: int | None  # None: no limit
    fits: bool
    reason: str
    context_length: int
    max_sequences: int
    backend: str
    kv_cache_type: str


def plan(held: list, path, *, context_length: int, max_context: int, backend: str, max_vram: int,
         max_ram: int, max_sequences: int, planner=None, kv_cache_type: str = "") -> LoadPlan:
    """Plans loading `path` beside the engines in `held`; raises what the load would raise before
    its first weight, except a memory refusal, which becomes fits=False with its message."""
    from .loader import plan_load

    planner = planner or plan_load
    reason = ""
    try:
        max_vram = lifecycle.left_beside(held, "cuda", max_vram, "--max-vram", "max_vram")
        max_ram = lifecycle.left_beside(held, "cpu", max_ram, "--max-ram", "max_ram")
    except ResourceExhausted as exc:
        # the loaded models hold the whole limit: size the model as if it had it all, and say no
        reason = str(exc)
    size = planner(path, backend=backend, context_length=context_length, max_context=max_context,
                   max_sequences=max_sequences, max_vram=max_vram, max_ram=max_ram, kv_cache_type=kv_cache_type)
    available = size.available
    if reason:
        available = 0
    else:
        try:
            check_fits(size.needed, available, size.memory_name)
        except ResourceExhausted as exc:
            reason = str(exc)
    return LoadPlan(weights_bytes=int(size.weights_bytes), kv_cache_bytes=int(size.kv_cache_bytes),
                    workspace_bytes=int(size.workspace_bytes), step_bytes=int(size.step_bytes),
                    total_bytes=int(size.total), available_bytes=None if available is None else int(available),
                    fits=not reason, reason=reason, context_length=int(size.context_length),
                    max_sequences=int(max_sequences), backend=str(size.backend),
                    kv_cache_type=str(size.kv_cache_type))
