"""bench/llama_server_log.py on a hand-written llama-server log: tasks grouped into serve_bench's
levels in launch order (after the warm-up), server-side tok/s, per-slot ms per token, busy slots."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import llama_server_log as lsl  # noqa: E402


def _task(tid, start_s, end_s, out, ms):
    def ts(t):
        return f"0.{int(t):02d}.{int(t * 1000) % 1000:03d}.000"

    return [f"{ts(start_s)} I slot launch_slot_: id  1 | task {tid} | processing task, is_child = 0",
            f"{ts(end_s)} I slot print_timing: id  1 | task {tid} |        eval time =  {ms:.2f} ms / {out} tokens (x)",
            f"{ts(end_s)} I slot print_timing: id  1 | task {tid} | prompt eval time =  1.00 ms / 9 tokens (x)",
            f"{ts(end_s)} I slot      release: id  1 | task {tid} | stop processing: n_tokens = 9, truncated = 0"]


def test_levels_follow_serve_bench_and_the_warmup(capsys, tmp_path):
    lines = _task(0, 0.0, 1.0, 10, 10.0)                                   # warm-up, not counted
    lines += _task(1, 2.0, 3.0, 100, 50.0) + _task(2, 3.0, 4.0, 100, 50.0)  # 1 client: one at a time
    lines += _task(3, 5.0, 7.0, 100, 200.0) + _task(4, 5.0, 7.0, 300, 300.0)  # 2 clients: together
    order = lsl.tasks(lines)
    assert len(order) == 5 and order[0]["out"] == 10
    one, two = lsl.level_row(1, order[1:3]), lsl.level_row(2, order[3:5])
    assert (one["done"], one["output_tok_s"], one["ms_per_token_p50"], one["mean_busy_slots"]) == (2, 100.0, 0.5, 1.0)
    assert (two["done"], two["output_tok_s"], two["ms_per_token_p50"], two["mean_busy_slots"]) == (2, 200.0, 1.5, 2.0)
    path = tmp_path / "server.log"
    path.write_text("\n".join(lines))
    assert lsl.main([str(path), "--clients", "1,2", "--min-requests", "2", "--requests-per-client", "1",
                     "--warmup", "1"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 1 ") or r.startswith("| 2 ")]
    assert rows == ["| 1 | 2 / 2 | 100.0 | 0.5 | 1.0 |", "| 2 | 2 / 2 | 200.0 | 1.5 | 2.0 |"]


def test_a_log_of_one_server_per_level_is_split_at_each_start(capsys, tmp_path):
    """gpu_check restarts llama-server per level into one log: task ids and clocks restart, and
    every level has its own warm-up request."""
    start = ["0.00.400.000 I srv  llama_server: listening on http://127.0.0.1:50062"]
    first = start + _task(0, 0.0, 1.0, 10, 10.0) + _task(1, 2.0, 3.0, 100, 50.0) + _task(2, 3.0, 4.0, 100, 50.0)
    second = start + _task(0, 0.0, 1.0, 10, 10.0) + _task(1, 5.0, 7.0, 100, 200.0) + _task(2, 5.0, 7.0, 300, 300.0)
    assert [len(lsl.tasks(r)) for r in lsl.runs(first + second)] == [3, 3]
    assert len(lsl.runs(first)) == 1
    path = tmp_path / "server.log"
    path.write_text("\n".join(first + second))
    assert lsl.main([str(path), "--clients", "1,2", "--min-requests", "2", "--requests-per-client", "1",
                     "--warmup", "1"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 1 ") or r.startswith("| 2 ")]
    assert rows == ["| 1 | 2 / 2 | 100.0 | 0.5 | 1.0 |", "| 2 | 2 / 2 | 200.0 | 1.5 | 2.0 |"]
