"""An elastic pool's allocator (issue 16, items 2 and 3): a capacity sized once, grow() at the top,
shrink() of free top ids, and relocate_top() moving held top blocks (references, hashes, verified
entries) to free lower ids. Every case runs on the C++ allocator and on its pure-Python twin."""
import numpy as np
import pytest

from kvpool import BlockIndexError, InvalidArgumentError, OutOfBlocksError

from allocator_util import make, snapshot  # noqa: F401 (make is a fixture)

KEY = 7


def elastic(make, num_blocks=4, cap=8, block_size=2):
    return make(num_blocks, block_size=block_size, hash_key=KEY, max_num_blocks=cap)


def test_capacity_defaults_to_num_blocks_and_is_validated(make):
    assert make(5).max_num_blocks == 5
    assert elastic(make).max_num_blocks == 8
    with pytest.raises(InvalidArgumentError, match="max_num_blocks=3 must be >= num_blocks=4"):
        make(4, max_num_blocks=3)
    with pytest.raises(InvalidArgumentError, match="2147483648"):
        make(4, block_size=16, max_num_blocks=2**27 + 1)  # slot ids of the capacity must fit in int32
    with pytest.raises(InvalidArgumentError):
        make(4, max_num_blocks=6.0)


def test_grow_appends_ids_at_the_tail_so_low_ids_go_out_first(make):
    a = elastic(make)
    held = a.allocate(2)  # 0, 1
    a.free([held[0]])  # 0 joins the tail, after 2, 3
    a.grow(3)
    assert a.num_blocks == 7 and a.num_free_blocks == 6
    assert a.allocate(4).tolist() == [2, 3, 0, 4]  # the older free ids first, then the new ones in order
    assert a.free_top_blocks == 2 and a.held_in_top(3) == 1
    a.check_invariants()


def test_grow_beyond_capacity_or_negative_changes_nothing(make):
    a = elastic(make)
    a.allocate(1)
    before = snapshot(a)
    for n in (5, -1):
        with pytest.raises(InvalidArgumentError, match=f"grow\\(\\): n={n} must be in \\[0, 4\\]"):
            a.grow(n)
    with pytest.raises(InvalidArgumentError):
        a.grow(True)
    assert snapshot(a) == before
    a.grow(4)
    a.grow(0)
    assert a.num_blocks == a.max_num_blocks == 8


def test_shrink_removes_free_top_ids_and_evicts_their_cache(make):
    a = elastic(make, num_blocks=6)
    ids = a.allocate(6)
    a.cache_blocks(ids[4:], [11, 12])
    a.free(ids[2:])  # 2..5 free, 4 and 5 cached
    assert a.num_cached_blocks == 2 and a.free_top_blocks == 4
    a.shrink(3)
    assert a.num_blocks == 3 and a.num_free_blocks == 1 and a.num_cached_blocks == 0
    assert a.stats()["evictions"] == 2 and a.stats()["num_blocks"] == 3
    assert a.match_prefix([11]).tolist() == []  # the evicted content is gone
    with pytest.raises(BlockIndexError, match="out of range"):
        a.refcounts([3])  # above the new top
    a.grow(5)  # the removed ids come back free and uncached
    assert a.num_blocks == 8 and a.num_free_blocks == 6
    a.check_invariants()


def test_shrink_with_held_top_blocks_says_how_many_and_changes_nothing(make):
    a = elastic(make, num_blocks=6)
    a.allocate(6)
    a.free([5])
    before = snapshot(a)
    with pytest.raises(OutOfBlocksError, match="2 of the top 3 blocks \\[3, 6\\) are held") as err:
        a.shrink(3)
    assert (err.value.requested, err.value.available) == (3, 1)
    assert snapshot(a) == before
    for n in (-1, 7):
        with pytest.raises(InvalidArgumentError, match=f"n={n} must be in \\[0, num_blocks=6\\]"):
            a.shrink(n)
    a.shrink(1)
    assert a.num_blocks == 5


def test_shrink_to_zero_and_grow_back(make):
    a = elastic(make, num_blocks=2, cap=4)
    a.shrink(2)
    assert a.num_blocks == 0 and a.num_free_blocks == 0
    with pytest.raises(OutOfBlocksError):
        a.allocate(1)
    a.grow(4)
    assert a.allocate(4).tolist() == [0, 1, 2, 3]
    a.check_invariants()


def test_relocate_moves_held_top_blocks_with_references_and_cache(make):
    a = elastic(make, num_blocks=6, block_size=2)
    ids = a.allocate(6)  # 0..5
    tokens = [1, 2, 3, 4]
    hashes = a.hash_tokens(tokens)
    chain = a.cache_blocks_verified(ids[4:], hashes, tokens)  # blocks 4, 5 hold a verified prompt
    a.incref([5])  # 5 is shared: two references move
    a.free(ids[:3])  # 0, 1, 2 free; 3, 4, 5 held
    src, dst = a.relocate_top(3)
    assert src.dtype == dst.dtype == np.int64
    # free() pushed 2, 1, 0 (reverse order of ids): the free list hands them out in that order
    assert src.tolist() == [3, 4, 5] and dst.tolist() == [2, 1, 0]
    assert a.held_in_top(3) == 0 and a.free_top_blocks == 3
    assert a.refcounts([0, 1, 2, 3, 4, 5]).tolist() == [2, 1, 1, 0, 0, 0]
    # the verified entries moved, stamps and all: the prompt still hits, now in the new blocks
    hit, h, after = a.allocate_with_prefix(2, hashes, tokens)
    assert h == 2 and hit.tolist() == [1, 0] and after == chain
    a.shrink(3)
    assert a.num_blocks == 3
    a.check_invariants()


def test_relocate_takes_free_lower_ids_in_lru_order_and_evicts_cached_ones(make):
    a = elastic(make, num_blocks=6)
    ids = a.allocate(6)
    a.cache_blocks(ids[:1], [99])
    a.free([1, 0])  # free list: 0 (cached), then 1 -- free() pushes in reverse order of ids
    src, dst = a.relocate_top(1)
    assert (src.tolist(), dst.tolist()) == ([5], [0])
    assert a.num_cached_blocks == 0 and a.stats()["evictions"] == 1
    assert a.match_prefix([99]).tolist() == []


def test_relocate_without_room_says_how_many_could_move_and_changes_nothing(make):
    a = elastic(make, num_blocks=6)
    a.allocate(6)
    a.free([0])
    before = snapshot(a)
    with pytest.raises(OutOfBlocksError, match="only 1 are free there, so 1 could move") as err:
        a.relocate_top(3)
    assert (err.value.requested, err.value.available) == (3, 1)
    assert snapshot(a) == before
    src, dst = a.relocate_top(0)
    assert src.tolist() == dst.tolist() == []
    with pytest.raises(InvalidArgumentError):
        a.relocate_top(7)
