"""gguf_guard.check_gguf on hand-built hostile files: each must be refused with InvalidArgument
naming what is wrong, before gguf.GGUFReader sees it; valid files (tiny and real) pass."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from orcd_grpc import gguf_guard
from orcd_grpc.errors import InvalidArgument
from orcd_grpc.gguf_guard import check_gguf

REAL = os.path.expanduser("~/.cache/orcd/models/smollm2-135m-instruct.gguf")

# value type ids
U8, I32, U32, F32, BOOL, STR, ARR, U64 = 0, 5, 4, 6, 7, 8, 9, 10


def s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def arr(itype, items: list[bytes], count=None) -> bytes:
    return struct.pack("<IQ", itype, len(items) if count is None else count) + b"".join(items)


def tinfo(name, dims, ttype, offset) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) \
        + struct.pack("<IQ", ttype, offset)


def gguf(kvs=(), tensors=(), data=b"", *, version=3, n_tensors=None, n_kv=None, align=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    head += bytes(-len(head) % align)
    return head + data


ARCH = kv("general.architecture", STR, s("llama"))
F32_ROW = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes


def ok_file(**over) -> bytes:
    return gguf([ARCH], [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 32)], F32_ROW * 2, **over)


@pytest.fixture
def write(tmp_path):
    def w(data: bytes, name="f.gguf"):
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)
    return w


def refused(path, match, **kw):
    with pytest.raises(InvalidArgument, match=match) as err:
        check_gguf(path, **kw)
    return str(err.value)


def test_valid_minimal_file_passes(write):
    summary = check_gguf(write(ok_file()))
    assert [t.name for t in summary.tensors] == ["a", "b"]
    assert summary.tensors[1].offset == summary.data_offset + 32 and summary.tensors[1].nbytes == 32


@pytest.mark.parametrize("data, match", [
    (b"", "too short"),
    (b"GGML" + bytes(20), "not a GGUF file: magic"),
    (gguf(version=1), "version 1 is not supported"),
    (gguf(version=4), "version 4"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (gguf(n_tensors=1 << 40), "tensor count 1099511627776 exceeds the limit"),
    (gguf(n_kv=(1 << 64) - 1), "kv count .* exceeds"),
    (gguf(n_kv=1000), "cannot fit in a file of"),
    (gguf([kv("k", STR, struct.pack("<Q", 1 << 62))]), "string length 4611686018427387904 exceeds"),
    (gguf([kv("k", STR, struct.pack("<Q", 500) + b"x")]), "file is truncated: value of k"),
    (gguf([kv("k", ARR, arr(U32, [], count=1 << 40))]), "array length 1099511627776 exceeds"),
    (gguf([kv("k", ARR, arr(U32, [], count=1000))]), "truncated: 1000 UINT32 items of array k"),
    (gguf([kv("k", ARR, arr(STR, [], count=100_000))]), "array of 100000 STRING items cannot fit"),
    (gguf([kv("k", 13, b"")]), "unknown value type 13"),
    (gguf([kv("k", ARR, arr(99, []))]), "array of unknown value type 99"),
    (gguf([kv("k", U8, b"\x01"), kv("k", U8, b"\x02")]), "'k' appears twice"),
    (gguf([kv(b"\xff\xfe", U8, b"\x01")]), "not valid UTF-8"),
    (gguf([kv("", U8, b"\x01")]), "is empty"),
    (gguf([kv("k", STR, s(b"ok\xc3"))]), "value of k: not valid UTF-8"),
    (gguf([kv("k", ARR, arr(STR, [s("a"), s(b"\x80b")]))]), r"item 1 of array k: not valid UTF-8"),
    (gguf([kv("k", ARR, arr(STR, [s("a"), s(b"b\xe2\x82")]))]), r"item 1 of array k: not valid UTF-8"),
    (gguf([kv("general.alignment", U64, struct.pack("<Q", 32))]), "general.alignment has type UINT64"),
    (gguf([kv("general.alignment", U32, struct.pack("<I", 48))]), "general.alignment 48 must be a power of two"),
    (gguf([kv("general.alignment", U32, struct.pack("<I", 0))]), "general.alignment 0"),
])
def test_header_refusals(write, data, match):
    refused(write(data), match)


def test_nested_arrays_depth_is_bounded(write):
    def nest(depth):
        inner = arr(U8, [b"\x01"])
        for _ in range(depth - 1):
            inner = arr(ARR, [inner])
        return inner
    check_gguf(write(gguf([ARCH, kv("k", ARR, nest(4))])))
    refused(write(gguf([ARCH, kv("k", ARR, nest(5))])), "nested deeper than 4")


@pytest.mark.parametrize("tensors, data, match", [
    ([tinfo("w", [8], 0, 0)], b"", r"tensor w: data \[\d+, \d+\) extends past the end of the file \(size \d+\)"),
    ([tinfo("w", [8], 0, 1 << 63)], F32_ROW, "tensor w: data .* extends past the end"),
    ([tinfo("w", [8], 0, 16)], F32_ROW * 2, "tensor w: data offset 16 is not a multiple of general.alignment 32"),
    ([tinfo("a", [8], 0, 0), tinfo("b", [16], 0, 0)], F32_ROW * 2, "overlaps tensor"),
    ([tinfo("a", [16], 0, 0), tinfo("b", [8], 0, 32)], F32_ROW * 2, r"tensor b: data .* overlaps tensor a"),
    ([tinfo("w", [], 0, 0)], F32_ROW, "tensor w: n_dims is 0, must be 1..4"),
    ([tinfo("w", [1, 1, 1, 1, 8], 0, 0)], F32_ROW, "n_dims is 5"),
    ([tinfo("w", [8, 0], 0, 0)], F32_ROW, "tensor w: dimension 1 is 0"),
    ([tinfo("w", [1 << 32, 1 << 32], 0, 0)], F32_ROW, "more than 2.62 elements"),
    ([tinfo("w", [8], 99, 0)], F32_ROW, "tensor w: unknown GGML type 99"),
    ([tinfo("w", [8], 4, 0)], F32_ROW, "unknown GGML type 4"),  # Q4_2, removed from ggml
    ([tinfo("w", [48], 8, 0)], bytes(64), "row length 48 is not a multiple of the Q8_0 block size 32"),
    ([tinfo("w", [8], 0, 0), tinfo("w", [8], 0, 32)], F32_ROW * 2, "tensor w appears twice"),
    ([tinfo("n" * 65, [8], 0, 0)], F32_ROW, "string length 65 exceeds the limit of 64"),
    ([tinfo("", [8], 0, 0)], F32_ROW, "empty name"),
])
def test_tensor_refusals(write, tensors, data, match):
    refused(write(gguf([ARCH], tensors, data)), match)


def test_limits_are_configurable(write):
    p = write(gguf([ARCH, kv("k", ARR, arr(U8, [b"\x01"] * 10)), kv("t", STR, s("x" * 100))]))
    check_gguf(p)
    refused(p, "array length 10 exceeds the limit of 9", max_array=9)
    refused(p, "string length 100 exceeds the limit of 50", max_string=50)
    refused(p, "kv count 3 exceeds the limit of 2", max_kv=2)
    refused(p, "more than 5 items", max_items=5)
    refused(p, "more than the limit of 100", max_file_bytes=100)
    p2 = write(ok_file(), "two.gguf")
    refused(p2, "tensor count 2 exceeds the limit of 1", max_tensors=1)


def test_every_truncation_of_a_valid_file_is_refused(write, tmp_path):
    data = ok_file()
    end_of_data = len(data)
    for cut in range(end_of_data):
        with pytest.raises(InvalidArgument):
            check_gguf(write(data[:cut], "cut.gguf"))


def test_not_a_regular_file(tmp_path):
    with pytest.raises(InvalidArgument, match="not a regular file"):
        check_gguf(str(tmp_path))
    with pytest.raises(InvalidArgument, match="cannot open"):
        check_gguf(str(tmp_path / "missing.gguf"))


# ---- NaN / Inf scan ------------------------------------------------------------------------------


def _one_tensor(write, ttype, dims, raw: bytes):
    return write(gguf([ARCH], [tinfo("blk.0.w", dims, ttype, 0)], raw + bytes(-len(raw) % 32)))


@pytest.mark.parametrize("ttype, dtype", [(0, np.float32), (1, np.float16), (28, np.float64)])
def test_scan_finds_nan_and_inf_in_float_tensors(write, ttype, dtype):
    x = np.ones(64, dtype)
    check_gguf(_one_tensor(write, ttype, [64], x.tobytes()))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[37] = bad
        p = _one_tensor(write, ttype, [64], y.tobytes())
        refused(p, "tensor blk.0.w: value 37 is NaN or Inf")
        check_gguf(p, scan_values=False)  # the scan is optional


def test_scan_bf16(write):
    x = np.ones(64, np.float32).view(np.uint32) >> 16
    raw = x.astype(np.uint16)
    check_gguf(_one_tensor(write, 30, [64], raw.tobytes()))
    raw[5] = 0x7FC0  # bf16 NaN
    refused(_one_tensor(write, 30, [64], raw.tobytes()), "value 5 is NaN or Inf")


@pytest.mark.parametrize("qtype, scale_at", [("Q8_0", 0), ("Q4_0", 0), ("Q4_1", 2), ("Q4_K", 2), ("Q6_K", 208),
                                             ("Q5_K", 0)])
def test_scan_finds_nonfinite_quantized_scales(write, qtype, scale_at):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    t = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[t]
    raw = bytearray(size * 3)  # three zero blocks: scales 0.0, valid
    check_gguf(_one_tensor(write, int(t), [block * 3], bytes(raw)))
    raw[size * 2 + scale_at:size * 2 + scale_at + 2] = np.float16(np.inf).tobytes()
    refused(_one_tensor(write, int(t), [block * 3], bytes(raw)), f"tensor blk.0.w: the scale of block 2 is NaN or Inf")


def test_scan_can_be_disabled_by_environment(write, monkeypatch):
    y = np.ones(8, np.float32)
    y[0] = np.nan
    p = _one_tensor(write, 0, [8], y.tobytes())
    monkeypatch.setenv("ORCD_GGUF_SCAN", "0")
    check_gguf(p)
    monkeypatch.setenv("ORCD_GGUF_SCAN", "1")
    refused(p, "NaN or Inf")


# ---- metadata the loader sizes things by ---------------------------------------------------------


def _u32(key, v):
    return kv(key, U32, struct.pack("<I", v))


@pytest.mark.parametrize("kvs, match", [
    ([_u32("llama.attention.head_count", 0)], "llama.attention.head_count: value 0 is outside"),
    ([_u32("llama.block_count", 1 << 22)], "llama.block_count: value 4194304 is outside"),
    ([_u32("llama.block_count", 3)], "3 layers but only 2 tensors"),
    ([kv("llama.embedding_length", STR, s("512"))], "llama.embedding_length has type STRING, must be an integer"),
    ([kv("llama.attention.head_count_kv", ARR, arr(U32, [struct.pack("<I", 1), struct.pack("<I", 1 << 20)]))],
     "head_count_kv: value 1048576 is outside"),
    ([kv("llama.rope.freq_base", F32, struct.pack("<f", float("nan")))], "llama.rope.freq_base: value nan is not finite"),
    ([kv("general.architecture", U32, struct.pack("<I", 1))], "general.architecture has type UINT32"),
])
def test_hyperparameter_refusals(write, kvs, match):
    base = [ARCH] if not any(k.startswith(s("general.architecture")) for k in kvs) else []
    refused(write(gguf(base + kvs, [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 32)], F32_ROW * 2)), match)


def test_per_layer_arrays_within_bounds_pass(write):
    kvs = [ARCH, kv("llama.feed_forward_length", ARR, arr(U32, [struct.pack("<I", 64)] * 2)),
           _u32("llama.block_count", 2)]
    check_gguf(write(gguf(kvs, [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 32)], F32_ROW * 2)))


def _tok(tokens, merges=None, extra=()):
    kvs = [ARCH, kv("tokenizer.ggml.model", STR, s("gpt2")),
           kv("tokenizer.ggml.tokens", ARR, arr(STR, [s(t) for t in tokens]))]
    if merges is not None:
        kvs.append(kv("tokenizer.ggml.merges", ARR, arr(STR, [s(m) for m in merges])))
    return gguf(kvs + list(extra))


@pytest.mark.parametrize("data, match", [
    (_tok(["a", "b", "ab"], ["a b", "a c"]), r"merges\[1\] 'a c': 'c' is not in the vocabulary"),
    (_tok(["a", "b"], ["a b"]), r"merges\[0\] 'a b': 'ab' is not in the vocabulary"),
    (_tok(["a", "b", "ab"], ["ab"]), r"merges\[0\] 'ab' is not 'left right'"),
    (_tok(["a", "b"], extra=[_u32("tokenizer.ggml.bos_token_id", 2)]), "bos_token_id: token id 2 is outside"),
    (_tok(["a", "b"], extra=[kv("tokenizer.ggml.token_type", ARR, arr(I32, [struct.pack("<i", 1)]))]),
     "token_type has 1 entries for 2 tokens"),
    (_tok(["a", "b"], extra=[kv("tokenizer.ggml.scores", ARR, arr(U8, [b"\x01", b"\x02"]))]),
     "scores must be an array of floats"),
    (gguf([ARCH, kv("tokenizer.ggml.tokens", ARR, arr(U32, [b"\x00" * 4]))]), "tokens must be an array of strings"),
])
def test_tokenizer_refusals(write, data, match):
    refused(write(data), match)


def test_tokenizer_consistent_passes(write):
    check_gguf(write(_tok(["a", "b", "ab"], ["a b"], extra=[_u32("tokenizer.ggml.eos_token_id", 2),
                                                             kv("tokenizer.ggml.padding_token_id", I32,
                                                                struct.pack("<i", -1))])))


# ---- integration ---------------------------------------------------------------------------------


def test_gguf_model_runs_the_guard_first(write):
    from orcd_grpc.gguf_model import GGUFModel

    p = write(gguf([ARCH], [tinfo("blk.0.attn_q.weight", [8], 0, 64)], F32_ROW))
    with pytest.raises(InvalidArgument, match=r"tensor blk.0.attn_q.weight: data .* extends past the end of the file"):
        GGUFModel(p)


@pytest.mark.skipif(not os.path.exists(REAL), reason="smollm2 model file not cached")
def test_real_model_passes_and_its_header_alone_is_refused(write):
    summary = check_gguf(REAL)
    assert len(summary.tensors) == 272 and summary.metadata_items > 100_000
    with open(REAL, "rb") as fh:
        head = fh.read(64 * 1024)
    refused(write(head), "tokenizer.ggml.tokens.*cannot fit")


def test_default_caps_bound_reader_amplification(write):
    # GGUFReader spends ~700 B of RSS per array item; a 1 MiB file must not buy 1M+ items
    refused(write(gguf([ARCH, kv("k", ARR, arr(U8, [], count=(1 << 20) + 1))]) + bytes(1 << 20)),
            "array length 1048577 exceeds the limit of 1048576")
    items = [kv(f"k{i}", ARR, arr(U8, [], count=1 << 20)) for i in range(2)]
    blob = gguf([ARCH] + [items[0] + bytes(1 << 20), items[1] + bytes(1 << 20)][:2])
    refused(write(blob), "more than 2097152 items")
