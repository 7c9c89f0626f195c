"""The plain runner: one eager forward per plan, logits to the host, the host sampler.

It is what the NumPy backend runs, and the reference every other runner must agree with.
"""
from __future__ import annotations

import numpy as np

from .base import Backend
from .runner import (Capabilities, Launched, Runner, RunnerModel, StepPlan, StepResult, host_sample, logits_layout,
                     step_meta)


def forward_plan(backend: Backend, model: RunnerModel, plan: StepPlan):
    """Runs the plan's forward eagerly; returns its logits rows (on the backend)."""
    meta = step_meta(plan)
    if not len(meta.logits_rows):
        # Only prompt chunks that do not finish their prompt: nothing is sampled, but the forward
        # must still run to write their KV. One throwaway logits row keeps the output projection
        # at a non-empty shape on every backend.
        meta.logits_rows = np.asarray([meta.num_tokens - 1], np.int32)
    return model.forward(backend.begin_step(meta))


def host_result(plan: StepPlan, host: np.ndarray) -> StepResult:
    """Samples and logits of a plan from its logits rows on the host (logits_layout's order)."""
    res = StepResult()
    for r, (at, k) in zip(plan.rows, logits_layout(plan)):
        if r.logits:
            res.logits[r.seq_id] = host[at + k - r.logits: at + k]
        if r.sample:
            res.samples[r.seq_id] = host_sample(host[at + k - 1], r)
    return res


class HostRunner(Runner):
    def __init__(self, backend: Backend, model: RunnerModel):
        self.backend, self.model = backend, model
        self.capabilities = Capabilities(
            name=backend.name, memory="host" if backend.host_memory else "device", device_sampling=False,
            device_penalties=False, overlap=False, graphs=False, max_step_tokens=1 << 30,
            workspace_bytes=backend.workspace_bytes)

    def launch(self, plan: StepPlan) -> Launched | None:
        if plan.after is not None:
            return None
        self._copy_blocks(plan)
        logits = forward_plan(self.backend, self.model, plan)
        return Launched(plan, result=host_result(plan, self.backend.to_host(logits)))

    def collect(self, launched: Launched) -> StepResult:
        return launched.result
