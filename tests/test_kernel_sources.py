"""Properties of the CUDA sources that a GPU test would only catch as a rare race."""
from __future__ import annotations

import pathlib
import re

CUDA = pathlib.Path(__file__).resolve().parents[1] / "cuda"


def test_every_kernel_waits_for_its_predecessor_first():
    """A captured decode graph's edges into our kernels are programmatic (cuda_graph.make_programmatic):
    a kernel may be scheduled while the one before it runs, so the first thing each one does is
    pdl_enter() (cuda/common.cuh), before touching global memory."""
    kernels = 0
    for path in sorted(CUDA.glob("*.cu")):
        text = path.read_text()
        for m in re.finditer(r"__global__", text):
            body = text.index("{", m.end())
            first = text[body + 1:].lstrip(" \\\n")
            assert first.startswith("pdl_enter();"), (path.name, text[m.start():body + 40])
            kernels += 1
    assert kernels > 40
    common = (CUDA / "common.cuh").read_text()
    assert "griddepcontrol.wait" in common and "griddepcontrol.launch_dependents" in common
    assert common.index("griddepcontrol.wait") < common.index("griddepcontrol.launch_dependents")
