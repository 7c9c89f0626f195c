"""The performance switches: one typed record, read from the environment once.

Every `ORCD_*` variable that changes how the GPU path runs (not where files live) is a field of
`Tuning`, with its default, the variable it is read from and why the default is what it is
(the figures are in BENCHMARKS.md). `Tuning.from_env()` is called once, where a backend is
built (or an engine loads a model), and the record is handed down: nothing below reads the
environment, so a test builds `Tuning(...)` or `dataclasses.replace(DEFAULT, ...)` instead of
patching module globals, and an A/B run is `ORCD_X=... command` as before.

`compile_time` fields change the nvcc options of a kernel module and so its cache key
(cuda_runtime.module_options); the others are read at launch time.

`python3 -m orcd_grpc.tuning` prints the table (the README's GPU notes list the same).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _switch(default, env: str, doc: str, *, level: str = "backend", choices: tuple = (), compile_time: bool = False):
    return dataclasses.field(default=default, metadata={"env": env, "doc": doc, "level": level, "choices": choices,
                                                        "compile_time": compile_time})


@dataclasses.dataclass(frozen=True)
class Tuning:
    # ---- read where a model loads: the CUDA runner (graphs, lookahead) and weight_packing (fusion)
    cuda_graphs: bool = _switch(
        True, "ORCD_CUDA_GRAPHS", "decode steps replay a CUDA graph per batch-size bucket; 0 launches every "
        "kernel from Python (debugging)", level="engine")
    pdl: bool = _switch(
        True, "ORCD_PDL", "the kernel-to-kernel edges of a captured decode graph are programmatic dependencies "
        "(each kernel is scheduled while the one before it runs and waits on the device in pdl_enter; "
        "H100 graph replay qwen2.5 B=1 1,076 -> 1,017 us, phi3-mini 2,576 -> 2,516)",
        level="backend")
    verify_graphs: bool = _switch(
        False, "ORCD_VERIFY_GRAPHS", "speculative verify steps of up to 8 sequences with the same number of "
        "drafts replay a CUDA graph per (batch bucket, tokens per row), as decode steps do, instead of "
        "launching every kernel from Python; not yet measured", level="engine")
    lookahead: bool = _switch(
        True, "ORCD_LOOKAHEAD", "a decode step of an unchanged batch is queued before the host has read the "
        "previous step's tokens (fed on the device); B=1 tg 732 against 677 tok/s without", level="engine")
    mixed_graphs: bool = _switch(
        True, "ORCD_MIXED_GRAPHS", "steps that carry prompt tokens (a serving load's prefill chunks beside "
        "decode rows) of up to ORCD_MIXED_MAX_TOKENS tokens are padded to a (rows, tokens) bucket and replay a CUDA graph per "
        "bucket, captured at load, as decode steps do, instead of launching every kernel from Python. qwen2.5 "
        "serving (H100): output 6,663 against 4,645 tok/s at 64 clients, TTFT p50 / p99 and TPOT lower; "
        "6,634-8,234 against 5,634-6,319 at 256, TPOT p50 lower, TTFT p50 higher; the load 8.3 against 4.9 s",
        level="engine")
    mixed_max_tokens: int = _switch(
        512, "ORCD_MIXED_MAX_TOKENS", "the largest token bucket of ORCD_MIXED_GRAPHS (512, 768, 1024, 1536 or 2048): "
        "longer steps launch eagerly. On serve_bench's default workload 76-81 % of the steps with prompt tokens "
        "carry at most 512 tokens, 94-97 % at most 1,024 (scripted engine, 64 and 256 clients); whether graphs "
        "still pay where a step's kernels are long is not yet measured",
        level="engine", choices=(512, 768, 1024, 1536, 2048))
    feed_changed: bool = _switch(
        False, "ORCD_FEED_CHANGED", "the step of a changed batch (sequences gone, new prompts that each fit it whole) "
        "is queued behind the step in flight too, the continuing sequences fed its tokens on the device, so the "
        "device need not idle while the host delivers that step and plans the next; needs ORCD_LOOKAHEAD (and "
        "ORCD_MIXED_GRAPHS for new prompts); not yet measured", level="engine")
    feed_eager: bool = _switch(
        True, "ORCD_FEED_EAGER", "an eagerly run step (one carrying prompt tokens) whose every row samples one "
        "token on the device samples asynchronously, so the decode step after it is queued behind it (fed on "
        "the device) instead of after the host has delivered its tokens; needs ORCD_LOOKAHEAD; not yet "
        "measured on a GPU", level="engine")
    fuse_weights: bool = _switch(
        True, "ORCD_FUSE_WEIGHTS", "Q/K/V and gate/up loaded as one matrix each where their types allow",
        level="engine")
    fuse_qk: bool = _switch(
        True, "ORCD_FUSE_QK", "Q and K fused even where V's type differs (qwen2.5's Q4_K_M files)", level="engine")
    fuse_widen: bool = _switch(
        True, "ORCD_FUSE_WIDEN", "Q/K/V of types that widen exactly to Q8_0 loaded as one Q8_0 matrix "
        "(qwen2.5 B=1 1,157 -> 1,048 us per step)", level="engine")

    # ---- read where the worker process starts (server.serve)
    gil_switch_us: int = _switch(
        0, "ORCD_GIL_SWITCH_US", "the interpreter's thread switch interval in us (sys.setswitchinterval); 0 keeps "
        "Python's 5,000. The engine thread waits for the GPU with the GIL released, and while the gRPC loop "
        "runs Python it gets the GIL back only after a whole interval (bench/gil_wake.py); not yet measured "
        "on a GPU", level="server")

    # ---- backend: debugging and sizing
    cuda_sync: bool = _switch(
        False, "ORCD_CUDA_SYNC", "synchronise after every launch so that a fault names its kernel (debugging; "
        "also keeps decode steps off CUDA graphs)")
    workspace_mb: int = _switch(
        0, "ORCD_WORKSPACE_MB", "the step workspace in MiB; 0 sizes it from the VRAM budget (1/8, 64-512 MiB) "
        "plus, at load, two float32 logits rows per sequence of the model's vocabulary (what a decode step of "
        "every sequence takes), so many sequences keep room for a prompt chunk")

    # ---- the CPU backend
    cpu_threading: str = _switch(
        "omp", "ORCD_CPU_THREADING", "numba's thread pool for the CPU backend's kernels, set before its first "
        "parallel call: omp (GNU OpenMP, idle threads spinning ORCD_CPU_SPIN turns; safe from several threads, not in a child forked "
        "after its first parallel call) or workqueue (aborts the process when two threads launch kernels at "
        "once; half omp's decode speed, BENCHMARKS.md); NUMBA_NUM_THREADS sets the count",
        choices=("workqueue", "omp", "tbb"))
    cpu_spin: int = _switch(
        3000, "ORCD_CPU_SPIN", "with omp: how many turns (GOMP_SPINCOUNT; ~30 us a thousand here) an idle "
        "kernel thread waits for the next parallel loop before it sleeps. A decode step runs ~270 of them a few "
        "microseconds apart: 3 us a launch spinning against 17 us woken; 0 sleeps at once (a busy host), "
        "libgomp's own 300,000 starved the working thread on a loaded 2-core host (BENCHMARKS.md)")

    # ---- attention
    # Decode steps: GQA models with an f16 cache of head dim 64/96/128 take attn_decm (attn_dec_mma);
    # the rest choose between attn_dec and attn_dN_b by group size and (sequence, kv head) pairs,
    # as measured (BENCHMARKS.md, sessions 6 and 19; docs/kernels.md).
    attn_splits: int = _switch(
        32, "ORCD_ATTN_SPLITS", "most key slices per (sequence, kv head) in decode attention, 1..256 (1: no split; "
        "a cap of 4 took qwen2.5 B=1 from 1,318 to 1,659 us; 256 took its decode at a depth of 32k from 133 to 304 "
        "tok/s and its B=1 graph at a depth of 256 from 687 to 765 us, H100)")
    attn_splits_deep: int = _switch(
        0, "ORCD_ATTN_SPLITS_DEEP", "... and this many (1..256) for decode steps whose deepest sequence holds more "
        "than 4,096 keys (32 slices of 128), each batch bucket on a graph of its own there, captured on first use "
        "(what 256 gains deep and costs shallow: ORCD_ATTN_SPLITS); 0: the one cap at every depth. Not yet measured")
    attn_dec_max_group: int = _switch(
        1, "ORCD_ATTN_DEC_MAX_GROUP", "decode steps of models with at most this many q heads per kv head use "
        "attn_dec (MHA phi3-mini 4,214 -> 3,322 us; GQA at B=1 slower: qwen2.5 19.1 against 15.8 us per layer)")
    attn_dec_min_heads: int = _switch(
        128, "ORCD_ATTN_DEC_MIN_HEADS", "... and any group size from this many (sequence, kv head) pairs in a step "
        "(qwen2.5 B=64 8,998 against 8,029 tok/s; 64 pairs and fewer even or slower)")
    attn_q8_dp4a: bool = _switch(
        False, "ORCD_ATTN_Q8_DP4A", "attn_dec over a Q8_0 cache rounds the turned q to int8 blocks as well (a float "
        "scale a block) and scores a key with 8 dp4a a block in place of 32 conversions and FMAs a q head; not yet "
        "measured", compile_time=True)
    attn_dec_mma: int = _switch(
        2, "ORCD_ATTN_DEC_MMA", "decode steps of an f16 cache with head dim 64, 96 or 128 and from this many to 16 "
        "q heads per kv head attend on tensor cores (attn_decm_d*: the group's heads are the rows of an mma tile) "
        "instead of attn_dec / attn_dN_b (H100 qwen2.5 B=1 graph 1,014 -> 775 us, B=64 2,771 -> 2,470); 0 never; "
        "1 also takes MHA models (not yet measured)")
    attn_merge: bool = _switch(
        True, "ORCD_ATTN_MERGE", "split attn_dec merges its slices in its last CTA instead of an attn_combine "
        "launch (phi3-mini -260 us per step)")
    attn_mma: bool = _switch(
        True, "ORCD_ATTN_MMA", "prefill steps (more than one tile of query rows) of an f16 cache with head dim 64, 96 "
        "or 128 attend on tensor cores (attn_mma_d*) instead of attn_dN_b (pp512 qwen2.5 35,978 -> 44,833 tok/s, "
        "phi3-mini 7,547 -> 8,444; a 32k prefill 5,968 -> 35,841)")
    fuse_qkv_rope: bool = _switch(
        True, "ORCD_FUSE_QKV_ROPE", "split, rope and KV store of a fused Q/K/V row as one kernel "
        "(phi3-mini -100 us per step)")

    # ---- norms, activations, splits
    norm_block_rows: int = _switch(
        256, "ORCD_NORM_BLOCK_ROWS", "RMSNorm takes a block per row up to this many rows, a warp per row above "
        "(qwen2.5 B=1 1,787 -> 1,674 us with 256 against 0)")
    fuse_q8: bool = _switch(
        True, "ORCD_FUSE_Q8", "RMSNorm and fused-GLU kernels of up to ORCD_GEMV_INT8_TOKENS rows write the int8 rounding the next GEMV "
        "takes (no quantize launch: qwen2.5 B=1 1,318 -> 1,245 us, phi3-mini 2,680 -> 2,568)")
    fuse_attn_q8: bool = _switch(
        True, "ORCD_FUSE_ATTN_Q8", "... and so does the merge of a split decode attention step (attn_dec, attn_decm, "
        "attn_combine) for the output projection (no quantize launch a layer: phi3-mini B=1 2,116.6 -> 2,092.2 us, "
        "gpt-oss-20b 2,127.3 -> 2,111.9; B=32, 64 unchanged; H100, trace_decode)", compile_time=True)
    split_views: bool = _switch(
        True, "ORCD_SPLIT_VIEWS", "a one-row split hands back views of its input instead of launching a copy")

    # ---- matmuls
    gemv_ksplit: str = _switch(
        "auto", "ORCD_GEMV_KSPLIT", "GEMV k-split (a block's warps share rows): auto below 2 row blocks per SM; "
        "0 never; 1 always (A/B)", choices=("auto", "0", "1"))
    gemv_int8: bool = _switch(
        True, "ORCD_GEMV_INT8", "matmuls of up to ORCD_GEMV_INT8_TOKENS tokens on integer formats on an int8-rounded input with dp4a "
        "products (phi3-mini B=1 3,046 -> 2,661 us)")
    gemv_int8_tokens: int = _switch(
        8, "ORCD_GEMV_INT8_TOKENS", "... for matmuls of up to this many tokens (at most 8, the GEMV's largest; "
        "1: single-token steps only): a row's integers are unpacked once for all of them")
    gemv_int8_min: int = _switch(
        4 << 20, "ORCD_GEMV_INT8_MIN", "... for matrices of at least this many weights (smaller ones are "
        "latency-bound, where the quantize launch costs more than it saves)")
    moe_int8: bool = _switch(
        True, "ORCD_MOE_INT8", "the expert matmuls of decode steps on the int8-rounded input: the per-slot GEMVs "
        "(gpt-oss at B=1, 3,262 -> 3,127 us per step), gate and up in one launch there, and the grouped GEMM on int8 "
        "tensor cores (gemm_i8_moe_*) for row tiles of up to 64 slots (gpt-oss-20b B=64 graph 17,537 -> 14,601 us, H100)")
    moe_int8_prompt: bool = _switch(
        True, "ORCD_MOE_INT8_PROMPT", "... and the grouped expert matmuls of prompt steps too, wherever the row tiles "
        "are at most 64 slots (the activations rounded to int8 a 32-block, as llama.cpp's MMQ does; dense prompt "
        "matmuls stay f16): gpt-oss-20b pp512 10,036 -> 14,854 tok/s (H100)")
    gemm_min_ksteps: int = _switch(
        4, "ORCD_GEMM_MIN_KSTEPS", "fewest 64-wide k-steps per GEMM split-K block (1: mixed, q8_0 faster and q4_k "
        "slower at B=64)")
    gemm_int8_max: int = _switch(
        64, "ORCD_GEMM_INT8_MAX", "dense matmuls of 9 up to this many tokens (at most 64; below ORCD_GEMM_BLAS_MIN) "
        "of decode steps (one token a row) on integer formats take the int8 tensor-core GEMM (cuda/mma_i8.cu) on the int8-rounded input instead of the "
        "f16 one: phi3-mini B=32 step 10,696 -> 7,024 us, B=64 (against cuBLAS) 12,229 -> 11,305 (H100); 0 never")
    gemm_i8_unroll: bool = _switch(
        True, "ORCD_GEMM_I8_UNROLL", "the int8 GEMM's k-windows of a stage unrolled, so their scale and byte "
        "offsets fold (a Q4_K stage at BM 32 issues 1,800 instructions rather than 2,417, in 120 registers: 2 blocks "
        "an SM, not 3): phi3-mini's B=32 step 6,194 -> 5,487 us, B=64 9,731 -> 8,676 (H100, trace_decode)",
        compile_time=True)
    gemm_i8_ctas: int = _switch(
        2, "ORCD_GEMM_I8_CTAS", "... the int8 GEMM splits k where its tiles alone give fewer than this many blocks an "
        "SM (a block holds 1-3 an SM: phi3-mini's attn_output at 32 rows ran 144 blocks, 0.36 waves, 14 % occupancy, "
        "ncu on the H100); not yet measured above 2")
    gemm_blas_min: int = _switch(
        65, "ORCD_GEMM_BLAS_MIN", "dense matmuls of at least this many tokens (quantized or F16 weights) decode "
        "the weight to f16 and multiply on cuBLAS (cuda_blas.py) instead of the fused GEMM: 1.3-2.6x at 64 "
        "tokens, 2.6-4.4x at 256 on every anchor shape (H100, bench/bench_blas.py), pp512 phi3-mini 8,359 -> "
        "24,221 tok/s, qwen2.5 B=64 decode step 4,390 -> 2,767 us; 0 never (also where no libcublas is found)")
    gemm_f16_weights: bool = _switch(
        False, "ORCD_GEMM_F16_WEIGHTS", "each dense weight the cuBLAS path may take is also kept decoded to f16 "
        "at load (2 bytes a weight more VRAM), so its matmuls read that instead of decoding the weight on every "
        "call (a decode step of 64+ sequences decodes every weight again); not yet measured")
    gemm_pipe: int = _switch(
        64, "ORCD_GEMM_PIPE", "GEMM tiles up to this BM take the unrolled k-step (0: rolled everywhere; only the "
        "grouped MoE GEMM has BM 128 tiles; pp512 phi3-mini 6,301 at 64 against 5,308 at 128)",
        choices=(0, 16, 32, 64, 128), compile_time=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata["choices"] and v not in f.metadata["choices"]:
                raise ValueError(f"{f.metadata['env']} ({f.name}) must be one of {f.metadata['choices']}, not {v!r}")
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{f.metadata['env']} ({f.name}) must be a whole number >= 0, not {v!r}")
        if self.gemm_i8_ctas < 1:
            raise ValueError(f"ORCD_GEMM_I8_CTAS (gemm_i8_ctas) must be at least 1, not {self.gemm_i8_ctas}")
        if self.attn_splits_deep > 256:
            raise ValueError(f"ORCD_ATTN_SPLITS_DEEP (attn_splits_deep) must be 0..256, not {self.attn_splits_deep}")
        if not 1 <= self.attn_splits <= 256:
            raise ValueError(f"ORCD_ATTN_SPLITS (attn_splits) must be 1..256 (merge_split_row's MAX_SPLITS), "
                             f"not {self.attn_splits}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Tuning":
        """The defaults, with every switch set in `environ` (os.environ) applied; a malformed value
        raises ValueError naming its variable rather than quietly meaning the default."""
        env = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"], "").strip()
            if raw:
                values[f.name] = _parse(f, raw)
        return cls(**values)

    def switches(self) -> dict[str, str]:
        """Each field's variable and value, as an A/B line or a log record spells them."""
        return {f.metadata["env"]: _spell(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _parse(f: dataclasses.Field, raw: str):
    name = f.metadata["env"]
    if f.type == "bool":
        low = raw.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(f"{name}={raw!r}: expected 1 or 0")
    if f.type == "int":
        try:
            v = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected a whole number") from None
        if name == "ORCD_ATTN_SPLITS":  # 0 (as before the registry): the default cap; above 256, the kernel's
            v = min(v, 256) if v > 0 else 32
        return v
    return raw


def _spell(v) -> str:
    return ("1" if v else "0") if isinstance(v, bool) else str(v)


DEFAULT = Tuning()


def table() -> str:
    """Markdown rows: variable, default, what it does (the README's switch table)."""
    rows = ["| variable | default | level | what |", "|---|---|---|---|"]
    for f in dataclasses.fields(Tuning):
        m = f.metadata
        level = m["level"] + (", compile-time" if m["compile_time"] else "")
        rows.append(f"| `{m['env']}` | `{_spell(f.default)}` | {level} | {m['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
