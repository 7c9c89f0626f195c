"""Fuzz campaign for the GGUF loading path: gguf_guard.check_gguf -> GGUFReader -> GGUFModel -> engine.

Every case is a file derived deterministically from (campaign seed, case index): a tiny valid model
written with gguf.GGUFWriter, or the header region of a real model, put through a structure-aware
mutation (truncation at region boundaries, bit flips, interesting values written into counts,
lengths, dims, types and offsets, overlapping / out-of-file tensors, NaN/Inf weights, splices), or
a synthetic file built from scratch. Each case runs in a worker process that has an address-space
limit; the parent enforces a per-case timeout. Outcomes:

  accepted      the whole path took the file (it is valid)
  rejected      InvalidArgument (or another OrcdError from the engine): the expected refusal
  finding       any other exception, including one from GGUFReader/contents() on a file that the
                guard accepted (the guard exists so the reader never sees a file it chokes on)
  memory        MemoryError inside the address-space limit
  crash         the worker died (signal / abort)
  hang          the case ran past the timeout

Run:  python -m fuzz.fuzz_gguf --cases 10000 --workers 2 --seed 1 --out /tmp/orcd-fuzz
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass

import numpy as np

REAL_MODEL = os.path.expanduser("~/.cache/orcd/models/smollm2-135m-instruct.gguf")
HEAD_BYTES = 48 * 1024       # of the real model: magic, counts and the start of its vocabulary
MEM_LIMIT = 2 << 30          # address space a worker may add to what it maps after its imports
OUTCOMES = ("accepted", "rejected", "finding", "memory", "crash", "hang")

# ---------------------------------------------------------------------------------------------
# seeds


def _tiny_llama(path: str, *, qtype: str = "F32", nan: bool = False,
                chat_template: str = "{% for m in messages %}{{ m.content }}{% endfor %}") -> None:
    """A complete llama model small enough to load in milliseconds: 1 layer, d=32, vocab 40."""
    import gguf

    d, heads, kv_heads, ff, vocab = 32, 2, 1, 64, 40
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("fuzz-tiny")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    toks = [chr(ord("a") + i) for i in range(26)] + ["ab", "cd", "ef", "Ġ", "Ġa", "<s>", "</s>"]
    toks += [f"x{i}" for i in range(vocab - len(toks))]
    w.add_token_list(toks)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(["a b", "c d", "e f", "Ġ a"])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    hd = d // heads
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,),
              "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
              "blk.0.attn_q.weight": (heads * hd, d), "blk.0.attn_k.weight": (kv_heads * hd, d),
              "blk.0.attn_v.weight": (kv_heads * hd, d), "blk.0.attn_output.weight": (d, heads * hd),
              "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d),
              "blk.0.ffn_down.weight": (d, ff)}
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if nan and name == "blk.0.ffn_up.weight":
            x.flat[7] = np.nan
        if len(shape) == 2 and qtype != "F32":
            from gguf import GGMLQuantizationType as Q
            from gguf import quants

            t = Q[qtype]
            w.add_tensor(name, quants.quantize(x, t) if t != Q.F16 else x.astype(np.float16), raw_dtype=t)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _metadata_rich(path: str) -> None:
    """Every value type, nested arrays, empty and unicode strings, several tensor types."""
    import gguf

    w = gguf.GGUFWriter(path, "fuzzarch")
    w.add_uint8("m.u8", 7)
    w.add_int8("m.i8", -7)
    w.add_uint16("m.u16", 700)
    w.add_int16("m.i16", -700)
    w.add_uint32("m.u32", 70000)
    w.add_int32("m.i32", -70000)
    w.add_float32("m.f32", 1.5)
    w.add_uint64("m.u64", 1 << 40)
    w.add_int64("m.i64", -(1 << 40))
    w.add_float64("m.f64", 2.25)
    w.add_bool("m.bool", True)
    w.add_string("m.str", "héllo wörld ✓")
    w.add_string("m.empty", "")
    w.add_array("m.arr_i32", [1, 2, 3, 4])
    w.add_array("m.arr_str", ["x", "", "yz", "✓"])
    w.add_array("m.nested", [[1, 2], [3], [4, 5, 6]])
    w.add_array("m.arr_f32", [0.5, 1.5])
    rng = np.random.default_rng(1)
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    w.add_tensor("t.f32", rng.standard_normal((2, 8)).astype(np.float32))
    w.add_tensor("t.f16", rng.standard_normal((3, 4)).astype(np.float16))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("t.q8_0", quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("t.q4_0", quants.quantize(x, Q.Q4_0), raw_dtype=Q.Q4_0)
    w.add_tensor("t.bf16", quants.quantize(x, Q.BF16), raw_dtype=Q.BF16)
    w.add_tensor("t.3d", rng.standard_normal((2, 2, 4)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _real_model_mini(path: str, src: str) -> bool:
    """The real model's scalar/string metadata and first array items, plus its small F32 tensors
    with their real data: realistic keys, names and values in a file of a few KiB."""
    import gguf

    if not os.path.exists(src):
        return False
    r = gguf.GGUFReader(src, "r")
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(path, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            items = f.contents()[:48]
            if key == "tokenizer.ggml.merges":  # keep the merges the shortened vocabulary still covers
                vocab = set(r.fields["tokenizer.ggml.tokens"].contents()[:48])
                items = [m for m in f.contents() if m.partition(" ")[0] in vocab and m.partition(" ")[2] in vocab
                         and m.replace(" ", "", 1) in vocab][:48]
            if not items:
                continue
            w.add_key_value(key, items, vt, sub_type=f.types[1])
        elif key == f"{arch}.block_count":
            w.add_key_value(key, 1, vt)  # one layer: the guard rejects more layers than tensors
        else:
            w.add_key_value(key, f.contents(), vt)
    n = 0
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32 and n < 6:
            w.add_tensor(t.name, np.array(t.data, dtype=np.float32))
            n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return True


def build_seeds(directory: str) -> dict[str, bytes]:
    """name -> bytes. Names starting with "engine:" are complete models the engine can load."""
    os.makedirs(directory, exist_ok=True)
    seeds: dict[str, bytes] = {}
    for name, fn in (("engine:tiny-f32", lambda p: _tiny_llama(p)),
                     ("engine:tiny-q8_0", lambda p: _tiny_llama(p, qtype="Q8_0")),
                     ("engine:tiny-f16", lambda p: _tiny_llama(p, qtype="F16")),
                     ("meta-rich", _metadata_rich)):
        p = os.path.join(directory, name.replace(":", "_") + ".gguf")
        fn(p)
        with open(p, "rb") as fh:
            seeds[name] = fh.read()
    p = os.path.join(directory, "real-mini.gguf")
    if _real_model_mini(p, REAL_MODEL):
        with open(p, "rb") as fh:
            seeds["real-mini"] = fh.read()
    if os.path.exists(REAL_MODEL):
        with open(REAL_MODEL, "rb") as fh:
            seeds["real-head"] = fh.read(HEAD_BYTES)
    return seeds


# ---------------------------------------------------------------------------------------------
# layout of a (valid) seed: where each header field lies, so mutations can aim at them


@dataclass
class Field:
    offset: int
    size: int       # 4 or 8 (integers); 0 marks a boundary only
    kind: str       # "count", "strlen", "vtype", "arrcount", "ndims", "dim", "ttype", "toffset", "mark"


@dataclass
class Layout:
    fields: list[Field]
    tensors: list[tuple[int, int, int, int]]  # (info offset field index, abs data start, nbytes, ggml type)
    data_offset: int


def layout(data: bytes) -> Layout:
    """Walks a seed's header (seeds are valid or truncated-valid; stops quietly at the end)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    fields: list[Field] = []
    tensors = []
    pos = 0
    size = len(data)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def u(fmt, n):
        nonlocal pos
        if pos + n > size:
            raise EOFError
        v = struct.unpack_from(fmt, data, pos)[0]
        pos += n
        return v

    def string():
        nonlocal pos
        fields.append(Field(pos, 8, "strlen"))
        n = u("<Q", 8)
        pos += n

    def value(vt, depth=0):
        nonlocal pos
        if depth > 6:
            raise EOFError  # a mutated file nesting arrays without end: stop walking here
        if vt in sizes:
            fields.append(Field(pos, sizes[vt], "scalar"))
            pos += sizes[vt]
        elif vt == 8:
            string()
        else:
            fields.append(Field(pos, 4, "vtype"))
            it = u("<I", 4)
            fields.append(Field(pos, 8, "arrcount"))
            n = u("<Q", 8)
            if it in sizes:
                pos += n * sizes[it]
            else:
                for _ in range(n):
                    value(it, depth + 1)

    alignment = 32
    data_offset = size
    try:
        pos = 4
        fields.append(Field(pos, 4, "version"))
        pos += 4
        fields.append(Field(pos, 8, "count"))
        nt = u("<Q", 8)
        fields.append(Field(pos, 8, "count"))
        nk = u("<Q", 8)
        for _ in range(nk):
            fields.append(Field(pos, 0, "mark"))
            key_at = pos + 8
            string()
            key = data[key_at:pos].decode("utf-8", "replace")
            fields.append(Field(pos, 4, "vtype"))
            vt = u("<I", 4)
            if key == "general.alignment":
                alignment = struct.unpack_from("<I", data, pos)[0]
            value(vt)
        infos = []
        for _ in range(nt):
            fields.append(Field(pos, 0, "mark"))
            string()
            fields.append(Field(pos, 4, "ndims"))
            nd = u("<I", 4)
            dims = []
            for _ in range(nd):
                fields.append(Field(pos, 8, "dim"))
                dims.append(u("<Q", 8))
            fields.append(Field(pos, 4, "ttype"))
            tt = u("<I", 4)
            idx = len(fields)
            fields.append(Field(pos, 8, "toffset"))
            rel = u("<Q", 8)
            infos.append((idx, rel, dims, tt))
        data_offset = pos + (-pos % alignment)
        fields.append(Field(data_offset, 0, "mark"))
        for idx, rel, dims, tt in infos:
            bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(tt)]
            nbytes = int(np.prod(dims)) // bs * ts
            tensors.append((idx, data_offset + rel, nbytes, tt))
            fields.append(Field(data_offset + rel, 0, "mark"))
            fields.append(Field(data_offset + rel + nbytes, 0, "mark"))
    except (EOFError, struct.error, ValueError, KeyError, ZeroDivisionError, OverflowError, RecursionError):
        pass  # a mutated file: the fields found so far are still useful targets
    return Layout([f for f in fields if f.offset <= size], tensors, data_offset)


# ---------------------------------------------------------------------------------------------
# mutations

_INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 4095, 4096,
                65535, 65536, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 62), (1 << 63) - 1,
                1 << 63, (1 << 64) - 1, (1 << 64) - 32]


def _put(buf: bytearray, off: int, size: int, value: int) -> None:
    if off + size <= len(buf):
        buf[off:off + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def _interesting(rng: random.Random, buf: bytearray) -> int:
    v = rng.choice(_INTERESTING + [len(buf), len(buf) - 1, len(buf) + 1, rng.getrandbits(64)])
    return (v + rng.choice((0, 0, 0, -1, 1))) % (1 << 64) if v else v


def mutate(rng: random.Random, data: bytes, lay: Layout, seeds: dict[str, bytes],
           stacked: bool = False) -> tuple[bytes, str]:
    buf = bytearray(data)
    if not buf:
        return bytes(rng.randbytes(rng.choice((0, 4, 24)))), "empty"
    marks = [f.offset for f in lay.fields if f.offset <= len(buf)] + [0, 4, 8, 16, 24, len(buf)]
    kinds = ["truncate", "truncate", "bitflip", "bitflip", "bytes", "field", "field", "field",
             "counts", "strlen", "ndims", "ttype", "overlap", "outside", "nonfinite",
             "insert", "delete", "splice"]
    kind = rng.choice(kinds if stacked else kinds + ["multi", "multi"])
    if kind == "truncate":
        cut = max(0, min(len(buf), rng.choice(marks) + rng.choice((0, 0, -1, 1, -4, 4, -8, 8))))
        return bytes(buf[:cut]), kind
    if kind == "bitflip":
        limit = lay.data_offset if rng.random() < 0.8 else len(buf)
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            i = rng.randrange(max(1, min(limit, len(buf))))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), kind
    if kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(max(1, min(lay.data_offset, len(buf))))
            buf[i] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x7C, 0xC0, 0xFE, rng.randrange(256)))
        return bytes(buf), kind
    if kind in ("field", "counts", "strlen", "ndims", "ttype"):
        want = {"counts": ("count",), "strlen": ("strlen", "arrcount"), "ndims": ("ndims",),
                "ttype": ("ttype", "vtype"), "field": None}[kind]
        cands = [f for f in lay.fields if f.size and (want is None or f.kind in want)]
        if not cands:
            return bytes(buf), kind + "-noop"
        f = rng.choice(cands)
        if f.kind == "ndims":
            v = rng.choice((0, 5, 1, 2, 3, 4, 0xFFFFFFFF, 64))
        elif f.kind in ("ttype", "vtype"):
            v = rng.choice((5, 4, 13, 31, 36, 38, 42, 100, 0xFFFFFFFF, rng.randrange(45)))
        else:
            v = _interesting(rng, buf)
        _put(buf, f.offset, f.size, v)
        return bytes(buf), kind
    if kind == "overlap" and len(lay.tensors) >= 2:
        a, b = rng.sample(lay.tensors, 2)
        rel_b = struct.unpack_from("<Q", buf, lay.fields[b[0]].offset)[0]
        _put(buf, lay.fields[a[0]].offset, 8, rel_b + rng.choice((0, 0, 32, -32)))
        return bytes(buf), kind
    if kind in ("outside", "overlap") and lay.tensors:
        t = rng.choice(lay.tensors)
        rel = len(buf) - lay.data_offset - rng.choice((0, 32, t[2] // 2 // 32 * 32))
        _put(buf, lay.fields[t[0]].offset, 8, max(0, rel) if rng.random() < 0.8 else _interesting(rng, buf))
        return bytes(buf), "outside"
    if kind == "nonfinite" and lay.tensors:
        _, start, nbytes, tt = rng.choice(lay.tensors)
        if start + nbytes <= len(buf) and nbytes >= 4:
            word = rng.randrange(0, nbytes // 4) * 4
            bits = rng.choice((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff",
                               b"\x00\x7c\x00\x7c", b"\x00\x7e\xff\xff"))
            buf[start + word:start + word + 4] = bits
        return bytes(buf), "nonfinite"
    if kind == "insert":
        i = rng.choice(marks) if rng.random() < 0.7 else rng.randrange(len(buf) + 1)
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8, 13))))
        return bytes(buf), kind
    if kind == "delete" and len(buf) > 1:
        i = rng.choice(marks) if rng.random() < 0.7 else rng.randrange(len(buf))
        del buf[i:i + rng.choice((1, 4, 8, 13))]
        return bytes(buf), kind
    if kind == "splice":
        other = seeds[rng.choice(sorted(seeds))]
        cut_a = rng.choice(marks)
        cut_b = rng.randrange(len(other) + 1)
        return bytes(buf[:cut_a]) + other[cut_b:], kind
    # several mutations stacked
    out = bytes(buf)
    for _ in range(rng.randint(2, 4)):
        out, _ = mutate(rng, out, lay if len(out) == len(data) else layout(out), seeds, stacked=True)
    return out, "multi"


def synthetic(rng: random.Random) -> tuple[bytes, str]:
    """A file built from scratch with a random (often inconsistent) structure."""
    out = bytearray(b"GGUF")
    out += struct.pack("<I", rng.choice((3, 3, 3, 2, 1, 4, 0x03000000)))
    n_kv, n_t = rng.randint(0, 6), rng.randint(0, 5)
    claim_kv = n_kv if rng.random() < 0.8 else _interesting(rng, out)
    claim_t = n_t if rng.random() < 0.8 else _interesting(rng, out)
    out += struct.pack("<QQ", claim_t % (1 << 64), claim_kv % (1 << 64))

    def s(b: bytes, lie: bool = False):
        n = len(b) if not lie else _interesting(rng, out)
        return struct.pack("<Q", n % (1 << 64)) + b

    def val(depth=0):
        vt = rng.choice((0, 4, 5, 6, 7, 8, 8, 9, 9, 10, 12, 13))
        body = struct.pack("<I", vt)
        if vt in (0, 7):
            body += bytes([rng.randrange(256)])
        elif vt in (4, 5, 6):
            body += rng.randbytes(4)
        elif vt in (10, 12):
            body += rng.randbytes(8)
        elif vt == 8:
            body += s(rng.choice((b"", b"abc", "✓".encode(), b"\xff\xfe", b"\x80x")), rng.random() < 0.1)
        elif vt == 9:
            it = rng.choice((0, 4, 8, 9)) if depth < 6 else 4
            n = rng.randint(0, 4)
            body += struct.pack("<IQ", it, n if rng.random() < 0.9 else _interesting(rng, out))
            for _ in range(n):
                if it == 0:
                    body += b"\x01"
                elif it == 4:
                    body += rng.randbytes(4)
                elif it == 8:
                    body += s(b"tok")
                else:
                    body += _array_items(rng, depth + 1)
        return body

    def _array_items(rng, depth):
        # one nested array value (item type + count + items)
        n = rng.randint(0, 3)
        it = 9 if depth < 8 and rng.random() < 0.4 else 4
        b = struct.pack("<IQ", it, n)
        for _ in range(n):
            b += _array_items(rng, depth + 1) if it == 9 else rng.randbytes(4)
        return b

    keys = ["general.architecture", "general.alignment", "a.b", "a.b", "x", "general.name", ""]
    for i in range(n_kv):
        k = rng.choice(keys) if rng.random() < 0.5 else f"k{i}"
        if k == "general.alignment":
            out += s(k.encode()) + struct.pack("<II", rng.choice((4, 4, 6)), rng.choice((32, 64, 0, 3, 1 << 20)))
        elif k == "general.architecture":
            out += s(k.encode()) + struct.pack("<I", 8) + s(rng.choice((b"llama", b"fuzz", b"")))
        else:
            out += s(k.encode()) + val()
    infos, data_len = [], 0
    for i in range(n_t):
        nd = rng.choice((1, 2, 2, 3, 4, 0, 5))
        dims = [rng.choice((1, 2, 8, 32, 64, 0, 1 << 32, (1 << 64) - 1)) for _ in range(nd)]
        tt = rng.choice((0, 1, 8, 2, 30, 12, 4, 99))
        rel = rng.choice((data_len, data_len, 0, 32, 1 << 40, 7))
        name = rng.choice((f"t{i}", "t0", "", "n" * 70))
        out += s(name.encode()) + struct.pack("<I", nd) + b"".join(struct.pack("<Q", d % (1 << 64)) for d in dims)
        out += struct.pack("<IQ", tt, rel % (1 << 64))
        data_len += 64
        infos.append(name)
    out += bytes(-len(out) % 32)
    out += rng.randbytes(rng.choice((0, 32, 64 * n_t, 64 * n_t + 16)))
    return bytes(out), "synthetic"


def make_case(seed: int, index: int, seeds: dict[str, bytes], layouts: dict[str, Layout]) -> tuple[bytes, str, str]:
    """(file bytes, seed name, mutation) of case `index`; the same arguments give the same file."""
    rng = random.Random(f"orcd-fuzz:{seed}:{index}")
    if rng.random() < 0.15:
        data, how = synthetic(rng)
        return data, "synthetic", how
    name = rng.choice(sorted(seeds))
    data, how = mutate(rng, seeds[name], layouts[name], seeds)
    return data, name, how


# ---------------------------------------------------------------------------------------------
# worker


def run_one(path: str, engine: bool) -> tuple[str, str]:
    """Runs the loading path on one file in this process; returns (outcome, detail)."""
    from orcd_grpc.errors import InvalidArgument, OrcdError
    from orcd_grpc.gguf_guard import check_gguf

    try:
        check_gguf(path)
    except InvalidArgument as exc:
        return "rejected", f"guard: {exc}"
    except MemoryError:
        return "memory", "guard: " + traceback.format_exc(limit=6)
    except Exception:
        return "finding", "guard: " + traceback.format_exc(limit=8)
    stage = "reader"
    try:
        import gguf

        r = gguf.GGUFReader(path, "r")  # the guard accepted it: the raw reader must cope
        stage = "contents"
        for f in r.fields.values():
            f.contents()
        for t in r.tensors:
            assert t.data.nbytes == t.n_bytes or t.data.size == t.n_elements, f"tensor {t.name} short view"
        stage = "model"
        from orcd_grpc.gguf_model import GGUFModel

        m = GGUFModel(path)
        m.close()
        if engine:
            stage = "engine"
            from orcd_grpc.loader import load_engine

            e = load_engine(path, backend="cpu", context_length=32, max_sequences=2, kv_cache_bytes=1 << 20)
            e.close()
    except OrcdError as exc:
        return "rejected", f"{stage}: {type(exc).__name__}: {exc}"
    except MemoryError:
        return "memory", f"{stage}: " + traceback.format_exc(limit=6)
    except Exception:
        return "finding", f"{stage}: " + traceback.format_exc(limit=8)
    return "accepted", stage


def _address_space() -> int:
    """Bytes this process maps now (VmSize)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(conn, mem_limit: int) -> None:
    import resource
    import warnings

    warnings.simplefilter("ignore")  # NumPy overflow warnings on hostile values are not findings
    import orcd_grpc.loader  # noqa: F401  (import once, before the first case's clock starts)
    import orcd_grpc.gguf_guard  # noqa: F401

    if mem_limit:
        # Headroom, not an absolute cap: a worker forked from a process that already maps
        # several GiB (pytest after torch, llguidance...) would otherwise fail every mmap.
        limit = _address_space() + mem_limit
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    conn.send(("ready", ""))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        path, engine = msg
        conn.send(run_one(path, engine))


class _Slot:
    def __init__(self, ctx, mem_limit):
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, mem_limit), daemon=True)
        self.proc.start()
        child.close()
        if not self.parent.poll(120) or self.parent.recv()[0] != "ready":
            raise RuntimeError("fuzz worker did not start")
        self.case = None
        self.started = 0.0

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.parent.close()


def campaign(cases: int, *, seed: int = 1, workers: int = 2, timeout: float = 20.0, out: str | None = None,
             mem_limit: int = MEM_LIMIT, start: int = 0, log=print, start_method: str = "forkserver") -> dict:
    """Runs cases [start, start+cases); returns the summary (also written to out/summary.json).
    start_method: the workers' (multiprocessing); forkserver, not fork, because a child forked from
    a process that has run numba's OpenMP pool (pytest, after a CPU-backend test) is killed at its
    first parallel kernel."""
    work = tempfile.mkdtemp(prefix="orcd-fuzz-")
    try:
        seeds = build_seeds(os.path.join(work, "seeds"))
        layouts = {k: layout(v) for k, v in seeds.items()}
        ctx = mp.get_context(start_method)
        slots = [_Slot(ctx, mem_limit) for _ in range(max(1, workers))]
        counts: Counter = Counter()
        by_mutation: dict[str, Counter] = {}
        by_stage: Counter = Counter()
        findings = []
        next_case, done = start, 0
        t0 = time.monotonic()
        end = start + cases

        def record(idx, meta, outcome, detail, data):
            nonlocal done
            done += 1
            counts[outcome] += 1
            by_mutation.setdefault(meta[1], Counter())[outcome] += 1
            if outcome == "rejected":
                by_stage[detail.split(":", 1)[0]] += 1
            if outcome not in ("accepted", "rejected"):
                findings.append({"case": idx, "seed": meta[0], "mutation": meta[1], "outcome": outcome,
                                 "detail": detail[-2000:]})
                if out:
                    os.makedirs(os.path.join(out, "findings"), exist_ok=True)
                    with open(os.path.join(out, "findings", f"case{idx}-{outcome}.gguf"), "wb") as fh:
                        fh.write(data)
            if done % 1000 == 0:
                log(f"{done}/{cases} cases, {time.monotonic() - t0:.0f}s: {dict(counts)}")

        busy: dict[int, tuple] = {}
        while done < cases:
            for i, slot in enumerate(slots):
                if i not in busy and next_case < end:
                    data, seed_name, how = make_case(seed, next_case, seeds, layouts)
                    path = os.path.join(work, f"case{next_case}.gguf")
                    with open(path, "wb") as fh:
                        fh.write(data)
                    slot.parent.send((path, seed_name.startswith("engine:")))
                    busy[i] = (next_case, (seed_name, how), path, data, time.monotonic())
                    next_case += 1
            for i in list(busy):
                slot = slots[i]
                idx, meta, path, data, started = busy[i]
                outcome = None
                try:
                    if slot.parent.poll(0.005):
                        outcome, detail = slot.parent.recv()
                except (EOFError, OSError):
                    outcome = "dead"
                if outcome is None and not slot.proc.is_alive():
                    outcome = "dead"
                if outcome is None and time.monotonic() - started > timeout:
                    outcome, detail = "hang", f"no answer after {timeout}s"
                if outcome is None:
                    continue
                if outcome == "dead":
                    slot.proc.join(1)
                    outcome, detail = "crash", f"worker exit code {slot.proc.exitcode}"
                if outcome in ("crash", "hang"):
                    slot.kill()
                    slots[i] = _Slot(ctx, mem_limit)
                del busy[i]
                try:
                    os.unlink(path)
                except OSError:
                    pass
                record(idx, meta, outcome, detail, data)
        for slot in slots:
            try:
                slot.parent.send(None)
            except OSError:
                pass
            slot.kill()
        summary = {
            "cases": done, "seed": seed, "start": start, "seconds": round(time.monotonic() - t0, 1),
            "seeds": {k: len(v) for k, v in seeds.items()},
            "outcomes": {k: counts.get(k, 0) for k in OUTCOMES},
            "rejected_at_stage": dict(by_stage),
            "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
            "findings": findings[:50],
        }
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=1)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--start", type=int, default=0, help="first case index (to reproduce one: --start N --cases 1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--mem-limit", type=int, default=MEM_LIMIT, help="address space a worker may add after its imports, bytes (0: no limit)")
    ap.add_argument("--out", default=None, help="directory for summary.json and findings/")
    a = ap.parse_args(argv)
    s = campaign(a.cases, seed=a.seed, workers=a.workers, timeout=a.timeout, out=a.out, mem_limit=a.mem_limit,
                 start=a.start, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({k: s[k] for k in ("cases", "seconds", "outcomes", "rejected_at_stage")}, indent=1))
    for f in s["findings"][:10]:
        print(f"--- case {f['case']} ({f['seed']}, {f['mutation']}): {f['outcome']}\n{f['detail']}")
    bad = sum(s["outcomes"][k] for k in ("finding", "memory", "crash", "hang"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
