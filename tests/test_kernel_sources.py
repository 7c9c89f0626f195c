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
            # the dense GEMVs wait inside gemv_impl, after issuing their first weight copies (below)
            assert first.startswith(("pdl_enter();", "gemv_impl<")), (path.name, text[m.start():body + 40])
            kernels += 1
    assert kernels > 40
    common = (CUDA / "common.cuh").read_text()
    assert "griddepcontrol.wait" in common and "griddepcontrol.launch_dependents" in common
    assert common.index("griddepcontrol.wait") < common.index("griddepcontrol.launch_dependents")


def test_gemv_waits_before_it_reads_what_the_kernel_before_wrote():
    """gemv_impl may issue weight copies before pdl_enter, never a read of x, the expert ids or y:
    the MoE GEMV waits before anything else, except the gate/up pair (PAIR), which reads its expert
    id before the wait (from L2) because its launch always follows its input's rounding, so the
    router that wrote the ids has finished (tests/test_cuda_quant_launch.py checks that order)."""
    text = (CUDA / "quant_matmul.cu").read_text()
    impl = text[text.index("__device__ __forceinline__ void gemv_impl"):]
    impl = impl[:impl.index("\n}\n")]
    first, late = impl.index("if (wait_first) pdl_enter();"), impl.index("if (!wait_first) pdl_enter();")
    assert "wait_first = expert_ids != nullptr && !PAIR;" in impl[:first]
    before = impl[:late]
    assert "expert_ids[" not in impl[:first] and "__ldg" not in before and "*yp" not in before
    assert before.count("expert_ids + ") == 1 and "PAIR ? __ldcg(expert_ids + slot)" in before
    assert "for (int c = kw; c < nch; c += KS)" in impl[late:]  # every x / xd / y access is in or after the loop
