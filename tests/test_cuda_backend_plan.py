"""CudaBackend's launch decisions on the CPU, with the driver and the kernels replaced by recorders:
which kernel each op takes under a Tuning and a device's SM count (the GPU suite checks results).
The backend is assembled from its parts without a device, as test_cuda_sample_buffer does."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from orcd_grpc.backends import cuda as cuda_mod
from orcd_grpc.backends import cuda_context, cuda_quant, cuda_step
from orcd_grpc.backends.base import KVLayout, RopeSpec, StepMeta
from orcd_grpc.backends.cuda_memory import Workspace
from orcd_grpc.errors import InvalidArgument
from orcd_grpc.tuning import DEFAULT, Tuning


class _Drv:
    Error = RuntimeError
    function_attribute = SimpleNamespace(MAX_DYNAMIC_SHARED_SIZE_BYTES=8)

    @staticmethod
    def pagelocked_empty(n, dtype):
        return np.empty(n, dtype)

    def __getattr__(self, name):  # copies and memsets: nothing to do without a device
        return lambda *a, **k: None


class _Recorder:
    def __init__(self):
        self.calls = []

    def get(self, name, sig, smem=0):
        rec = self

        class _F:
            def prepared_async_call(self, grid, block, stream, *args, shared_size=0):
                rec.calls.append((name, grid))

        return _F()


def _backend(monkeypatch, tuning=DEFAULT, sms=132):
    monkeypatch.setattr(cuda_context._tls, "guard", object(), raising=False)  # "the context is current"
    monkeypatch.setattr(cuda_step, "_context", lambda device=0: None)
    rec = _Recorder()
    monkeypatch.setattr(cuda_quant, "_kernels", lambda tuning=DEFAULT: rec)
    monkeypatch.setattr(cuda_quant, "_i8_kernels", lambda tuning=None: rec)
    be = object.__new__(cuda_mod.CudaBackend)
    nxt = [1 << 30]

    def persistent(nbytes, what):
        ptr, nxt[0] = nxt[0], nxt[0] + max(256, nbytes) + 4096
        return SimpleNamespace(ptr=ptr, nbytes=max(256, nbytes), free=lambda: None)

    be._drv, be.stream, be.device_index, be.closed = _Drv(), SimpleNamespace(synchronize=lambda: None), 0, False
    be.tuning, be.limits = tuning, cuda_context.DeviceLimits(sms=sms, l2_bytes=50 << 20)
    be._persistent = persistent
    be._kernels, be._attr_set, be._recent, be._sync_each = {}, set(), [], tuning.cuda_sync
    be._rope_cache, be._attn_counters, be._blas = {}, None, None  # no cuBLAS: the fused kernels
    be._meta_buf, be._meta_hosts, be._meta_turn = None, [None, None], 0
    be._graphs, be._graph_warm, be._graph_failed = {}, set(), set()
    be.ws = Workspace(SimpleNamespace(ptr=1 << 20, nbytes=256 << 20, free=lambda: None))
    be._ensure_meta(4096, 256, 256 * 64)
    launched = rec.calls
    be._k = lambda module, name, sig: SimpleNamespace(name=name, fn=SimpleNamespace(set_attribute=lambda *a: None))
    be._launch = lambda k, grid, block, *args, shared=0: launched.append((k.name, grid))
    return be, launched


def _decode_meta(B, ctx_len=300, bs=16):
    blocks = -(-ctx_len // bs)
    return StepMeta(token_ids=np.zeros(B, np.int32), positions=np.full(B, ctx_len - 1, np.int32),
                    q_starts=np.arange(B + 1, dtype=np.int32), ctx_lens=np.full(B, ctx_len, np.int32),
                    slot_mapping=np.arange(B, dtype=np.int32),
                    block_tables=np.arange(B * blocks, dtype=np.int32).reshape(B, blocks), block_size=bs,
                    logits_rows=np.arange(B, dtype=np.int32))


def _prompt_meta(T):
    """A step of one sequence's first T prompt tokens (max_q T: not a decode step)."""
    return dataclasses.replace(_decode_meta(1), token_ids=np.zeros(T, np.int32), positions=np.arange(T, dtype=np.int32),
                               q_starts=np.array([0, T], np.int32), slot_mapping=np.arange(T, dtype=np.int32),
                               ctx_lens=np.array([T], np.int32))


def _attend(be, B, Hq, Hkv, D):
    layout = KVLayout(n_layers=1, num_blocks=64 * B, block_size=16, n_kv_heads=Hkv, head_dim_k=D, head_dim_v=D)
    kv = be.alloc_kv(layout)
    ctx = be.begin_step(_decode_meta(B))
    q = be._out((B, Hq, D))
    return be.attention(q, None, None, kv, 0, ctx, scale=D ** -0.5)


@pytest.mark.parametrize("sms,want", [(132, 17), (66, 9)])
def test_mha_decode_takes_attn_dec_split_by_the_device(monkeypatch, sms, want):
    """phi3-mini (32 heads, MHA) at B=1: attn_dec, key slices for 4 CTAs per SM of this device;
    the last slice merges (no attn_combine)."""
    be, launched = _backend(monkeypatch, sms=sms)
    _attend(be, 1, 32, 32, 96)
    assert [(n, g[0]) for n, g in launched] == [("attn_dec_g1_n2", want)]


@pytest.mark.parametrize("merge", [True, False], ids=["in-kernel", "attn_combine"])
def test_split_decode_attention_writes_the_rounding_the_output_projection_takes(monkeypatch, merge):
    """ORCD_FUSE_ATTN_Q8: phi3-mini at B=1 (attn_dec over 17 slices) hands the merge, its own last slice
    or attn_combine, the out.q8 levels and scales, and attn_output's int8 GEMV then launches no
    quantize_x8 (the default); off, or a step of one slice, or a head dim not a multiple of 32 hand
    it none."""
    tuning = dataclasses.replace(DEFAULT, fuse_attn_q8=True, attn_merge=merge)
    be, launched = _backend(monkeypatch, tuning)
    args = []
    be._launch = lambda k, grid, block, *a, shared=0: (launched.append((k.name, grid)), args.append(a))
    out = _attend(be, 1, 32, 32, 96)
    assert [n for n, _ in launched] == ["attn_dec_g1_n2"] + ([] if merge else ["attn_combine"])
    assert out.q8 is not None and args[-1][-2:] == (out.q8[0].ptr, out.q8[1].ptr)  # the merging kernel's
    launched.clear()
    w = SimpleNamespace(qtype=Q.Q4_K, n=3072, k=3072, n_experts=None, ptr=0x10000)
    be.linear(out, w)
    assert [n for n, _ in launched] == ["gemv_q4_k_1_i8"]
    off = dataclasses.replace(tuning, fuse_attn_q8=False)
    for t, shape in ((off, (1, 32, 32, 96)), (dataclasses.replace(tuning, attn_splits=1), (1, 32, 32, 96)),
                     (tuning, (1, 8, 8, 80))):
        be.tuning = t
        launched.clear()
        args.clear()
        assert _attend(be, *shape).q8 is None and all(a[-2:] == (0, 0) for a in args)


def test_gqa_decode_takes_the_tensor_core_kernel(monkeypatch):
    """qwen2.5 (14 q heads on 2 kv heads, head dim 64) at B=1: attn_decm_d64 over 32 key slices (the
    default cap; 4 CTAs per SM would be 264), merged by its last CTA, with 544 * (64 + 8) bytes of
    shared memory; groups of 2..16 take it, MHA and head dim 256 do not."""
    be, launched = _backend(monkeypatch)
    shared_sizes = []
    be._launch = lambda k, grid, block, *args, shared=0: (launched.append((k.name, grid)), shared_sizes.append(shared))
    _attend(be, 1, 14, 2, 64)
    assert launched == [("attn_decm_d64", (32, 1, 2))] and shared_sizes == [544 * 72]
    launched.clear()
    _attend(be, 3, 64, 4, 128)  # group 16, head dim 128: 44 slices would fill the SMs; the cap is 32
    _attend(be, 1, 32, 32, 96)  # MHA: attn_dec
    _attend(be, 1, 8, 1, 256)   # head dim 256: the tiled kernel
    assert [n for n, _ in launched] == ["attn_decm_d128", "attn_dec_g1_n2", "attn_d8_b", "attn_combine"]
    assert launched[0][1] == (32, 3, 4)


def test_deep_decode_steps_take_more_key_slices(monkeypatch):
    """ORCD_ATTN_SPLITS_DEEP=256: qwen2.5 at B=1 past 4,096 keys on 256 slices (4 CTAs an SM would be
    264), below it on the usual 32; a step's meta.deep (a graph key's class) overrides its depth;
    off (0, the default), 32 at any depth."""
    be, launched = _backend(monkeypatch, dataclasses.replace(DEFAULT, attn_splits_deep=256))
    layout = KVLayout(n_layers=1, num_blocks=1024, block_size=16, n_kv_heads=2, head_dim_k=64, head_dim_v=64)
    kv = be.alloc_kv(layout)
    for ctx_len, deep, want in ((8000, None, 256), (4096, None, 32), (4097, None, 256), (300, True, 256),
                                (8000, False, 32)):
        launched.clear()
        ctx = be.begin_step(dataclasses.replace(_decode_meta(1, ctx_len), deep=deep))
        be.attention(be._out((1, 14, 64)), None, None, kv, 0, ctx, scale=0.125)
        assert launched == [("attn_decm_d64", (want, 1, 2))], (ctx_len, deep)
    be.tuning = DEFAULT
    launched.clear()
    be.attention(be._out((1, 14, 64)), None, None, kv, 0, be.begin_step(_decode_meta(1, 8000)), scale=0.125)
    assert launched == [("attn_decm_d64", (32, 1, 2))]


def test_gqa_decode_without_attn_decm_takes_the_tiled_kernel_and_a_combine(monkeypatch):
    """ORCD_ATTN_DEC_MMA=0: qwen2.5 at B=1 on attn_d2_b over 32 key slices, then attn_combine; with
    ORCD_ATTN_SPLITS=256, 132 (264 CTAs on the H100's 132 SMs)."""
    no_decm = dataclasses.replace(DEFAULT, attn_dec_mma=0)
    be, launched = _backend(monkeypatch, no_decm)
    _attend(be, 1, 14, 2, 64)
    assert [(n, g[0]) for n, g in launched] == [("attn_d2_b", 32), ("attn_combine", -(-14 // 8))]
    be, launched = _backend(monkeypatch, dataclasses.replace(no_decm, attn_splits=256))
    _attend(be, 1, 14, 2, 64)
    assert [(n, g[0]) for n, g in launched] == [("attn_d2_b", 132), ("attn_combine", -(-14 // 8))]


def test_decode_attention_switches(monkeypatch):
    be, launched = _backend(monkeypatch, Tuning(attn_splits=4, attn_merge=False))
    _attend(be, 1, 32, 32, 96)
    assert [(n, g[0]) for n, g in launched] == [("attn_dec_g1_n2", 4), ("attn_combine", 4)]
    be, launched = _backend(monkeypatch, Tuning(attn_dec_min_heads=2, attn_dec_mma=0))
    _attend(be, 1, 14, 2, 64)  # 2 (sequence, kv head) pairs reach the threshold: attn_dec for GQA too
    assert launched[0][0] == "attn_dec_g8_n1"


def test_norm_linear_and_split_follow_the_tuning(monkeypatch):
    be, launched = _backend(monkeypatch)
    be.begin_step(_decode_meta(1))
    w = SimpleNamespace(qtype=Q.Q4_K, n=9216, k=3072, n_experts=None, ptr=0x10000, expert_bytes=0)
    x, g = be._out((1, 3072)), be._out((3072,))
    h, _ = be.rms_norm(x, g, 1e-5)
    y = be.linear(h, w)
    assert [n for n, _ in launched] == ["rms_norm_block_q8", "gemv_q4_k_1_i8"]  # no quantize_x8 launch
    parts = be.split(y, [3072, 3072, 3072])
    assert [p.ptr for p in parts] == [y.ptr, y.ptr + 4 * 3072, y.ptr + 8 * 3072] and len(launched) == 2
    launched.clear()
    be.tuning = dataclasses.replace(DEFAULT, fuse_q8=False, split_views=False)
    h, _ = be.rms_norm(x, g, 1e-5)
    y = be.linear(h, w)
    be.split(y, [3072, 3072, 3072])
    assert [n for n, _ in launched] == ["rms_norm_block", "quantize_x8", "gemv_q4_k_1_i8", "split3_f32"]


@pytest.mark.parametrize("B,nt", [(2, 2), (3, 4), (8, 8)])
def test_small_batches_take_the_int8_gemv(monkeypatch, B, nt):
    """Decode of 2..8 sequences: the norm and the fused GLU write their rows' int8 rounding (a grid row
    per sequence), the GEMV of nt tokens takes it (no quantize_x8); an input made elsewhere is
    quantized once and kept for its next matmul. ORCD_GEMV_INT8_TOKENS=1 gives the float GEMV back.
    9 rows of a decode step take the int8 GEMM on the norm's rounding (ORCD_GEMM_INT8_MAX); 9 tokens
    of a prompt, or with the switch off, the f16 GEMM on float rows."""
    be, launched = _backend(monkeypatch)
    be.begin_step(_decode_meta(B))
    w = SimpleNamespace(qtype=Q.Q4_K, n=9216, k=3072, n_experts=None, ptr=0x10000, expert_bytes=0)
    x, g = be._out((B, 3072)), be._out((3072,))
    h, _ = be.rms_norm(x, g, 1e-5)
    be.linear(h, w)
    glu = be.glu_fused(be._out((B, 2 * 3072)))
    be.linear(glu, w)
    s = be.add(x, x)
    be.linear(s, w)
    be.linear(s, w)
    assert launched == [("rms_norm_block_q8", (B, 1, 1)), (f"gemv_q4_k_{nt}_i8", (1152, 1)),
                        ("silu_halves_q8", (12, B, 1)), (f"gemv_q4_k_{nt}_i8", (1152, 1)),
                        ("add_f32", launched[4][1]), ("quantize_x8", ((B * 96 + 7) // 8, 1)),
                        (f"gemv_q4_k_{nt}_i8", (1152, 1)), (f"gemv_q4_k_{nt}_i8", (1152, 1))]
    launched.clear()
    be.tuning = dataclasses.replace(DEFAULT, gemv_int8_tokens=1)
    h, _ = be.rms_norm(x, g, 1e-5)
    be.linear(h, w)
    assert [n for n, _ in launched] == ["rms_norm_block", f"gemv_q4_k_{nt}"]
    launched.clear()
    be.tuning = DEFAULT
    be.begin_step(_decode_meta(9))
    h, _ = be.rms_norm(be._out((9, 3072)), g, 1e-5)
    be.linear(h, w)
    assert [n for n, _ in launched] == ["rms_norm_block_q8", "gemm_init", "gemm_i8_q4_k_16"]  # split-K
    launched.clear()
    for meta, tuning in ((_prompt_meta(9), DEFAULT), (_decode_meta(9), dataclasses.replace(DEFAULT, gemm_int8_max=0))):
        be.tuning = tuning
        be.begin_step(meta)
        h, _ = be.rms_norm(be._out((9, 3072)), g, 1e-5)
        be.linear(h, w)
        assert [n for n, _ in launched] == ["rms_norm_block", "gemm_init", "gemm_q4_k_16"]
        launched.clear()


def test_fused_qkv_rope_and_moe_plan(monkeypatch):
    be, launched = _backend(monkeypatch)
    layout = KVLayout(n_layers=1, num_blocks=64, block_size=16, n_kv_heads=2, head_dim_k=64, head_dim_v=64)
    kv = be.alloc_kv(layout)
    ctx = be.begin_step(_decode_meta(1))
    spec = RopeSpec(dim=64, base=10000.0, neox=True)
    be.qkv_rope_store(be._out((1, (14 + 4) * 64)), kv, 0, ctx, spec, 14, 2, 64, 64)
    assert [n for n, _ in launched] == ["qkv_rope_store_f32"]
    launched.clear()
    be.kv_type = "q8_0"
    kv8 = be.alloc_kv(layout)
    be.qkv_rope_store(be._out((3, (14 + 4) * 64)), kv8, 0, ctx, spec, 14, 2, 64, 64)
    assert launched == [("qkv_rope_store_q8", (5, 3, 1))]  # (14 + 2 + 2) * 64 / 32 = 36 warps, 8 a block
    launched.clear()
    be.tuning = dataclasses.replace(DEFAULT, fuse_qkv_rope=False)
    be.qkv_rope_store(be._out((3, (14 + 4) * 64)), kv8, 0, ctx, spec, 14, 2, 64, 64)
    assert [n for n, _ in launched][-1] == "kv_store_q8"
    be.tuning, be.kv_type = DEFAULT, "f16"
    launched.clear()
    E, d, F = 32, 2880, 2880
    w = SimpleNamespace(qtype=Q.MXFP4, n=F, k=d, n_experts=E, ptr=0x10000, expert_bytes=F * d // 2 * 17 // 16)
    wd = SimpleNamespace(qtype=Q.MXFP4, n=d, k=F, n_experts=E, ptr=0x20000, expert_bytes=F * d // 2 * 17 // 16)
    # a decode step of 64 sequences: the grouped GEMM on int8 tensor cores, gate and up on one rounding
    be.tuning = DEFAULT
    be.begin_step(_decode_meta(64))
    be.moe(be._out((64, d)), be._out((64, E)), 4, w, w, wd, act="swiglu_oai")
    names = [n for n, _ in launched]
    assert names == ["moe_route", "moe_group", "quantize_x8", "gemm_i8_moe_mxfp4_16", "gemm_i8_moe_mxfp4_16",
                     "moe_act_q8", "gemm_i8_moe_mxfp4_16", "moe_combine"]
    # prompt tokens with ORCD_MOE_INT8_PROMPT off, or decode steps with ORCD_MOE_INT8 off: the f16 grouped
    # GEMM on float rows
    for meta, tuning in ((_prompt_meta(64), dataclasses.replace(DEFAULT, moe_int8_prompt=False)),
                         (_decode_meta(64), dataclasses.replace(DEFAULT, moe_int8=False))):
        be.tuning = tuning
        launched.clear()
        be.begin_step(meta)
        be.moe(be._out((64, d)), be._out((64, E)), 4, w, w, wd, act="swiglu_oai")
        names = [n for n, _ in launched]
        assert names == ["moe_route", "moe_group", "gemm_moe_mxfp4_16_blk", "gemm_moe_mxfp4_16_blk", "moe_act",
                         "gemm_moe_mxfp4_16_blk", "moe_combine"]
    # ORCD_MOE_INT8_PROMPT: a prompt chunk of 512 tokens (2,048 slots, row tiles of 64) on the int8 GEMM too
    be.tuning = DEFAULT
    launched.clear()
    be.begin_step(_prompt_meta(512))
    be.moe(be._out((512, d)), be._out((512, E)), 4, w, w, wd, act="swiglu_oai")
    assert [n for n, _ in launched] == ["moe_route", "moe_group", "quantize_x8", "gemm_i8_moe_mxfp4_64",
                                        "gemm_i8_moe_mxfp4_64", "moe_act_q8", "gemm_i8_moe_mxfp4_64", "moe_combine"]
    # one sequence (per-slot GEMVs on the int8 rounding): gate and up in one launch; on float rows
    # (ORCD_MOE_INT8 off) in two
    # (the activation written as the down projection's int8 input by moe_act_q8, no quantize_x8 launch)
    for tuning, names in ((DEFAULT, ["quantize_x8", "gemv_mxfp4_1_i8_pair", "moe_act_q8", "gemv_mxfp4_1_i8"]),
                          (dataclasses.replace(DEFAULT, moe_int8=False), ["gemv_mxfp4_1", "gemv_mxfp4_1", "moe_act",
                                                                          "gemv_mxfp4_1"])):
        be.tuning = tuning
        launched.clear()
        be.begin_step(_decode_meta(1))
        be.moe(be._out((1, d)), be._out((1, E)), 4, w, w, wd, act="swiglu_oai")
        assert [n for n, _ in launched] == ["moe_route", *names, "moe_combine"]
    be.tuning = DEFAULT


def test_q8_0_cache_takes_the_q8_kernels_with_its_scales(monkeypatch):
    """--kv-cache-type q8_0: attn_dec for MHA decode, attn_dN for GQA (attn_decm reads f16 only), the
    *_q8 kernels, a cache of 34 bytes per 32 values whose scale regions follow the levels."""
    be, launched = _backend(monkeypatch)
    be.kv_type = "q8_0"
    _attend(be, 1, 32, 32, 96)
    _attend(be, 1, 14, 2, 64)
    assert [n for n, _ in launched] == ["attn_dec_g1_n2_q8", "attn_d2_q8", "attn_combine"]
    layout = KVLayout(n_layers=3, num_blocks=8, block_size=16, n_kv_heads=2, head_dim_k=64, head_dim_v=64)
    kv = be.alloc_kv(layout)
    assert kv.q8 and kv.buf.nbytes == layout.bytes(34 / 32)
    levels = 3 * 8 * 16 * 2 * 64  # bytes of K levels, all layers
    assert kv.v_base - kv.k_base == levels and kv.ks_base - kv.v_base == levels
    assert kv.scale_ptrs(1) == (kv.ks_base + levels // 3 // 16, kv.vs_base + levels // 3 // 16)
    with pytest.raises(InvalidArgument, match="blocks of 32"):
        be.alloc_kv(KVLayout(n_layers=1, num_blocks=8, block_size=16, n_kv_heads=2, head_dim_k=80, head_dim_v=80))


def test_prefill_takes_the_tensor_core_kernel_when_switched_on(monkeypatch):
    """ORCD_ATTN_MMA: a prefill step of an f16 cache with head dim 64/96/128 runs attn_mma_d<D>, a CTA
    per 64 query rows of each (sequence, kv head); decode steps and a q8_0 cache keep their kernels."""
    be, launched = _backend(monkeypatch, dataclasses.replace(DEFAULT, attn_mma=True))
    T, Hq, Hkv, D = 100, 14, 2, 64
    layout = KVLayout(n_layers=1, num_blocks=16, block_size=16, n_kv_heads=Hkv, head_dim_k=D, head_dim_v=D)
    kv = be.alloc_kv(layout)
    meta = StepMeta(token_ids=np.zeros(T, np.int32), positions=np.arange(T, dtype=np.int32),
                    q_starts=np.array([0, T], np.int32), ctx_lens=np.array([T], np.int32),
                    slot_mapping=np.arange(T, dtype=np.int32), block_tables=np.arange(16, dtype=np.int32)[None],
                    block_size=16, logits_rows=np.array([T - 1], np.int32))
    ctx = be.begin_step(meta)
    be.attention(be._out((T, Hq, D)), None, None, kv, 0, ctx, scale=D ** -0.5)
    assert launched == [("attn_mma_d64", (-(-T * 7 // 64), 1, Hkv))]
    launched.clear()
    _attend(be, 1, 14, 2, 64)  # decode: its own tensor-core kernel
    assert launched[0][0] == "attn_decm_d64"


def test_block_copy_launches_cover_values_then_q8_scales(monkeypatch):
    """copy_kv_blocks: per pair, one kv_copy_block over the f16 values; a q8_0 cache adds one over
    its scales, whose words per block are a 16th of the levels'. Arguments as the kernel reads them:
    K base, V base, words per layer of K and V, words per block of K and V, src, dst."""
    layout = KVLayout(n_layers=3, num_blocks=8, block_size=16, n_kv_heads=2, head_dim_k=64, head_dim_v=64)
    for kind in ("f16", "q8_0"):
        be, _ = _backend(monkeypatch)
        be.kv_type = kind
        kv = be.alloc_kv(layout)
        calls = []
        be._launch = lambda k, grid, block, *args, shared=0: calls.append((k.name, grid, [int(a) for a in args]))
        be.copy_kv_blocks(kv, [(1, 4), (4, 5)])
        width = 2 if kind == "f16" else 1
        block_words = 16 * 2 * 64 * width // 4
        layer_words = 8 * block_words
        want = [("kv_copy_block", (4 if kind == "f16" else 2, 3, 2),
                 [kv.k_base, kv.v_base, layer_words, layer_words, block_words, block_words])]
        if kind == "q8_0":
            want.append(("kv_copy_block", (1, 3, 2), [kv.ks_base, kv.vs_base, layer_words // 16, layer_words // 16,
                                                      block_words // 16, block_words // 16]))
        got = [(n, g, a[:6]) for n, g, a in calls]
        assert got == want * 2 and [a[6:] for _, _, a in calls] == [[1, 4]] * len(want) + [[4, 5]] * len(want)
