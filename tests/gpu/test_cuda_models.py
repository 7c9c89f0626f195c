"""Whole models on the CUDA backend against the NumPy backend, through the engine.

- A tiny random llama written here with gguf.GGUFWriter (F32, Q8_0 and Q4_0 weights, a dummy SPM
  vocabulary): logits of a teacher-forced prompt agree within 2e-2 relative (Q8_0/Q4_0 matmuls
  run f16 tensor-core tiles and the KV cache is f16; F32 weights: 5e-3), and 24 greedy tokens
  are identical.
- Real files when staged (smollm2_path, gemma3_path): teacher-forced top-1 agreement >= 99 %
  over several prompts, and the first 32 greedy tokens identical.
- A model larger than max_vram is refused with ResourceExhausted before anything is allocated,
  and the backend keeps working.
"""
from __future__ import annotations

import numpy as np
import pytest

from orcd_grpc.errors import ResourceExhausted

pytestmark = pytest.mark.gpu


def write_tiny_llama(path, qtype: str, *, vocab=320, d=256, n_layers=3, n_heads=8, n_kv=2, d_ff=512, seed=0,
                     v_qtype: str | None = None, qkv_bias: bool = False, ctx: int = 512):
    """A random llama GGUF; v_qtype: attn_v in another type (as qwen2.5's Q4_K_M files have it);
    qkv_bias: Q/K/V biases (as qwen2 has); ctx: its trained context length."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(d)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // n_heads)
    w.add_rope_freq_base(10000.0)
    # A dummy SPM vocabulary: three specials, then plain pieces.
    toks = ["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(vocab - 3)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    qt = QT[qtype]

    def mat(name, n, k, scale, t=None):
        t = qt if t is None else QT[t]
        a = (rng.standard_normal((n, k)) * scale).astype(np.float32)
        if t == QT.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)

    hd = d // n_heads
    mat("token_embd.weight", vocab, d, 1.0)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    mat("output.weight", vocab, d, 1 / np.sqrt(d))
    for i in range(n_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        w.add_tensor(b + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        mat(b + "attn_q.weight", n_heads * hd, d, 2 / np.sqrt(d))
        mat(b + "attn_k.weight", n_kv * hd, d, 2 / np.sqrt(d))
        mat(b + "attn_v.weight", n_kv * hd, d, 1 / np.sqrt(d), v_qtype)
        if qkv_bias:
            for part, rows in (("q", n_heads * hd), ("k", n_kv * hd), ("v", n_kv * hd)):
                w.add_tensor(b + f"attn_{part}.bias", (0.5 * rng.standard_normal(rows)).astype(np.float32))
        mat(b + "attn_output.weight", d, n_heads * hd, 0.5 / np.sqrt(d))
        mat(b + "ffn_gate.weight", d_ff, d, 1 / np.sqrt(d))
        mat(b + "ffn_up.weight", d_ff, d, 1 / np.sqrt(d))
        mat(b + "ffn_down.weight", d, d_ff, 0.5 / np.sqrt(d_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _seq(engine, prompt):
    from orcd_grpc.engine import Sequence

    return Sequence(next(engine._ids), list(prompt), None, None)


def teacher_forced(engine, prompt):
    s = _seq(engine, prompt)
    try:
        return engine.score(s)
    finally:
        engine.release(s)


def greedy(engine, prompt, n):
    s = _seq(engine, prompt)
    try:
        logits = engine.score(s)
        out = []
        for _ in range(n):
            t = int(np.argmax(logits[-1]))
            out.append(t)
            logits = engine.score(s, [t])
        return out
    finally:
        engine.release(s)


def _pair(path, **kw):
    from orcd_grpc.loader import load_engine

    return (load_engine(path, backend="cuda", max_sequences=4, max_context=512, **kw),
            load_engine(path, backend="numpy", max_sequences=4, max_context=512, **kw))


@pytest.mark.parametrize("qtype,tol", [("F32", 5e-3), ("Q8_0", 2e-2), ("Q4_0", 2e-2)])
def test_tiny_llama_matches_numpy(tmp_path, qtype, tol):
    path = write_tiny_llama(tmp_path / f"tiny-{qtype}.gguf", qtype)
    gpu, cpu = _pair(path)
    try:
        assert gpu.info.backend == "cuda"
        rng = np.random.default_rng(7)
        for n in (1, 13, 70):  # one token; a short prompt; a prompt over several KV blocks
            prompt = [1] + rng.integers(3, 320, n).tolist()
            a, b = teacher_forced(gpu, prompt), teacher_forced(cpu, prompt)
            err = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert err < tol, f"{qtype} n={n}: relative logits error {err:.2e}"
        prompt = [1] + rng.integers(3, 320, 9).tolist()
        assert greedy(gpu, prompt, 24) == greedy(cpu, prompt, 24)
    finally:
        gpu.close()
        cpu.close()


_QWEN_LAYOUT_SWITCHES = {
    "widened": {},  # the defaults: Q/K/V as one Q8_0 matrix, views, the norm's / GLU's int8 rounding
    "widened-copies-quantize": {"ORCD_SPLIT_VIEWS": "0", "ORCD_FUSE_Q8": "0"},
    "fuse-qk": {"ORCD_FUSE_WIDEN": "0", "ORCD_SPLIT_VIEWS": "0", "ORCD_FUSE_Q8": "0"},
    "fuse-qk-views": {"ORCD_FUSE_WIDEN": "0", "ORCD_FUSE_Q8": "0"},
    "fuse-qk-views-q8": {"ORCD_FUSE_WIDEN": "0"},
}


@pytest.mark.parametrize("switches", list(_QWEN_LAYOUT_SWITCHES))
def test_tiny_qwen_layout_with_fused_qk(tmp_path, switches, monkeypatch):
    """qwen2.5's layout (Q/K in one type, V in another, Q/K/V biases): Q/K/V widened to one Q8_0
    matrix (ORCD_FUSE_WIDEN), or Q and K fused alone (ORCD_FUSE_QK), a one-row split as views
    (ORCD_SPLIT_VIEWS), the int8 rounding written by the norm / GLU (ORCD_FUSE_Q8), each on and
    off: the CUDA engine against the NumPy one."""
    for var, value in _QWEN_LAYOUT_SWITCHES[switches].items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("ORCD_GEMV_INT8_MIN", "0")  # the tiny matrices take the int8 GEMVs too
    path = write_tiny_llama(tmp_path / "tiny-mixed.gguf", "Q4_0", v_qtype="Q8_0", qkv_bias=True)
    gpu, cpu = _pair(path)
    try:
        fused = "attn_qk_fused" if switches.startswith("fuse-qk") else "attn_qkv_fused"
        assert f"blk.0.{fused}.weight" in gpu.adapter.w
        rng = np.random.default_rng()
        for n in (1, 40):
            prompt = [1] + rng.integers(3, 320, n).tolist()
            a, b = teacher_forced(gpu, prompt), teacher_forced(cpu, prompt)
            err = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert err < 3e-2, f"n={n}: relative logits error {err:.2e}"
        # one-token steps: where the views and the norm's / GLU's int8 rounding apply
        prompt = [1] + rng.integers(3, 320, 9).tolist()
        sg, sc = _seq(gpu, prompt), _seq(cpu, prompt)
        try:
            gpu.score(sg), cpu.score(sc)
            for t in rng.integers(3, 320, 8).tolist():
                a, b = gpu.score(sg, [t]), cpu.score(sc, [t])
                assert a.shape == b.shape == (1, 320)
                err = np.linalg.norm(a - b) / np.linalg.norm(b)
                assert err < 3e-2, f"one-token step: relative logits error {err:.2e}"
        finally:
            gpu.release(sg)
            cpu.release(sc)
    finally:
        gpu.close()
        cpu.close()


def _prompts(engine):
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
             "Water boils at a temperature of", "List three primary colors:"]
    return [engine.tokenizer.encode(t, add_bos=True) if _has_add_bos(engine) else engine.tokenizer.encode(t)
            for t in texts]


def _has_add_bos(engine):
    import inspect

    try:
        return "add_bos" in inspect.signature(engine.tokenizer.encode).parameters
    except (TypeError, ValueError):
        return False


@pytest.mark.parametrize("which", ["smollm2_path", "gemma3_path"])
def test_real_model_agrees(request, which):
    try:
        path = request.getfixturevalue(which)
    except Exception as exc:  # not staged and not fetchable (the GPU machine has no network)
        pytest.skip(f"{which}: {exc}")
    gpu, cpu = _pair(path)
    try:
        agree = total = 0
        prompts = _prompts(cpu)
        for p in prompts:
            cont = greedy(cpu, p, 16)
            a, b = teacher_forced(gpu, p + cont), teacher_forced(cpu, p + cont)
            agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
            total += len(b)
        assert agree / total >= 0.99, f"top-1 agreement {agree}/{total}"
        assert greedy(gpu, prompts[0], 32) == greedy(cpu, prompts[0], 32)
    finally:
        gpu.close()
        cpu.close()


def test_model_over_max_vram_is_refused_and_backend_survives(tmp_path):
    from orcd_grpc.backends.cuda import CudaBackend
    from orcd_grpc.loader import load_engine

    path = write_tiny_llama(tmp_path / "big.gguf", "F32", vocab=4000, d=512, n_layers=4, d_ff=2048)
    be = CudaBackend(max_vram=48 << 20, workspace_bytes=16 << 20)  # the model's weights are ~60 MB
    try:
        before = be.budget.used
        with pytest.raises(ResourceExhausted):
            load_engine(path, backend=be, max_sequences=1, max_context=256)
    finally:
        be.close()
    assert be.budget.used == 0 and before > 0
    # A fresh backend (the worker's next load) still works.
    small = write_tiny_llama(tmp_path / "small.gguf", "Q8_0")
    from orcd_grpc.loader import load_engine as le

    eng = le(small, backend="cuda", max_sequences=2, max_context=256)
    try:
        assert len(greedy(eng, [1, 5, 6, 7], 4)) == 4
    finally:
        eng.close()
