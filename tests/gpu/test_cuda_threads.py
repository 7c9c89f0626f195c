"""The CUDA backend used from threads that end (model loading, the scheduler, gRPC handlers):
PyCUDA aborts a process whose thread ends with a context on its stack, so this runs in a child
process and checks it finishes normally."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from .test_cuda_models import write_tiny_llama

pytestmark = pytest.mark.gpu


def test_threads_that_end_leave_the_process_alive(tmp_path, repo_root):
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    code = textwrap.dedent(f"""
        import threading
        from orcd_grpc.loader import load_engine
        from orcd_grpc.sampling import SamplingParams
        box = {{}}
        t = threading.Thread(target=lambda: box.setdefault("e", load_engine({str(path)!r}, backend="cuda",
                                                                             max_sequences=2, max_context=256)))
        t.start(); t.join()
        eng = box["e"]
        def gen():
            s = eng.new_sequence([1, 5, 6], SamplingParams(temperature=0.0))
            for _ in range(5):
                eng.step([s])
            eng.release(s)
        for _ in range(3):
            w = threading.Thread(target=gen); w.start(); w.join()
        gen()
        print("gpu-info", eng.gpu_info()["name"])
        eng.close()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok"), r.stdout
