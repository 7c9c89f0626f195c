"""What a request router asks a worker: its load right now (snapshot) and, for one prompt, how much
of it the prefix cache holds and its estimated wait (Probe), from the scheduler's one estimator
(admission_queue.StartEstimator, the one behind Started's estimate and the deadline refusal).
Everything here reads; nothing queues, allocates or reorders the cache.
"""
from __future__ import annotations

import math

from . import prompt_guard, request_validation as rv
from .errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange

def snapshot(scheduler) -> dict:
    """The worker's load now: model, queue, batch, KV blocks, recent step time, admission."""
    stats = scheduler.stats()
    engine = scheduler.engine
    free = total = bs = 0
    if engine is not None:
        free, total, bs = engine.free_blocks(), engine.total_blocks(), engine.allocator.block_size
    return {"model_id": engine.info.model_id if engine is not None else "", "queue_depth": stats["waiting"],
            "running": stats["running"], "free_kv_blocks": free, "total_kv_blocks": total, "block_size": bs,
            "recent_step_ms": 1000.0 * (scheduler.step_s() or 0.0), "accepting": scheduler.accepting()}


def probe(scheduler, req, max_prompt_bytes: int) -> dict:
    """ProbeResponse's fields for a ProbeRequest: the prompt is checked and tokenized exactly as
    Execute's input, then looked up in the prefix cache without touching it."""
    rv.check_model_id(req.model_id)
    rv.check_input(req)
    engine = scheduler.engine
    if engine is None:
        raise FailedPrecondition("no model is loaded; call LoadModel first")
    info = engine.info
    if req.model_id and req.model_id != info.model_id:
        raise NotFound(f"no model {req.model_id!r} is loaded (serving {info.model_id!r})", field="model_id")
    limits = prompt_guard.Limits(engine.tokenizer, info.context_length, max_prompt_bytes)
    ids = rv.prompt_ids(req, engine.tokenizer, info.has_chat_template, limits)
    if not ids:
        raise InvalidArgument("the input tokenizes to no tokens", field="input")
    if len(ids) >= info.context_length:
        raise OutOfRange(f"prompt is {len(ids)} tokens, context length is {info.context_length}", field="input")
    alloc = engine.allocator
    cached = alloc.cached_tokens(ids)
    load = snapshot(scheduler)
    slots = scheduler.effective_max_sequences()
    need = alloc.blocks_for(len(ids) + 1) - cached // alloc.block_size
    free_now = load["queue_depth"] == 0 and load["running"] < slots and load["free_kv_blocks"] >= need
    wait = scheduler.wait_ms(len(ids) - cached)
    if free_now:  # the estimator does not model KV blocks: starting now needs them free now
        wait = min(wait, math.ceil((len(ids) - cached) / max(1, scheduler.token_budget)) * load["recent_step_ms"])
    return {"model_id": info.model_id, "prompt_tokens": len(ids), "cached_prompt_tokens": cached,
            "queue_depth": load["queue_depth"], "running": load["running"], "max_sequences": slots,
            "free_kv_blocks": load["free_kv_blocks"], "total_kv_blocks": load["total_kv_blocks"],
            "block_size": alloc.block_size, "recent_step_ms": load["recent_step_ms"], "estimated_wait_ms": wait,
            "accepting": load["accepting"]}
