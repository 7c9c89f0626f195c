"""The registry of performance switches: one typed record, read from the environment once."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

import pytest

from orcd_grpc import tuning
from orcd_grpc.tuning import DEFAULT, Tuning

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_defaults_are_the_measured_choices():
    t = Tuning.from_env({})
    assert t == DEFAULT == Tuning()
    assert (t.cuda_graphs, t.lookahead, t.fuse_weights, t.fuse_qk, t.fuse_widen) == (True,) * 5
    assert (t.attn_splits, t.attn_dec_max_group, t.attn_dec_min_heads, t.norm_block_rows) == (32, 1, 128, 256)
    assert (t.gemv_ksplit, t.gemv_int8_min, t.gemm_min_ksteps, t.gemm_pipe) == ("auto", 4 << 20, 4, 64)
    assert not t.cuda_sync and t.workspace_mb == 0


def test_every_field_names_its_variable_and_says_why():
    envs = [f.metadata["env"] for f in dataclasses.fields(Tuning)]
    assert len(set(envs)) == len(envs) and all(e.startswith("ORCD_") for e in envs)
    assert all(len(f.metadata["doc"]) > 20 for f in dataclasses.fields(Tuning))


def test_from_env_reads_each_switch():
    t = Tuning.from_env({"ORCD_LOOKAHEAD": "0", "ORCD_FUSE_Q8": "off", "ORCD_GEMV_KSPLIT": "1",
                         "ORCD_GEMV_INT8_MIN": "0", "ORCD_GEMM_PIPE": "128", "ORCD_CUDA_SYNC": "1",
                         "ORCD_ATTN_SPLITS": "4", "ORCD_UNRELATED": "x"})
    assert (t.lookahead, t.fuse_q8, t.gemv_ksplit, t.gemv_int8_min, t.gemm_pipe, t.cuda_sync, t.attn_splits) == (
        False, False, "1", 0, 128, True, 4)
    assert t.switches()["ORCD_GEMM_PIPE"] == "128" and t.switches()["ORCD_LOOKAHEAD"] == "0"
    # ORCD_ATTN_SPLITS: 0 (unset before the registry) means the default; anything above the kernel's 256, 256
    assert Tuning.from_env({"ORCD_ATTN_SPLITS": "0"}).attn_splits == 32
    assert Tuning.from_env({"ORCD_ATTN_SPLITS": "1000"}).attn_splits == 256


@pytest.mark.parametrize("env", [{"ORCD_FUSE_Q8": "maybe"}, {"ORCD_GEMM_PIPE": "48"}, {"ORCD_GEMV_KSPLIT": "2"},
                                 {"ORCD_NORM_BLOCK_ROWS": "many"}, {"ORCD_GEMV_INT8_MIN": "-1"}])
def test_malformed_values_name_their_variable(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        Tuning.from_env(env)


def test_deleted_switches_are_gone():
    envs = {f.metadata["env"] for f in dataclasses.fields(Tuning)}
    for gone in ("ORCD_FUSE_GLU", "ORCD_FUSE_NORM", "ORCD_MOE_GEMV", "ORCD_GEMM_MAX_BM", "ORCD_ATTN_DECODE",
                 "ORCD_ATTN_BATCH_LOADS", "ORCD_MXFP4_BLOCK", "ORCD_GEMV_I8_BLOCK", "ORCD_ATTN_DEC_WIDE"):
        assert gone not in envs


def test_compile_time_switches_reach_the_kernel_options():
    from orcd_grpc.backends import cuda_runtime as rt

    assert rt.module_options("quant_matmul") == ("-DORCD_GEMM_PIPE=64",)
    assert rt.module_options("quant_matmul", Tuning(gemm_pipe=0)) == ("-DORCD_GEMM_PIPE=0",)
    assert rt.module_options("attention", Tuning(gemm_pipe=0)) == ()
    assert rt.module_options("attention_decode") == ("-DORCD_ATTN_Q8_DP4A=0", "-DORCD_FUSE_ATTN_Q8=1")
    assert rt.module_options("attention_decode", Tuning(attn_q8_dp4a=True, fuse_attn_q8=False)) == (
        "-DORCD_ATTN_Q8_DP4A=1", "-DORCD_FUSE_ATTN_Q8=0")
    assert rt.module_options("attention_mma", Tuning(fuse_attn_q8=False)) == ("-DORCD_FUSE_ATTN_Q8=0",)
    assert rt.module_options("mma_i8") == ("-DORCD_GEMM_I8_UNROLL=1",)
    assert rt.module_options("mma_i8", Tuning(gemm_i8_unroll=False)) == ("-DORCD_GEMM_I8_UNROLL=0",)
    compile_time = {f.name for f in dataclasses.fields(Tuning) if f.metadata["compile_time"]}
    assert compile_time == {"gemm_pipe", "attn_q8_dp4a", "fuse_attn_q8", "gemm_i8_unroll"}  # module_options spells out every one


def test_no_backend_module_reads_a_switch_from_the_environment():
    """The registry is the one place switches are read (cuda_runtime and cuda_blas still read where
    files live: the kernel sources and cache, the cuBLAS library)."""
    for path in sorted((REPO / "orcd_grpc" / "backends").glob("cuda*.py")):
        text = path.read_text()
        for f in dataclasses.fields(Tuning):
            assert f'"{f.metadata["env"]}"' not in text, (path.name, f.metadata["env"])
        assert "os.environ" not in text or path.name in ("cuda_runtime.py", "cuda_blas.py"), path.name


def test_readme_lists_every_switch():
    readme = (REPO / "README.md").read_text()
    for f in dataclasses.fields(Tuning):
        assert f"`{f.metadata['env']}`" in readme, f.metadata["env"]
    assert tuning.table().count("\n| `ORCD_") == len(dataclasses.fields(Tuning))


def test_cpu_spin_sets_libgomp_spin_count_unless_given(monkeypatch):
    from orcd_grpc.backends import cpu_backend

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("ORCD_CPU_SPIN", "1234")
    cpu_backend.CpuBackend(tuning=Tuning.from_env())
    assert os.environ["GOMP_SPINCOUNT"] == "1234"
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")  # an operator's own setting wins
    cpu_backend.CpuBackend(tuning=Tuning(cpu_spin=50))
    assert os.environ["GOMP_SPINCOUNT"] == "7"


def test_gil_switch_us_sets_the_worker_process_interval(monkeypatch):
    from orcd_grpc import server

    before = sys.getswitchinterval()
    try:
        server.apply_switch_interval(Tuning.from_env({"ORCD_GIL_SWITCH_US": "250"}))
        assert sys.getswitchinterval() == pytest.approx(250e-6, rel=1e-3)
        server.apply_switch_interval(Tuning.from_env({}))  # 0: left as it is
        assert sys.getswitchinterval() == pytest.approx(250e-6, rel=1e-3)
        with pytest.raises(ValueError, match="ORCD_GIL_SWITCH_US"):
            Tuning.from_env({"ORCD_GIL_SWITCH_US": "fast"})
    finally:
        sys.setswitchinterval(before)
