"""HardwareInfoResponse.limits: what the worker accepts, read from the checks that enforce it.

Every value is the constant or setting the validating code itself compares against (imported,
never restated), so a client that sizes its requests by these can never be refused for a limit
this answer got wrong.
"""
from __future__ import annotations

from . import logit_controls, prompt_scoring, request_validation as rv, token_service

# One completion per request: ExecuteRequest has no `n` yet.
MAX_N = 1
# Constraint kinds (grammars, JSON schemas) the worker enforces: none yet.
CONSTRAINT_KINDS: tuple[str, ...] = ()


def worker_limits(pb, scheduler, max_prompt_bytes: int):
    info = scheduler.model_info
    models = []
    if info is not None:
        ctx = int(info.context_length)
        models.append(pb.ModelLimits(model_id=info.model_id, context_length=ctx, max_prompt_tokens=max(0, ctx - 1),
                                     max_tokens=max(0, ctx - 1), vocab_size=int(info.vocab_size)))
    return pb.WorkerLimits(
        max_stop_strings=rv.MAX_STOP_STRINGS, max_stop_string_bytes=rv.MAX_STOP_BYTES,
        max_stop_token_ids=rv.MAX_STOP_TOKEN_IDS, max_top_logprobs=rv.MAX_TOP_LOGPROBS,
        max_prompt_logprobs=prompt_scoring.MAX_PROMPT_LOGPROBS, max_n=MAX_N,
        max_prompt_bytes=max(0, int(max_prompt_bytes or 0)),
        max_logit_bias=logit_controls.MAX_LOGIT_BIAS, max_logit_bias_value=logit_controls.LOGIT_BIAS_LIMIT,
        max_banned_sequences=logit_controls.MAX_BANNED_SEQUENCES,
        max_banned_sequence_length=logit_controls.MAX_BANNED_SEQUENCE_LEN,
        max_request_id_length=rv.MAX_REQUEST_ID, max_detokenize_ids=token_service.MAX_DETOKENIZE_IDS,
        constraint_kinds=list(CONSTRAINT_KINDS), max_queue=int(scheduler.max_queue),
        max_sequences=int(scheduler.effective_max_sequences()), models=models)
