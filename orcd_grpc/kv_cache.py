"""Paged KV-cache bookkeeping: fixed-size blocks, a block table per sequence, and a prefix cache.

The backend owns the cache memory; this owns which blocks hold what. A full block of prompt
tokens is identified by a hash chained over every token before it, so two prompts that share a
prefix (a system prompt, a chat history) share those blocks, read-only: a sequence only writes at
positions past its cached prefix. A block whose last user leaves stays cached (evictable, least
recently used first) until its space is needed; nothing is ever lost or leaked by a sequence that
ends, is cancelled or fails, because `release` is the only way out and it is idempotent.

The hash is a documented one (block_hashes; the proto's BlocksStored has it), not Python's own,
so a router in any language can compute a prompt's block hashes and mirror the cache from the
events a `listener` receives (events.py): ("stored", parent, hashes) when blocks are published and
("evicted", hashes) when their space is taken.
"""
from __future__ import annotations

import array
import hashlib
import sys
from collections import OrderedDict
from typing import Callable

from .errors import ResourceExhausted


def iter_block_hashes(tokens, block_size: int, n_blocks: int | None = None, parent: int = 0):
    """The chained hashes of the first n_blocks (default: every full block) of `tokens`, lazily
    (a lookup stops at its first miss): each is the little-endian uint64 of
    BLAKE2b-64(previous hash as 8 bytes LE || the block's ids as uint32 LE), the first block's
    previous hash being `parent` (0 at a prompt's start)."""
    if n_blocks is None:
        n_blocks = len(tokens) // block_size
    ids = array.array("I", tokens[:n_blocks * block_size])
    if sys.byteorder != "little":
        ids.byteswap()
    raw, step, h = ids.tobytes(), 4 * block_size, parent
    for i in range(n_blocks):
        h = int.from_bytes(hashlib.blake2b(h.to_bytes(8, "little") + raw[i * step:(i + 1) * step],
                                           digest_size=8).digest(), "little")
        yield h


def block_hashes(tokens, block_size: int, n_blocks: int | None = None, parent: int = 0) -> list[int]:
    """iter_block_hashes as a list: what a router computes to look a prompt up in its mirror."""
    return list(iter_block_hashes(tokens, block_size, n_blocks, parent))


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._free = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks
        self.shared_blocks = 0                      # blocks in more than one table (kept, not counted per step)
        self._hash_of: dict[int, int] = {}          # block -> its prefix hash
        self._block_of: dict[int, int] = {}         # prefix hash -> block
        self._parent: dict[int, int] = {}           # prefix hash -> the hash of the block before it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, LRU first
        self.hit_tokens = 0                         # prompt tokens served from the cache, total
        # Told of cache changes, on the engine thread; must not block (events.EventHub queues).
        self.listener: Callable[..., None] | None = None

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
    def _take(self, evicted: list[int]) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            h = self._hash_of.pop(block)
            del self._block_of[h]
            self._parent.pop(h, None)
            evicted.append(h)
        self._ref[block] = 1
        return block

    def take(self) -> int:
        """One block for a caller that fills it itself (a copy-on-write copy)."""
        if not self.free_blocks:
            raise ResourceExhausted("KV cache full: no free block", field="kv_cache")
        evicted: list[int] = []
        block = self._take(evicted)
        if evicted and self.listener is not None:
            self.listener("evicted", evicted)
        return block

    def share(self, block_table: list[int], n_blocks: int) -> list[int]:
        """A new table of block_table's first n_blocks, each one reference more: parallel samples
        read their prompt's blocks together, and `release` of each table gives back its own."""
        shared = block_table[:n_blocks]
        for block in shared:
            self._incref(block)
        return shared

    def _incref(self, block: int) -> None:
        self._ref[block] += 1
        if self._ref[block] == 2:
            self.shared_blocks += 1

    def ensure(self, block_table: list[int], num_tokens: int) -> None:
        """Grows block_table in place so it holds num_tokens tokens."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:  # the common case in decode: called for every sequence every step
            return
        if need > self.free_blocks:
            raise ResourceExhausted(f"KV cache full: need {need} more blocks, {self.free_blocks} free",
                                    field="kv_cache")
        evicted: list[int] = []
        for _ in range(need):
            block_table.append(self._take(evicted))
        if evicted and self.listener is not None:  # one event per allocation, not per block
            self.listener("evicted", evicted)

    def trim(self, block_table: list[int], num_tokens: int) -> None:
        """Gives back the blocks of block_table past those num_tokens tokens need (positions a
        speculative step wrote and then rolled back)."""
        keep = self.blocks_for(num_tokens)
        if len(block_table) > keep:
            tail = block_table[keep:]
            del block_table[keep:]
            self.release(tail)

    def release(self, block_table: list[int]) -> None:
        for block in reversed(block_table):
            self._ref[block] -= 1
            if self._ref[block] == 1:
                self.shared_blocks -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    # ---- prefix cache --------------------------------------------------------------------
    def _hashes(self, tokens: list[int], n_blocks: int):
        return iter_block_hashes(tokens, self.block_size, n_blocks)

    def cached_tokens(self, prompt: list[int]) -> int:
        """What match_prefix would find for `prompt` now, without taking a block or touching the
        eviction order (a router's probe; safe beside the engine thread: reads only)."""
        if not self.prefix_cache:
            return 0
        n = 0
        for h in self._hashes(prompt, (len(prompt) - 1) // self.block_size):
            if h not in self._block_of:
                break
            n += 1
        return n * self.block_size

    def cached_blocks(self) -> list[tuple[int, int]]:
        """(hash, parent hash) of every cached block (a snapshot for a new cache mirror)."""
        return list(self._parent.copy().items())

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
            self._incref(block)
            block_table.append(block)
        n = len(block_table) * self.block_size
        self.hit_tokens += n
        return n

    def register_prefix(self, prompt: list[int], block_table: list[int], num_computed: int) -> None:
        """Publishes the sequence's full, computed prompt blocks for reuse by later prompts."""
        if not self.prefix_cache:
            return
        n_full = min(len(prompt), num_computed) // self.block_size
        parent, new_from, new = 0, 0, []
        for i, h in enumerate(self._hashes(prompt, n_full)):
            block = block_table[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h
                self._parent[h] = parent
                if not new:
                    new_from = parent
                new.append(h)
            elif new and self.listener is not None:  # a gap: report each run on its own parent
                self.listener("stored", new_from, new)
                new = []
            parent = h
        if new and self.listener is not None:
            self.listener("stored", new_from, new)
