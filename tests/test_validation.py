"""Pre-load validation: a bad file is refused with InvalidArgument naming the offending tensor,
before any weights are loaded; the same file without the defect loads (control)."""
from __future__ import annotations

import pathlib
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from orcd_grpc.errors import InvalidArgument
from orcd_grpc.loader import load_engine

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
from gguf_export import write_dummy_vocab  # noqa: E402

D, FF, NH, NKV, HD, V = 64, 128, 2, 1, 32, 300


def _write(path, *, drop=None, reshape=None, qtype_of=None):
    """A 1-layer llama GGUF with random weights. drop: tensor name left out; reshape: name ->
    wrong logical shape; qtype_of: name -> storage type (random block bytes)."""
    rng = np.random.default_rng()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1); w.add_context_length(128); w.add_embedding_length(D)
    w.add_feed_forward_length(FF); w.add_head_count(NH); w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5); w.add_rope_freq_base(10000.0); w.add_rope_dimension_count(HD)
    write_dummy_vocab(w, V)
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D),
              "blk.0.attn_norm.weight": (D,), "blk.0.ffn_norm.weight": (D,),
              "blk.0.attn_q.weight": (NH * HD, D), "blk.0.attn_k.weight": (NKV * HD, D),
              "blk.0.attn_v.weight": (NKV * HD, D), "blk.0.attn_output.weight": (D, NH * HD),
              "blk.0.ffn_gate.weight": (FF, D), "blk.0.ffn_up.weight": (FF, D), "blk.0.ffn_down.weight": (D, FF)}
    for name, shape in shapes.items():
        if name == drop:
            continue
        shape = (reshape or {}).get(name, shape)
        qt = (qtype_of or {}).get(name, T.F32)
        if qt == T.F32:
            w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            raw = rng.integers(0, 256, (int(np.prod(shape[:-1])), shape[-1] // bs * ts), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qt)  # byte shape; gguf derives the logical one
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(progress=False); w.close()
    return path


def _load(path):
    return load_engine(path, backend="cpu", context_length=64, max_sequences=1)


def test_control_file_loads(tmp_path):
    eng = _load(_write(tmp_path / "ok.gguf"))
    assert eng.info.architecture == "llama"
    eng.close()


def test_missing_tensor_named(tmp_path):
    with pytest.raises(InvalidArgument, match=r"blk\.0\.ffn_up\.weight.*missing"):
        _load(_write(tmp_path / "m.gguf", drop="blk.0.ffn_up.weight"))


def test_wrong_shape_named(tmp_path):
    with pytest.raises(InvalidArgument) as ei:
        _load(_write(tmp_path / "s.gguf", reshape={"blk.0.attn_k.weight": (NH * HD, D)}))
    msg = str(ei.value)
    assert "blk.0.attn_k.weight" in msg and str((NH * HD, D)) in msg and str((NKV * HD, D)) in msg


@pytest.mark.parametrize("qt", [T.Q2_K, T.IQ2_XXS], ids=lambda t: t.name)
def test_unsupported_type_named(tmp_path, qt):
    # 256-wide rows so the K-quant / IQ blocks tile the tensor exactly
    with pytest.raises(InvalidArgument) as ei:
        _load(_write(tmp_path / "q.gguf", qtype_of={"output.weight": qt}, reshape={"output.weight": (V, 256)}))
    assert "output.weight" in str(ei.value) and qt.name in str(ei.value)


def test_validation_happens_before_weights_load(tmp_path, monkeypatch):
    """A refused file must not reach load_weight (nothing committed)."""
    from orcd_grpc.backends import cpu_backend

    calls = []
    orig = cpu_backend.CpuBackend.load_weight
    monkeypatch.setattr(cpu_backend.CpuBackend, "load_weight",
                        lambda self, *a, **k: calls.append(a[0]) or orig(self, *a, **k))
    with pytest.raises(InvalidArgument):
        _load(_write(tmp_path / "m.gguf", drop="blk.0.attn_q.weight"))
    assert calls == []
