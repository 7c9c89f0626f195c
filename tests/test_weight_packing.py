"""weight_packing: the packs an adapter declares, applied to a file's tensors. The logits of packed
and separate loads are compared in test_engine.py; here, which weights a plan makes and the bytes
each is loaded from."""
from __future__ import annotations

import pathlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from orcd_grpc import quants
from orcd_grpc.adapters.llama import LlamaAdapter
from orcd_grpc.gguf_model import GGUFModel
from orcd_grpc.weight_packing import Pack, Switches, plan

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gpu.test_cuda_models import write_tiny_llama  # noqa: E402

QKV, QK, GATE_UP = "blk.0.attn_qkv_fused.weight", "blk.0.attn_qk_fused.weight", "blk.0.ffn_gate_up_fused.weight"


@pytest.fixture(scope="module")
def q4_v8(tmp_path_factory):
    """Q/K Q4_0, V Q8_0, Q/K/V biases: qwen2.5's Q4_K_M layout."""
    model = GGUFModel(write_tiny_llama(tmp_path_factory.mktemp("m") / "m.gguf", "Q4_0", v_qtype="Q8_0",
                                       qkv_bias=True, n_layers=2))
    yield model
    model.close()


def _plan(model, **switches):
    return plan(list(model.tensors.values()), LlamaAdapter.packing, 2, Switches(**switches))


def _covers_every_tensor_once(p, model):
    parts = [t.name for e in p.entries for t in e.parts]
    assert sorted(parts) == sorted(model.tensors)


@pytest.mark.parametrize("switches, packed", [
    ({}, {QKV, GATE_UP}),                         # V's type differs, but all three widen to Q8_0
    ({"widen": False}, {QK, GATE_UP}),            # Q and K alone, where V's type still differs
    ({"widen": False, "qk": False}, {GATE_UP}),
    ({"fuse": False}, set()),
])
def test_switches_pick_the_packs(q4_v8, switches, packed):
    p = _plan(q4_v8, **switches)
    _covers_every_tensor_once(p, q4_v8)
    got = {n for n in p.packed() if n.startswith("blk.0.") and n.endswith(".weight")}
    assert got == packed
    for name in packed:  # each packed weight brings its parts' biases, packed in the same order
        bias = name.replace(".weight", ".bias")
        assert (bias in p.packed()) == (name != GATE_UP)
        if name != GATE_UP:
            assert p.packed()[bias] == [n.replace(".weight", ".bias") for n in p.packed()[name]]
            # the bias is loaded before its weight, as the engine did before packs were declared
            assert p.names().index(bias) == p.names().index(name) - 1
    # the file's own tensors come first, in file order; packs after, layer by layer
    lone = [e.name for e in p.entries if len(e.parts) == 1]
    assert p.names()[: len(lone)] == lone == [t.name for t in q4_v8.tensors.values() if t.name in lone]


def test_widened_pack_is_the_parts_as_q8_0_rows(q4_v8):
    e = next(e for e in _plan(q4_v8).entries if e.name == QKV)
    assert e.widened and e.qtype == T.Q8_0
    assert [t.name for t in e.parts] == [f"blk.0.attn_{p}.weight" for p in "qkv"]
    raw = e.raw()
    assert raw.dtype == np.uint8 and raw.size == e.nbytes == quants.nbytes(T.Q8_0, e.shape)
    want = np.concatenate([quants.dequantize_reader_tensor(t) for t in e.parts])
    np.testing.assert_array_equal(quants.dequantize(raw, T.Q8_0, e.shape), want)  # bit-exact


def test_same_type_pack_is_the_parts_bytes_concatenated(q4_v8):
    p = _plan(q4_v8, widen=False)
    e = next(e for e in p.entries if e.name == QK)
    assert not e.widened and e.qtype == T.Q4_0 and e.shape[0] == sum(t.shape[-1] for t in e.parts)
    assert e.raw().tobytes() == b"".join(np.ascontiguousarray(t.data).tobytes() for t in e.parts)
    assert e.nbytes == e.file_bytes
    lone = next(e for e in p.entries if e.name == "blk.0.attn_v.weight")
    assert lone.raw() is lone.parts[0].data  # a tensor that joins no pack is handed over as the file has it


def _fake(name, qtype, shape):
    """A stand-in for gguf's ReaderTensor: what a plan reads of one."""
    nb = quants.nbytes(qtype, shape)
    return SimpleNamespace(name=name, tensor_type=qtype, shape=np.array(shape[::-1]), n_bytes=nb,
                           data=np.zeros(nb, np.uint8))


def _names(tensors, packing, **switches):
    return set(plan(tensors, packing, 2, Switches(**switches)).packed())


PACKS = (Pack("qkv.weight", ("q.weight", "k.weight", "v.weight"), widen=quants.WIDENS_TO_Q8_0),
         Pack("qk.weight", ("q.weight", "k.weight"), switch="qk"))


def test_a_pack_needs_every_part_and_all_or_no_f32_biases():
    w = [_fake(f"blk.0.{p}.weight", T.Q8_0, (64, 32)) for p in "qkv"]
    assert _names(w, PACKS) == {"blk.0.qkv.weight"}
    assert _names(w[:2], PACKS) == {"blk.0.qk.weight"}  # no V (a stage file's other layers alike)
    assert _names(w[:2], PACKS, qk=False) == set()
    # Q and K with biases, V without: not packed with V, Q and K still are
    qk_bias = [_fake(f"blk.0.{p}.bias", T.F32, (64,)) for p in "qk"]
    assert _names(w + qk_bias, PACKS) == {"blk.0.qk.weight", "blk.0.qk.bias"}
    # a bias not stored as F32 is not concatenated by bytes
    f16 = [_fake(f"blk.0.{p}.bias", T.F16, (64,)) for p in "qkv"]
    assert _names(w + f16, PACKS) == set()


def test_only_declared_types_may_mix():
    w = [_fake("blk.0.q.weight", T.Q4_1, (64, 32)), _fake("blk.0.k.weight", T.Q8_0, (64, 32)),
         _fake("blk.0.v.weight", T.Q8_0, (64, 32))]
    assert _names(w, PACKS) == set()  # Q4_1 has an offset: no exact Q8_0 form
    w[0] = _fake("blk.0.q.weight", T.Q5_0, (64, 32))
    assert _names(w, PACKS) == {"blk.0.qkv.weight"}
    assert _names(w, PACKS, widen=False) == set()
    assert _names(w, (Pack("qkv.weight", ("q.weight", "k.weight", "v.weight")),)) == set()  # no widen declared


def test_switches_read_the_environment():
    assert Switches.from_env({}) == Switches(True, True, True)
    assert Switches.from_env({"ORCD_FUSE_WEIGHTS": "0"}).fuse is False
    assert Switches.from_env({"ORCD_FUSE_QK": "0", "ORCD_FUSE_WIDEN": "0"}) == Switches(True, False, False)


class _Padded:
    """A backend's weight_nbytes that pads each weight (as the CUDA backend's does), so the sum over
    packed weights differs from the sum over their parts."""
    def weight_nbytes(self, qtype, shape, raw_nbytes):
        return -(-(raw_nbytes + 16) // 256) * 256


def test_the_estimate_sizes_the_weights_as_loaded(q4_v8):
    p = _plan(q4_v8)
    total, largest = p.nbytes(_Padded())
    sizes = [_Padded().weight_nbytes(e.qtype, e.shape, np.asarray(e.raw()).nbytes) for e in p.entries]
    assert (total, largest) == (sum(sizes), max(sizes))
