"""How many key slices a decode attention launch splits into (CPU: a pure function of the batch
and of the device's SM count, which the backend reads from the device)."""
from __future__ import annotations

from orcd_grpc.backends.cuda_attention import _ATTN_MAX_SPLITS, _key_splits, dec_target_ctas, tiled_target_ctas
from orcd_grpc.backends.cuda_context import DeviceLimits

H100 = DeviceLimits(sms=132, l2_bytes=50 << 20)


def test_key_splits_fill_the_gpu_within_the_cap():
    assert _ATTN_MAX_SPLITS == 256  # merge_split_row's MAX_SPLITS
    assert tiled_target_ctas(H100) == 264 and dec_target_ctas(H100) == 528
    assert _key_splits(264, 2) == 132  # qwen2.5 at B=1: 2 kv heads
    assert _key_splits(528, 1) == 256  # gemma3 at B=1 (one kv head): the cap
    assert _key_splits(264, 64) == 5
    assert _key_splits(264, 512) == 1  # the batch fills the GPU alone
    # Tuning.attn_splits caps it (1: no split)
    assert _key_splits(264, 2, 4) == 4 and _key_splits(264, 128, 4) == 3 and _key_splits(264, 2, 1) == 1
    assert _key_splits(264, 2, 1000) == 132 and _key_splits(528, 1, 1000) == 256


def test_targets_follow_the_device():
    small = DeviceLimits(sms=20, l2_bytes=4 << 20)
    assert tiled_target_ctas(small) == 40 and dec_target_ctas(small) == 80
    assert _key_splits(tiled_target_ctas(small), 64) == 1  # 64 (sequence, kv head) pairs fill 20 SMs
    assert _key_splits(dec_target_ctas(small), 2) == 40
