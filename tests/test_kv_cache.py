"""Block allocator and prefix cache: accounting that could leak or double-share blocks."""
import random

import pytest

from orcd_grpc.errors import ResourceExhausted
from orcd_grpc.kv_cache import BlockAllocator


def test_ensure_and_release_return_every_block():
    a = BlockAllocator(10, 4)
    t1, t2 = [], []
    a.ensure(t1, 9)   # 3 blocks
    a.ensure(t2, 4)   # 1 block
    assert len(t1) == 3 and len(t2) == 1 and a.free_blocks == 6
    assert not set(t1) & set(t2)
    a.release(t1)
    a.release(t2)
    assert a.free_blocks == 10 and t1 == [] and t2 == []


def test_exhaustion_is_resource_exhausted_and_allocates_nothing():
    a = BlockAllocator(2, 4)
    t = []
    with pytest.raises(ResourceExhausted) as e:
        a.ensure(t, 12)
    assert e.value.field == "kv_cache" and t == [] and a.free_blocks == 2


def test_prefix_shared_read_only_and_evicted_last():
    a = BlockAllocator(8, 4)
    prompt = list(range(100, 111))      # 11 tokens: 2 full blocks usable from the cache
    t1 = []
    assert a.match_prefix(prompt, t1) == 0
    a.ensure(t1, len(prompt))
    a.register_prefix(prompt, t1, len(prompt))
    t2 = []
    assert a.match_prefix(prompt + [7, 8], t2) == 8
    assert t2 == t1[:2]
    # A different prompt shares only its common full blocks.
    t3 = []
    assert a.match_prefix(prompt[:4] + [1, 2, 3, 4, 5], t3) == 4
    for t in (t1, t2, t3):
        a.release(t)
    assert a.free_blocks == 8
    # Cached blocks survive release and are found again ...
    t4 = []
    assert a.match_prefix(prompt, t4) == 8
    a.release(t4)
    # ... until their space is needed.
    big = []
    a.ensure(big, 32)
    assert a.free_blocks == 0
    a.release(big)
    t5 = []
    assert a.match_prefix(prompt, t5) == 0


def test_random_workload_never_leaks_or_double_allocates():
    rng = random.Random(1234)
    a = BlockAllocator(64, 4)
    live = []
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(8)]
    for _ in range(2000):
        if live and rng.random() < 0.45:
            a.release(live.pop(rng.randrange(len(live))))
            continue
        p = rng.choice(prompts) + [rng.randrange(50) for _ in range(rng.randrange(0, 5))]
        t = []
        a.match_prefix(p, t)
        if not a.can_fit(t, len(p) + 1):
            a.release(t)
            continue
        a.ensure(t, len(p) + 1)
        a.register_prefix(p, t, len(p))
        live.append(t)
        owned = [b for tab in live for b in tab]
        # A block is shared only through the cache: never by two tables at different positions.
        pos = {}
        for tab in live:
            for i, b in enumerate(tab):
                assert pos.setdefault(b, i) == i
        assert len(set(owned)) + a.free_blocks <= 64
    for t in live:
        a.release(t)
    assert a.free_blocks == 64


def test_shared_blocks_counts_each_block_in_several_tables_once():
    from orcd_grpc.kv_cache import BlockAllocator

    a = BlockAllocator(16, 4)
    parent: list[int] = []
    a.ensure(parent, 10)  # 3 blocks
    kids = [a.share(parent, 2) for _ in range(3)]
    assert a.shared_blocks == 2 and a.used_blocks == 3
    for k in kids[:2]:
        a.release(k)
    assert a.shared_blocks == 2  # parent and the last child still hold both
    a.release(kids[2])
    assert a.shared_blocks == 0
    a.release(parent)
    assert a.shared_blocks == 0 and a.used_blocks == 0
