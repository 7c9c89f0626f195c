"""The plain runner: one eager forward per plan, logits to the host, the host sampler.

It is what the NumPy backend runs, and the reference every other runner must agree with.
"""
from __future__ import annotations

import concurrent.futures

import numpy as np

from .base import Backend
from .runner import (Capabilities, Launched, Runner, RunnerModel, StepPlan, StepResult, fill_bitmasks, host_sample,
                     logits_layout, max_logits_rows, prompt_scores, step_meta)

# Constrained rows' bitmasks are computed here while the forward runs (both drop the GIL).
_masks = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="orcd-masks")

# Host memory a step's logits may take (a scoring prefill's chunk is cut to fit): 256 MiB is
# 1,365 positions of a 49k vocabulary, 256 of a 262k one.
HOST_LOGITS_BYTES = 256 << 20


def forward_plan(backend: Backend, model: RunnerModel, plan: StepPlan):
    """Runs the plan's forward eagerly; returns its logits rows (on the backend)."""
    meta = step_meta(plan)
    if not len(meta.logits_rows):
        # Only prompt chunks that do not finish their prompt: nothing is sampled, but the forward
        # must still run to write their KV. One throwaway logits row keeps the output projection
        # at a non-empty shape on every backend.
        meta.logits_rows = np.asarray([meta.num_tokens - 1], np.int32)
    return model.forward(backend.begin_step(meta))


def host_result(plan: StepPlan, host: np.ndarray, bits: np.ndarray | None = None) -> StepResult:
    """Samples and logits of a plan from its logits rows on the host (logits_layout's order).
    bits: the plan's bitmasks, one row per plan row (fill_bitmasks), or None."""
    res = StepResult()
    for i, (r, (at, k)) in enumerate(zip(plan.rows, logits_layout(plan))):
        if r.scored:  # the positions before the sampled one (if any) in the row's block
            end = at + k - (1 if r.sample else 0)
            res.prompt_logprobs[r.seq_id] = prompt_scores(host[end - r.scored: end], r)
        if r.logits:
            res.logits[r.seq_id] = host[at + k - r.logits: at + k]
        if r.sample:
            res.samples[r.seq_id] = host_sample(host[at + k - 1], r, None if bits is None else bits[i])
    return res


def start_masks(plan: StepPlan, model: RunnerModel):
    """The plan's bitmasks (fill_bitmasks) as a future on the mask thread when a row has a
    constraint, so that its matcher's work runs beside the forward; None otherwise."""
    if any(r.constraint is not None for r in plan.rows):
        return _masks.submit(fill_bitmasks, plan.rows, model.hp.vocab_size)
    return None


class HostRunner(Runner):
    def __init__(self, backend: Backend, model: RunnerModel):
        self.backend, self.model = backend, model
        self.capabilities = Capabilities(
            name=backend.name, memory="host" if backend.host_memory else "device", device_sampling=False,
            device_penalties=False, overlap=False, graphs=False, max_step_tokens=1 << 30,
            workspace_bytes=backend.workspace_bytes,
            max_logits_rows=max_logits_rows(model.hp.vocab_size, HOST_LOGITS_BYTES, model.max_sequences))

    def launch(self, plan: StepPlan) -> Launched | None:
        if plan.after is not None:
            return None
        masks = start_masks(plan, self.model)
        self._copy_blocks(plan)
        logits = forward_plan(self.backend, self.model, plan)
        host = self.backend.to_host(logits)
        bits = masks.result() if masks is not None else fill_bitmasks(plan.rows, host.shape[-1])
        return Launched(plan, result=host_result(plan, host, bits))

    def collect(self, launched: Launched) -> StepResult:
        return launched.result
