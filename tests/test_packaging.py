"""Packaging: a built wheel carries the CUDA kernel sources, the gRPC stubs and the build info,
and the kernel loader finds the kernels both in a checkout and in the installed package.

The wheel is built from a copy of the sources the package build reads (as an sdist has them, no
.git), with pip and no build isolation, so the test needs no network.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNELS = sorted(p for pat in ("*.cu", "*.cuh") for p in (REPO / "cuda").glob(pat))


def test_checkout_loader_reads_the_repository_kernels(monkeypatch):
    from orcd_grpc.backends import cuda_runtime

    monkeypatch.delenv("ORCD_CUDA_DIR", raising=False)
    assert cuda_runtime.kernel_dir() == REPO / "cuda"
    assert any(p.suffix == ".cu" for p in KERNELS)
    monkeypatch.setenv("ORCD_CUDA_DIR", "/somewhere/else")
    assert cuda_runtime.kernel_dir() == pathlib.Path("/somewhere/else")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_gen", "_build_info.json", "cuda")
    shutil.copytree(REPO / "orcd_grpc", src / "orcd_grpc", ignore=ignore)
    shutil.copytree(REPO / "protos", src / "protos")
    shutil.copytree(REPO / "cuda", src / "cuda")
    dist = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCD_")}
    env.update(ORCD_GIT_COMMIT="0123456789abcdef0123456789abcdef01234567", ORCD_BUILD_DATE="2026-01-02T03:04:05+00:00")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-w", str(dist), str(src)],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(dist.glob("orcd-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_kernels_stubs_and_build_info(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for k in KERNELS:
            member = f"orcd_grpc/cuda/{k.name}"
            assert member in names, f"{member} missing from {wheel.name}"
            assert zf.read(member) == k.read_bytes()
        assert not any(n.startswith("cuda/") for n in names), "kernels belong inside the package"
        assert {"orcd_grpc/_gen/worker_pb2.py", "orcd_grpc/_gen/worker_pb2_grpc.py"} <= names
        assert {"orcd_grpc/loader.py", "orcd_grpc/weight_packing.py"} <= names
        # the HF -> GGUF exporter is for tests and benchmarks (tools/), not the served package
        assert not any(n.endswith("export.py") for n in names), sorted(names)
        info = json.loads(zf.read("orcd_grpc/_build_info.json"))
    assert info == {"version": "0.1.0", "git_commit": "0123456789abcdef0123456789abcdef01234567",
                    "build_date": "2026-01-02T03:04:05+00:00"}


def test_installed_wheel_finds_its_kernels_and_build_info(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCD_")}
    env["PYTHONPATH"] = str(site)
    code = ("import json, orcd_grpc.backends.cuda_runtime as r, orcd_grpc.buildinfo as b; "
            "print(json.dumps({'file': r.__file__, 'dir': str(r.CUDA_DIR), "
            "'cu': sorted(p.name for p in r.CUDA_DIR.iterdir()), 'commit': b.build_info().git_commit}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pathlib.Path(out["file"]).is_relative_to(site), out  # the wheel's copy, not the checkout
    assert pathlib.Path(out["dir"]) == site / "orcd_grpc" / "cuda"
    assert out["cu"] == [k.name for k in KERNELS]
    assert out["commit"] == "0123456789abcdef0123456789abcdef01234567"
