"""Paged KV bookkeeping: which pool blocks are free and who holds the others.

Pure Python (no torch): the worker and the simulator share it. Blocks are
reference-counted so that two holders (e.g. a request and an in-flight migration
reading it) can share one block; a block returns to the free list at count zero.
"""

from __future__ import annotations

import random
from collections import deque

from ascendra.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, scatter_seed: int | None = None) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        ids = list(range(num_blocks))
        if scatter_seed is not None:
            # Tests use this so that a request's blocks are far apart and out of order.
            random.Random(scatter_seed).shuffle(ids)
        self._free: deque[int] = deque(ids)
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def incref(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self._refs[b] += 1

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                # Most recently freed first: the pool's hot blocks are reused, so the memory a
                # worker touches (its resident set, on CPU a shared-memory pool faulted in page
                # by page) follows its peak KV use instead of sweeping the whole pool over time.
                self._free.appendleft(b)

    # ---- per-sequence helpers
    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover num_tokens tokens; False (and no change) if short."""
        have = len(seq.block_table)
        if have * self.block_size >= num_tokens:
            return True  # the common case (a decode inside its last block), checked cheaply
        need = -(-num_tokens // self.block_size) - have
        if need > len(self._free):
            return False
        if need:
            seq.block_table.extend(self.allocate(need))
        return True

    def release(self, seq: Sequence) -> None:
        self.free(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat index of a token's K/V slot in the pool."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
