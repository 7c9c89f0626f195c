"""Generates the gRPC stubs from protos/ when the package is built."""
import pathlib
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStubs(build_py):
    def run(self):
        here = pathlib.Path(__file__).resolve().parent
        sys.path.insert(0, str(here))
        import importlib.util

        spec = importlib.util.spec_from_file_location("_orcd_proto_gen", here / "orcd_grpc" / "proto.py")
        # proto.py generates on import; load it as a plain module so the package itself (and its
        # heavy dependencies) need not import during the build.
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except ModuleNotFoundError:
            pass  # the relative import of the freshly made stubs fails outside the package; they exist
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
