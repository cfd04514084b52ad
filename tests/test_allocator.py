"""Unit tests of the block allocator: the C++ one and its pure-Python reference, side by side.

Every bad input must raise a kvpool.errors class before anything changes, so each error test
compares a full snapshot of the allocator before and after.
"""
import numpy as np
import pytest

from kvpool import BlockAllocator, BlockIndexError, InvalidArgumentError, KVPoolError, OutOfBlocksError
from kvpool._reference import ReferenceBlockAllocator

from allocator_util import IMPLS, make, snapshot  # noqa: F401 (make is a fixture)


def h(*values):
    return np.array(values, dtype=np.uint64)


def test_fresh_allocator_hands_out_ids_in_order(make):
    a = make(8, block_size=4)
    assert (a.num_blocks, a.block_size, a.num_free_blocks, a.num_cached_blocks) == (8, 4, 8, 0)
    ids = a.allocate(3)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and ids.flags.c_contiguous
    assert ids.tolist() == [0, 1, 2]
    assert a.refcounts(ids).tolist() == [1, 1, 1]
    assert a.num_free_blocks == 5
    assert a.allocate(0).tolist() == [] and a.allocate(0).dtype == np.int32
    a.check_invariants()


def test_allocate_is_all_or_nothing(make):
    a = make(4)
    a.allocate(3)
    before = snapshot(a)
    with pytest.raises(OutOfBlocksError) as err:
        a.allocate(2)
    assert (err.value.requested, err.value.available) == (2, 1)
    assert "2" in str(err.value) and "1" in str(err.value)
    assert isinstance(err.value, KVPoolError) and isinstance(err.value, RuntimeError)
    assert snapshot(a) == before
    assert a.allocate(1).tolist() == [3]


@pytest.mark.parametrize("n", [-1, 1.5, "2", None])
def test_allocate_rejects_bad_counts(make, n):
    a = make(4)
    before = snapshot(a)
    with pytest.raises(InvalidArgumentError):
        a.allocate(n)
    assert snapshot(a) == before


def test_allocate_accepts_numpy_integers(make):
    assert make(4).allocate(np.int64(2)).tolist() == [0, 1]


def test_free_returns_blocks_least_recently_freed_first(make):
    a = make(6)
    first = a.allocate(4)  # 0 1 2 3, free list now 4 5
    a.free(first[:2])  # reverse order of ids: 1 then 0 join the tail
    assert a.allocate(4).tolist() == [4, 5, 1, 0]
    a.free([3, 2])  # list input; tail gets 2 then 3
    assert a.allocate(2).tolist() == [2, 3]
    a.check_invariants()


def test_free_keeps_prefix_cached_longest(make):
    a = make(4, block_size=2)
    seq = a.allocate(3)  # 0 1 2
    a.cache_blocks(seq, h(10, 11, 12))
    a.free(seq)  # free list: 3, then 2, 1, 0 (the tail of the sequence is evicted first)
    assert a.num_free_blocks == 4 and a.num_cached_blocks == 3
    assert a.allocate(2).tolist() == [3, 2]  # evicts block 2 (hash 12)
    assert a.stats()["evictions"] == 1 and a.num_cached_blocks == 2
    assert a.match_prefix(h(10, 11, 12)).tolist() == [0, 1]  # the prefix survived
    a.check_invariants()


def test_free_with_shared_blocks_drops_one_reference(make):
    a = make(4)
    ids = a.allocate(2)
    a.incref(ids)
    a.free(ids)
    assert a.refcounts(ids).tolist() == [1, 1] and a.num_free_blocks == 2
    a.incref([0])
    a.free([0, 0])  # an id may repeat up to its refcount
    assert a.refcounts([0, 1]).tolist() == [0, 1]
    a.check_invariants()


def test_double_free_raises_and_changes_nothing(make):
    a = make(4)
    ids = a.allocate(3)
    a.free(ids[:1])
    before = snapshot(a)
    with pytest.raises(InvalidArgumentError, match=r"\b0\b"):
        a.free([1, 0])  # block 0 is free already: block 1 must not be freed either
    assert snapshot(a) == before
    with pytest.raises(InvalidArgumentError, match=r"\b2\b"):
        a.free([2, 2])  # refcount 1, freed twice
    assert snapshot(a) == before


@pytest.mark.parametrize("bad", [-1, 4, 2**31 - 1])
@pytest.mark.parametrize("method", ["free", "incref", "refcounts"])
def test_out_of_range_ids_raise_index_error(make, method, bad):
    a = make(4)
    a.allocate(2)
    before = snapshot(a)
    with pytest.raises(BlockIndexError, match=str(bad)) as err:
        getattr(a, method)([0, bad])
    assert isinstance(err.value, IndexError)
    assert snapshot(a) == before


@pytest.mark.parametrize("method", ["free", "incref", "refcounts"])
def test_ids_beyond_int32_are_out_of_range(make, method):
    a = make(4)
    a.allocate(1)
    before = snapshot(a)
    with pytest.raises(BlockIndexError):
        getattr(a, method)(np.array([0, 2**32], dtype=np.int64))  # would wrap to 0 if cast blindly
    assert snapshot(a) == before


@pytest.mark.parametrize("bad", [[0.5], np.zeros((1, 1), dtype=np.int32), [True]])
def test_non_integer_or_2d_ids_are_rejected(make, bad):
    a = make(4)
    a.allocate(2)  # blocks 0 and 1 held, so a silent cast to an id would succeed
    before = snapshot(a)
    with pytest.raises(InvalidArgumentError):
        a.free(bad)
    assert snapshot(a) == before


def test_ids_of_any_integer_dtype_and_strides_are_accepted(make):
    a = make(8)
    a.allocate(8)
    a.free(np.array([0, 1], dtype=np.int64))
    a.free(np.array([2, 9, 3, 9], dtype=np.int32)[::2])  # non-contiguous view
    a.free(np.array([4], dtype=np.uint8))
    a.free([])
    assert a.num_free_blocks == 5


def test_incref_needs_a_held_block(make):
    a = make(4)
    ids = a.allocate(2)
    a.free(ids[1:])
    before = snapshot(a)
    with pytest.raises(InvalidArgumentError, match=r"\b1\b"):
        a.incref([0, 1])
    assert snapshot(a) == before
    a.incref([0, 0])
    assert a.refcounts([0]).tolist() == [3]
    assert a.stats()["increfs"] == 2


def test_cache_blocks_and_match_prefix(make):
    a = make(8)
    seq = a.allocate(3)
    a.cache_blocks(seq, [100, 101, 102])  # list of ints is fine too
    assert a.num_cached_blocks == 3  # held blocks count as cached
    hit = a.match_prefix(h(100, 101, 999, 102))  # stops at the first miss
    assert hit.dtype == np.int32 and hit.tolist() == [0, 1]
    assert a.refcounts(seq).tolist() == [2, 2, 1]
    assert a.match_prefix(h(5)).tolist() == [] and a.match_prefix(h()).tolist() == []
    s = a.stats()
    assert (s["prefix_queries"], s["prefix_query_blocks"], s["prefix_hit_blocks"]) == (3, 5, 2)


def test_match_prefix_revives_cached_free_blocks(make):
    a = make(4)
    seq = a.allocate(2)
    a.cache_blocks(seq, h(7, 8))
    a.free(seq)
    assert a.num_free_blocks == 4 and a.num_cached_blocks == 2
    assert a.match_prefix(h(7, 8)).tolist() == [0, 1]
    assert a.num_free_blocks == 2 and a.refcounts([0, 1]).tolist() == [1, 1]
    assert a.allocate(2).tolist() == [2, 3]  # the revived blocks are no longer on the free list
    assert a.stats()["evictions"] == 0
    a.check_invariants()


def test_cached_block_is_evicted_when_allocated(make):
    a = make(1)
    a.cache_blocks(a.allocate(1), h(42))
    a.free([0])
    assert a.allocate(1).tolist() == [0]
    assert a.num_cached_blocks == 0 and a.stats()["evictions"] == 1
    assert a.match_prefix(h(42)).tolist() == []


def test_first_writer_wins_on_duplicate_hash(make):
    a = make(4)
    ids = a.allocate(2)
    a.cache_blocks(ids[:1], h(5))
    a.cache_blocks(ids[1:], h(5))  # another block with the same content: keeps block 0
    assert a.num_cached_blocks == 1
    assert a.match_prefix(h(5)).tolist() == [0]
    a.cache_blocks(ids[:1], h(5))  # the same block and hash again is a no-op
    assert a.stats()["cached_blocks_added"] == 1
    a.check_invariants()


def test_cache_blocks_bad_input_changes_nothing(make):
    a = make(4)
    ids = a.allocate(2)
    a.cache_blocks(ids[:1], h(1))
    before = snapshot(a)
    with pytest.raises(InvalidArgumentError, match="2.*1|1.*2"):
        a.cache_blocks(ids, h(1))  # 2 ids, 1 hash
    with pytest.raises(InvalidArgumentError, match=r"\b3\b"):
        a.cache_blocks([1, 3], h(2, 3))  # block 3 is free
    with pytest.raises(BlockIndexError):
        a.cache_blocks([1, 4], h(2, 3))
    with pytest.raises(InvalidArgumentError, match=r"\b0\b"):
        a.cache_blocks([1, 0], h(2, 9))  # block 0 is cached under 1 already
    with pytest.raises(InvalidArgumentError, match=r"\b1\b"):
        a.cache_blocks([1, 1], h(2, 3))  # one block, two hashes in one call
    assert snapshot(a) == before


def test_prefix_caching_disabled(make):
    a = make(4, enable_prefix_caching=False)
    ids = a.allocate(2)
    a.cache_blocks(ids, h(1, 2))
    assert a.num_cached_blocks == 0
    assert a.match_prefix(h(1, 2)).tolist() == []
    with pytest.raises(InvalidArgumentError):
        a.cache_blocks(ids, h(1))  # input is still validated


def test_stats_count_and_high_water_mark(make):
    a = make(8)
    x = a.allocate(5)
    a.free(x[:3])
    y = a.allocate(2)
    a.free(np.concatenate([x[3:], y]))
    s = a.stats()
    assert s["allocations"] == 7 and s["frees"] == 7 and s["high_water_mark"] == 5
    assert (s["num_blocks"], s["free_blocks"], s["used_blocks"], s["cached_blocks"]) == (8, 8, 0, 0)
    assert all(type(v) is int for v in s.values())


@pytest.mark.parametrize("kwargs", [dict(num_blocks=0), dict(num_blocks=-3), dict(num_blocks=2**31),
                                    dict(num_blocks=4, block_size=0), dict(num_blocks=2.0)])
def test_constructor_rejects_bad_sizes(make, kwargs):
    with pytest.raises(InvalidArgumentError):
        make(**kwargs)


def test_cpp_matches_reference_on_a_scripted_workload():
    rng = np.random.default_rng(0)
    a, r = BlockAllocator(64), ReferenceBlockAllocator(64)
    held = []
    for step in range(400):
        n = int(rng.integers(0, 6))
        if n <= a.num_free_blocks:
            got = a.allocate(n)
            assert got.tolist() == r.allocate(n).tolist()
            held.extend(got.tolist())
            a.cache_blocks(got, got.astype(np.uint64) + np.uint64(step % 3))
            r.cache_blocks(got, got.astype(np.uint64) + np.uint64(step % 3))
        hit = a.match_prefix(np.arange(3, dtype=np.uint64) + np.uint64(step % 5))
        assert hit.tolist() == r.match_prefix(np.arange(3, dtype=np.uint64) + np.uint64(step % 5)).tolist()
        held.extend(hit.tolist())
        rng.shuffle(held)
        drop, held = held[: len(held) // 2], held[len(held) // 2:]
        a.free(drop)
        r.free(drop)
        assert snapshot(a) == snapshot(r)
    a.check_invariants()
