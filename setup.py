"""Build steps pyproject.toml cannot express.

At package build (`pip install .`, `python -m build`, and editable installs):
  - the gRPC stubs are generated from protos/ into orcd_grpc/_gen (shipped as package data);
  - the CUDA kernel sources, which live at the repository root in cuda/ (*.cu, *.cuh), are copied
    into the built package as orcd_grpc/cuda/, where backends/cuda_runtime.py finds them in an
    installed wheel (in a checkout it reads the repository's cuda/ directly);
  - orcd_grpc/_build_info.json (git commit and build date, read by orcd_grpc/buildinfo.py) is
    written into the built package, since an installed wheel has no .git to ask. The file is
    never written into the source tree by the build and is ignored by git.
"""
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
KERNEL_PATTERNS = ("*.cu", "*.cuh")


def _kernel_sources() -> list[pathlib.Path]:
    src = HERE / "cuda"
    files = sorted(p for pat in KERNEL_PATTERNS for p in src.glob(pat))
    if not any(p.suffix == ".cu" for p in files):
        raise RuntimeError(f"no CUDA kernel sources (*.cu) in {src}: the package would ship without its kernels")
    return files


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _build_info() -> dict:
    """Same precedence as orcd_grpc/buildinfo.py: environment, a _build_info.json already in the
    source (e.g. from `python -m orcd_grpc.buildinfo --write`), then git; the date falls back to
    now."""
    stored = {}
    try:
        stored = json.loads((HERE / "orcd_grpc" / "_build_info.json").read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(stored, dict):
        stored = {}
    commit = os.environ.get("ORCD_GIT_COMMIT") or str(stored.get("git_commit") or "")
    if not commit and (HERE / ".git").exists():
        commit = _git("rev-parse", "HEAD")
    date = os.environ.get("ORCD_BUILD_DATE") or str(stored.get("build_date") or "")
    if not date:
        date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    version = ""
    for line in (HERE / "orcd_grpc" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            version = line.split("=", 1)[1].strip().strip("\"'")
    return {"version": version, "git_commit": commit, "build_date": date}


class BuildWithStubs(build_py):
    def run(self):
        sys.path.insert(0, str(HERE))
        import importlib.util

        spec = importlib.util.spec_from_file_location("_orcd_proto_gen", HERE / "orcd_grpc" / "proto.py")
        # proto.py generates on import; load it as a plain module so the package itself (and its
        # heavy dependencies) need not import during the build.
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except ModuleNotFoundError:
            pass  # the relative import of the freshly made stubs fails outside the package; they exist
        super().run()
        # An editable install runs the package from the source tree, where cuda_runtime reads
        # ../cuda and buildinfo asks git; only a real build gets the copies.
        if getattr(self, "editable_mode", False):
            return
        pkg = pathlib.Path(self.build_lib) / "orcd_grpc"
        kernels = pkg / "cuda"
        kernels.mkdir(parents=True, exist_ok=True)
        for src in _kernel_sources():
            shutil.copy2(src, kernels / src.name)
        (pkg / "_build_info.json").write_text(json.dumps(_build_info(), indent=2) + "\n")

    def get_outputs(self, include_bytecode=True):
        # Lists the copied files as outputs too (bdist_wheel packs the whole build dir anyway;
        # this keeps `install --record` and friends complete).
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            pkg = pathlib.Path(self.build_lib) / "orcd_grpc"
            outputs += [str(pkg / "cuda" / p.name) for p in _kernel_sources()]
            outputs.append(str(pkg / "_build_info.json"))
        return outputs


setup(cmdclass={"build_py": BuildWithStubs})
