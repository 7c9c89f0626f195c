"""bench/trace_decode.py's per-kernel attribution under programmatic dependent launch (no GPU)."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

from trace_decode import own_times  # noqa: E402


def test_a_kernel_that_started_early_is_charged_from_its_predecessors_end():
    # A runs 0-100; B starts at 10 (PDL) and ends at 130: its own time is 30, not 120.
    # C starts after a 20 µs gap (idle) and runs 150-160; D lies inside C (fully overlapped): 0.
    events = [{"ts": 0.0, "dur": 100.0}, {"ts": 10.0, "dur": 120.0}, {"ts": 150.0, "dur": 10.0},
              {"ts": 152.0, "dur": 5.0}]
    own, idle = own_times(events)
    assert own == [100.0, 30.0, 10.0, 0.0]
    assert idle == 20.0
    span = 160.0
    assert sum(own) + idle == span


def test_serial_kernels_keep_their_durations():
    events = [{"ts": 5.0 * i + 1.0 * i, "dur": 5.0} for i in range(4)]  # 1 µs gaps
    own, idle = own_times(events)
    assert own == [5.0] * 4 and idle == 3.0
