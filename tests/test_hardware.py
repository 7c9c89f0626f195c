"""HardwareInfo on this machine (CPU backend) and with a GPU description from the CUDA backend."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import orcd_grpc
from orcd_grpc import buildinfo, hardware


def test_cpu_only_info():
    info = hardware.hardware_info("cpu")
    assert info.backend == "cpu"
    assert not info.HasField("gpu")
    assert info.cpu.cores == len(os.sched_getaffinity(0)) > 0
    assert info.cpu.model
    assert info.ram_total_bytes > 0
    assert 0 < info.ram_available_bytes <= info.ram_total_bytes
    major, minor, micro = sys.version_info[:3]
    assert info.python_version == f"{major}.{minor}.{micro}"
    assert info.os.startswith(platform.system())
    assert info.build.version == orcd_grpc.__version__
    import grpc
    import numpy

    assert info.library_versions["grpcio"] == grpc.__version__
    assert info.library_versions["numpy"] == numpy.__version__
    assert {"protobuf", "gguf", "tokenizers"} <= set(info.library_versions)


def test_gpu_dict_fills_gpu_info():
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "vram_total": 80 << 30,
           "vram_free": 79 << 30, "driver_version": "580.1", "cuda_version": "13.0",
           "multiprocessors": 132}
    info = hardware.hardware_info("cuda", gpu, vram_used_by_worker=3 << 30, vram_limit=24 << 30)
    g = info.gpu
    assert (g.name, g.compute_capability, g.multiprocessors) == ("NVIDIA H100 80GB HBM3", "9.0", 132)
    assert (g.vram_total_bytes, g.vram_free_bytes) == (80 << 30, 79 << 30)
    assert (g.vram_used_by_worker_bytes, g.vram_limit_bytes) == (3 << 30, 24 << 30)
    assert (g.driver_version, g.cuda_version) == ("580.1", "13.0")
    text = hardware.format_hardware_info(info)
    assert "NVIDIA H100" in text and "limit 24.0 GiB" in text


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="backend_name"):
        hardware.hardware_info("rocm")
    with pytest.raises(ValueError, match="vram_total_bytes"):
        hardware.hardware_info("cuda", {"vram_total_bytes": 1})


def test_meminfo_parsing(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16384 kB\nMemFree:  1024 kB\nMemAvailable:   8192 kB\nHugePages_Total: 0\n")
    assert hardware.memory(str(f)) == (16384 * 1024, 8192 * 1024)
    assert hardware.memory(str(tmp_path / "missing")) == (0, 0)


def test_cpuinfo_parsing(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9454 48-Core Processor\n")
    assert hardware.cpu_model(str(f)) == "AMD EPYC 9454 48-Core Processor"


def _build_info_in_subprocess(env: dict) -> dict:
    code = ("import dataclasses, json; from orcd_grpc import buildinfo; "
            "print(json.dumps(dataclasses.asdict(buildinfo.build_info())))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_build_info_from_env():
    got = _build_info_in_subprocess({"ORCD_GIT_COMMIT": "abc123", "ORCD_BUILD_DATE": "2025-01-02T03:04:05Z"})
    assert got == {"version": orcd_grpc.__version__, "git_commit": "abc123",
                   "build_date": "2025-01-02T03:04:05Z"}


def test_build_info_from_checkout(repo_root):
    if not (repo_root / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    env = {k: "" for k in ("ORCD_GIT_COMMIT", "ORCD_BUILD_DATE")}
    if buildinfo.BUILD_INFO_FILE.exists():
        pytest.skip("a _build_info.json takes precedence over git here")
    got = _build_info_in_subprocess(env)
    assert got["git_commit"] == head
    assert got["build_date"][:4].isdigit()


def test_write_build_info(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCD_GIT_COMMIT", "feedface")
    monkeypatch.setenv("ORCD_BUILD_DATE", "2025-06-01T00:00:00+00:00")
    target = tmp_path / "_build_info.json"
    buildinfo.write_build_info(target)
    assert json.loads(target.read_text()) == {"version": orcd_grpc.__version__, "git_commit": "feedface",
                                               "build_date": "2025-06-01T00:00:00+00:00"}
    buildinfo.build_info.cache_clear()
