"""How many key slices a decode attention launch splits into (CPU: a pure function of the batch)."""
from __future__ import annotations

from orcd_grpc.backends.cuda import _ATTN_MAX_SPLITS, _key_splits


def test_key_splits_fill_the_gpu_within_the_cap():
    assert _ATTN_MAX_SPLITS == 32  # merge_split_row keeps one slice per lane
    assert _key_splits(264, 2) == 32  # qwen2.5 at B=1: 2 kv heads
    assert _key_splits(264, 64) == 5
    assert _key_splits(264, 512) == 1  # the batch fills the GPU alone
    # ORCD_ATTN_SPLITS=N caps it (1: no split)
    assert _key_splits(264, 2, 4) == 4 and _key_splits(264, 128, 4) == 3 and _key_splits(264, 2, 1) == 1
    assert _key_splits(264, 2, 1000) == 32
