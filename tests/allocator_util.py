"""Shared by the allocator tests: both implementations, side by side, and a full state snapshot."""
import numpy as np
import pytest

from kvpool import BlockAllocator
from kvpool._reference import ReferenceBlockAllocator
from kvpool._reference_tables import ReferenceBlockTables
from kvpool.block_table import BlockTables

IMPLS = [BlockAllocator, ReferenceBlockAllocator]


@pytest.fixture(params=IMPLS, ids=["cpp", "reference"])
def make(request):
    """The allocator class under test: the C++ one, then its pure-Python twin."""
    return request.param


def snapshot(a):
    """Everything observable of an allocator: free and cached counts, every refcount, the statistics."""
    everything = np.arange(a.num_blocks, dtype=np.int32)
    return a.num_free_blocks, a.num_cached_blocks, a.refcounts(everything).tolist(), a.stats()


def tables_for(allocator, *args, **kwargs):
    """The block tables that go with an allocator: the C++-backed ones, or the pure-Python twin."""
    cls = BlockTables if isinstance(allocator, BlockAllocator) else ReferenceBlockTables
    return cls(allocator, *args, **kwargs)
