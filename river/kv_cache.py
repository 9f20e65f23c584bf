"""Paged KV cache: one preallocated pool of fixed-size blocks shared by every layer's slots.

A sequence owns a list of block ids (its block table); token t of the sequence lives in block
`table[t // block_size]` at offset `t % block_size`, the same slot in every layer. River layers
write their K/V into exactly these slots (KV share), so the cache is always complete.
"""

from __future__ import annotations

from collections import deque

import torch

from river.errors import OutOfBlocksError


class KVCache:
    """K and V for all layers: [num_layers, num_blocks, block_size, kv_heads, head_dim].

    `valid` [num_layers, num_blocks, block_size] marks slots a layer actually wrote; only the
    KV-masking baseline ever writes False there (its skipped layers leave holes).
    """

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.ones(shape[:3], dtype=torch.bool, device=device)
        # Marking slots valid writes this device scalar: a Python True would become a host
        # tensor copied to the device on every write (a sync, and illegal in a captured graph).
        self.true = torch.ones((), dtype=torch.bool, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size


class BlockAllocator:
    """Free list of block ids. Allocation is all-or-nothing so a failed request leaks nothing."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"KV pool exhausted: need {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise RuntimeError(f"block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def slots_for(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of token positions start..end-1 of one sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def pad_block_tables(tables: list[list[int]], width: int | None = None) -> torch.Tensor:
    """int32 [rows, width] padded with -1."""
    width = width if width is not None else max((len(t) for t in tables), default=1)
    out = torch.full((len(tables), max(width, 1)), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out
