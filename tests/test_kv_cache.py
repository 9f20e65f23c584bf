import pytest
import torch

from river.errors import OutOfBlocksError
from river.kv_cache import BlockAllocator, blocks_needed, pad_block_tables, slots_for


def test_allocator_all_or_nothing():
    a = BlockAllocator(5)
    got = a.allocate(3)
    assert sorted(got) == [0, 1, 2] and a.num_free == 2
    with pytest.raises(OutOfBlocksError, match="need 3 blocks, 2 free"):
        a.allocate(3)
    assert a.num_free == 2, "a failed allocation must not take blocks"
    a.free(got)
    assert a.num_free == 5


def test_allocator_double_free():
    a = BlockAllocator(4)
    b = a.allocate(2)
    a.free(b)
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(b[:1])
    assert a.num_free == 4


def test_slots_and_tables():
    assert blocks_needed(0, 16) == 0 and blocks_needed(16, 16) == 1 and blocks_needed(17, 16) == 2
    table = [7, 2, 9]
    assert slots_for(table, 14, 18, 8) == [2 * 8 + 6, 2 * 8 + 7, 9 * 8 + 0, 9 * 8 + 1]
    t = pad_block_tables([[3], [1, 2, 5]])
    assert t.dtype == torch.int32
    assert t.tolist() == [[3, -1, -1], [1, 2, 5]]
