"""Paged KV-cache bookkeeping: fixed-size blocks and a block table per sequence.

The backend owns the cache memory; this owns which blocks are free. Blocks go back to the free
list the moment a sequence is released, so a cancelled or failed request leaks nothing.
"""
from __future__ import annotations

from .errors import ResourceExhausted


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_fit(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(block_table) <= len(self._free)

    def ensure(self, block_table: list[int], num_tokens: int) -> None:
        """Grows block_table in place so it holds num_tokens tokens."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need > len(self._free):
            raise ResourceExhausted(f"KV cache full: need {need} more blocks, {len(self._free)} free",
                                    field="kv_cache")
        for _ in range(need):
            block_table.append(self._free.pop())

    def release(self, block_table: list[int]) -> None:
        self._free.extend(reversed(block_table))
        block_table.clear()
