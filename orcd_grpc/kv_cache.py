"""Paged KV-cache bookkeeping: fixed-size blocks, a block table per sequence, and a prefix cache.

The backend owns the cache memory; this owns which blocks hold what. A full block of prompt
tokens is identified by a hash chained over every token before it, so two prompts that share a
prefix (a system prompt, a chat history) share those blocks, read-only: a sequence only writes at
positions past its cached prefix. A block whose last user leaves stays cached (evictable, least
recently used first) until its space is needed; nothing is ever lost or leaked by a sequence that
ends, is cancelled or fails, because `release` is the only way out and it is idempotent.
"""
from __future__ import annotations

from collections import OrderedDict

from .errors import ResourceExhausted


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._free = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}          # block -> its prefix hash
        self._block_of: dict[int, int] = {}         # prefix hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, LRU first
        self.hit_tokens = 0                         # prompt tokens served from the cache, total

    # ---- capacity ------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_fit(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(block_table) <= self.free_blocks

    # ---- allocation ----------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._ref[block] = 1
        return block

    def take(self) -> int:
        """One block for a caller that fills it itself (a copy-on-write copy)."""
        if not self.free_blocks:
            raise ResourceExhausted("KV cache full: no free block", field="kv_cache")
        return self._take()

    def share(self, block_table: list[int], n_blocks: int) -> list[int]:
        """A new table of block_table's first n_blocks, each one reference more: parallel samples
        read their prompt's blocks together, and `release` of each table gives back its own."""
        shared = block_table[:n_blocks]
        for block in shared:
            self._ref[block] += 1
        return shared

    def ensure(self, block_table: list[int], num_tokens: int) -> None:
        """Grows block_table in place so it holds num_tokens tokens."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:  # the common case in decode: called for every sequence every step
            return
        if need > self.free_blocks:
            raise ResourceExhausted(f"KV cache full: need {need} more blocks, {self.free_blocks} free",
                                    field="kv_cache")
        for _ in range(need):
            block_table.append(self._take())

    def release(self, block_table: list[int]) -> None:
        for block in reversed(block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    # ---- prefix cache --------------------------------------------------------------------
    def _hashes(self, tokens: list[int], n_blocks: int):
        h, bs = 0, self.block_size
        for i in range(n_blocks):
            h = hash((h, tuple(tokens[i * bs:(i + 1) * bs])))
            yield h

    def match_prefix(self, prompt: list[int], block_table: list[int]) -> int:
        """Fills an empty block_table with cached blocks of prompt's longest cached prefix and
        returns the number of tokens they hold. The last prompt token is never served from the
        cache: its logits are needed."""
        if not self.prefix_cache or block_table:
            return 0
        for h in self._hashes(prompt, (len(prompt) - 1) // self.block_size):
            block = self._block_of.get(h)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            block_table.append(block)
        n = len(block_table) * self.block_size
        self.hit_tokens += n
        return n

    def register_prefix(self, prompt: list[int], block_table: list[int], num_computed: int) -> None:
        """Publishes the sequence's full, computed prompt blocks for reuse by later prompts."""
        if not self.prefix_cache:
            return
        n_full = min(len(prompt), num_computed) // self.block_size
        for i, h in enumerate(self._hashes(prompt, n_full)):
            block = block_table[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h
