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
import json
import pathlib
import shutil
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
        from orcd_grpc import buildinfo  # stdlib only; HERE is on sys.path (above)

        (pkg / "_build_info.json").write_text(json.dumps(buildinfo.build_stamp(), indent=2) + "\n")

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
