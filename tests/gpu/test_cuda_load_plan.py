"""LoadModel dry_run through a real server on the CUDA backend: the plan's bytes are the ones the
load then reports and holds in VRAM, and a plan over --max-vram loads nothing. Skipped without a
GPU (tests/conftest.py)."""
from __future__ import annotations

import pathlib
import sys

import grpc
import pytest

from .test_cuda_models import write_tiny_llama

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
from test_load_plan import Worker as _Worker  # noqa: E402  (tests/: the real-server helper)

pytestmark = pytest.mark.gpu

MiB = 1 << 20


def Worker(model_dir, **cfg):
    return _Worker(model_dir, **{"backend": "cuda", "max_context": 512, "max_sequences": 4, **cfg})


def test_cuda_plan_predicts_the_load_and_its_vram(tmp_path):
    small = write_tiny_llama(tmp_path / "small.gguf", "Q8_0")
    w = Worker(tmp_path, max_vram=1 << 30)
    try:
        w.plan(small.name)  # the first one may create the process's CUDA context
        held_before, free_before = w.used(), w.free()
        plan = w.plan(small.name)
        assert plan.backend == "cuda" and plan.fits and not plan.reason
        assert w.listed() == []  # planned, not loaded, and no VRAM kept for it
        assert abs(w.free() - free_before) < 16 * MiB and w.used() == held_before
        assert plan.has_limit and plan.available_bytes <= 1 << 30
        assert plan.weights_bytes > 0 and plan.kv_cache_bytes > 0 and plan.step_bytes == 0
        assert plan.total_bytes == plan.weights_bytes + plan.kv_cache_bytes
        model = w.load(small.name)
        assert (plan.weights_bytes, plan.kv_cache_bytes, plan.workspace_bytes) == \
            (model.weights_bytes, model.kv_cache_bytes, model.workspace_bytes)
        assert (plan.context_length, plan.max_sequences) == (model.context_length, model.max_sequences)
        # what the worker says it holds is what the plan counted (weights, KV cache, workspace)
        held = w.used() - held_before
        counted = plan.weights_bytes + plan.kv_cache_bytes + plan.workspace_bytes
        assert plan.weights_bytes + plan.kv_cache_bytes <= held <= counted + 64 * MiB, (held, counted)
        assert free_before - w.free() >= plan.weights_bytes + plan.kv_cache_bytes
    finally:
        w.close()


def test_cuda_plan_over_max_vram_does_not_fit_and_loads_nothing(tmp_path):
    # F32, d=768, 4 layers, vocab 4000: ~160 MB of weights, more than the limit on its own
    big = write_tiny_llama(tmp_path / "big.gguf", "F32", vocab=4000, d=768, n_layers=4, n_heads=8, n_kv=2, d_ff=3072)
    w = Worker(tmp_path, max_vram=128 * MiB)
    try:
        w.plan(big.name)
        held_before, free_before = w.used(), w.free()
        plan = w.plan(big.name)
        assert not plan.fits and plan.has_limit
        assert "--max-vram" in plan.reason, plan.reason
        assert plan.total_bytes > plan.available_bytes
        with pytest.raises(grpc.RpcError) as err:
            w.load(big.name)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert w.listed() == [] and w.used() == held_before
        assert abs(w.free() - free_before) < 16 * MiB  # the refused load gave back what it took
    finally:
        w.close()


def test_cuda_workspace_holds_every_sequences_logits_beside_the_default(tmp_path):
    """fit_workspace: the step workspace grows by two float32 logits rows per sequence, so a
    worker of many sequences keeps the default room for a step's activations (its prefill
    chunk); the plan predicts the load's workspace and the runner's step bound follows it."""
    from orcd_grpc.backends.runner import max_step_tokens
    from orcd_grpc.loader import load_engine, plan_load

    vocab = 4000
    path = write_tiny_llama(tmp_path / "v.gguf", "Q8_0", vocab=vocab)
    one = plan_load(path, backend="cuda", max_sequences=1, max_context=512).workspace_bytes
    many = plan_load(path, backend="cuda", max_sequences=256, max_context=512)
    assert abs((many.workspace_bytes - one) - 2 * 4 * vocab * 255) <= MiB, (many.workspace_bytes, one)
    eng = load_engine(path, backend="cuda", max_sequences=256, max_context=512)
    try:
        assert eng.info.workspace_bytes == many.workspace_bytes == eng.backend.workspace_bytes
        cap = eng.capabilities.max_step_tokens
        assert cap == max_step_tokens(eng.runner.model.hp, many.workspace_bytes, eng.runner.model.n_experts_used, 256)
        # the room a single sequence's workspace leaves its activations, to the MiB the sizes round to
        assert cap >= 0.99 * max_step_tokens(eng.runner.model.hp, one - 2 * 4 * vocab, 0, 1)
    finally:
        eng.close()
