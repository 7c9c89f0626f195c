"""The kernel cache: cubins compiled with nvcc (no GPU needed), keyed by source, headers,
options, architecture and nvcc version."""
from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def test_precompile_fills_the_cache_once_per_key(tmp_path, monkeypatch):
    from orcd_grpc.backends import cuda_runtime as rt

    monkeypatch.setenv("ORCD_KERNEL_CACHE", str(tmp_path))
    (first,) = rt.precompile("sm_90", names=("rope",))
    assert first.exists() and first.stat().st_size > 1000 and first.parent == tmp_path
    assert first.read_bytes()[:4] == b"\x7fELF"  # a cubin is an ELF image
    stamp = first.stat().st_mtime_ns
    (again,) = rt.precompile("sm_90", names=("rope",))
    assert again == first and again.stat().st_mtime_ns == stamp  # a hit: not rebuilt
    other = rt.cubin_path("rope", "sm_90", ("-DSOMETHING=1",))
    assert other != first and rt.cubin_path("rope", "sm_80") != first
    assert not any(p.name.startswith("tmp") for p in tmp_path.iterdir())  # no half-written files left


def test_nvcc_errors_name_the_module(tmp_path, monkeypatch):
    from orcd_grpc.backends import cuda_runtime as rt
    from orcd_grpc.errors import Internal

    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cu").write_text('extern "C" __global__ void k() { this is not C++ }\n')
    monkeypatch.setattr(rt, "CUDA_DIR", src)
    monkeypatch.setenv("ORCD_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Internal, match="broken.cu"):
        rt.compile_cubin("broken", "sm_90")
    assert not os.path.exists(tmp_path / "cache") or not any((tmp_path / "cache").glob("*.cubin"))
