"""Regression tests of issue 9, items 1-6: the allocator's input rules, owned input, refcount limits,
slot geometry and all-or-nothing admission. Every case runs on the C++ allocator and on its
pure-Python twin, which must agree: same results, same error classes, state unchanged on error.
"""
import threading

import numpy as np
import pytest

from kvpool import BlockAllocator, BlockIndexError, InvalidArgumentError, KVPoolError, OutOfBlocksError
from kvpool._reference import ReferenceBlockAllocator
from kvpool.block_table import BlockTables

from allocator_util import IMPLS, make, snapshot, tables_for  # noqa: F401 (make is a fixture)


def outcome(fn, *args):
    """("ok", result as a list) or ("error", class): what both allocators must agree on."""
    try:
        out = fn(*args)
    except KVPoolError as err:
        return "error", type(err)
    return "ok", None if out is None else np.asarray(out).tolist()


# ---- item 1: lists of Python / numpy integers convert exactly ------------------------------------

def test_hash_lists_across_2_63_are_exact(make):
    a = make(8, block_size=2)
    ids = a.allocate(3)
    hashes = np.array([2**63 + 5, 7, 2**64 - 1], dtype=np.uint64)
    # np.asarray of this list is float64: the old conversion refused it (or would have rounded it)
    a.cache_blocks(ids, hashes.tolist())
    assert a.match_prefix(hashes.tolist()).tolist() == ids.tolist()
    assert a.match_prefix([int(x) for x in hashes]).tolist() == ids.tolist()
    assert a.match_prefix([2**63 + 4]).tolist() == []  # exact: a neighbour of 2**63 + 5 is not it


def test_numpy_integer_scalars_in_lists(make):
    a = make(4)
    ids = a.allocate(2)
    assert a.refcounts([np.uint64(0), 1]).tolist() == [1, 1]
    assert a.refcounts([np.int8(1), np.uint32(0)]).tolist() == [1, 1]
    a.incref([np.int64(ids[0])])
    assert a.refcounts(ids).tolist() == [2, 1]


BAD_ID_LISTS = [
    ([1.5], InvalidArgumentError),
    ([True], InvalidArgumentError),
    ([0, True], InvalidArgumentError),  # np.asarray would silently make this int64
    ([np.float64(1.0)], InvalidArgumentError),
    (["1"], InvalidArgumentError),
    ([[0, 1]], InvalidArgumentError),
    ([-1], BlockIndexError),
    ([2**31], BlockIndexError),
    ([2**70], BlockIndexError),
    (np.array([0.0]), InvalidArgumentError),
    (np.array([True]), InvalidArgumentError),
    (np.array([[0]], dtype=np.int32), InvalidArgumentError),
]


@pytest.mark.parametrize("ids, error", BAD_ID_LISTS, ids=[repr(x[0]) for x in BAD_ID_LISTS])
@pytest.mark.parametrize("method", ["free", "incref", "refcounts"])
def test_bad_ids_same_error_in_both(ids, error, method):
    allocators = [impl(4) for impl in IMPLS]
    for a in allocators:
        a.allocate(2)
    before = [snapshot(a) for a in allocators]
    results = [outcome(getattr(a, method), ids) for a in allocators]
    assert results[0] == results[1] == ("error", error), results
    assert [snapshot(a) for a in allocators] == before


BAD_HASH_LISTS = [[1.5], [True], [-1], [2**64], [np.float32(3)], np.array([-1], dtype=np.int64)]


@pytest.mark.parametrize("hashes", BAD_HASH_LISTS, ids=repr)
def test_bad_hashes_same_error_in_both(hashes):
    allocators = [impl(4) for impl in IMPLS]
    results = [outcome(a.match_prefix, hashes) for a in allocators]
    assert results[0] == results[1] == ("error", InvalidArgumentError), results
    for a in allocators:
        ids = a.allocate(1)
        assert outcome(a.cache_blocks, ids, hashes) == ("error", InvalidArgumentError)


# ---- item 2: the caller's array is read once, into memory the call owns ----------------------------

@pytest.mark.parametrize("method", ["free", "incref", "cache_blocks"])
def test_array_flipped_by_another_thread_keeps_invariants(method):
    """A thread flips the caller's id array between a valid block and a huge id while the main
    thread calls the allocator with it; before the fix the core re-read the array after
    validation (refcount -1, then a segfault)."""
    a = BlockAllocator(64)
    held = int(a.allocate(1)[0])
    ids = np.array([held], dtype=np.int32)
    stop = threading.Event()

    def flipper():
        while not stop.is_set():
            ids[0] = 2**31 - 1
            ids[0] = held

    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        for i in range(3000):
            try:
                if method == "free":
                    a.incref([held])
                    a.free(ids)
                elif method == "incref":
                    a.incref(ids)
                    a.free([held])
                else:
                    a.cache_blocks(ids, np.array([7], dtype=np.uint64))
            except BlockIndexError:
                pass  # the copy read the huge id: refused cleanly
    finally:
        stop.set()
        thread.join()
    a.check_invariants()
    assert a.refcounts([held]).tolist() == [1]


# ---- item 3: refcounts never overflow --------------------------------------------------------------

@pytest.mark.slow
def test_incref_refuses_the_reference_that_would_overflow():
    a = BlockAllocator(2)
    b = int(a.allocate(1)[0])
    many = np.full(1 << 27, b, dtype=np.int32)
    for _ in range(15):
        a.incref(many)  # refcount 1 + 15 * 2**27 = 2**31 - 2**27 + 1
    a.incref(many[: (1 << 27) - 2])  # 2**31 - 1: the largest int32
    before = snapshot(a)
    with pytest.raises(InvalidArgumentError, match="2147483647"):
        a.incref([b])
    with pytest.raises(InvalidArgumentError, match="overflow"):
        a.incref(np.array([b, b], dtype=np.int32))
    assert snapshot(a) == before
    a.cache_blocks([b], [11])
    with pytest.raises(InvalidArgumentError, match="2147483647"):
        a.match_prefix([11])
    a.check_invariants()
    assert a.refcounts([b]).tolist() == [2**31 - 1]


def test_reference_refuses_refcount_overflow_too():
    a = ReferenceBlockAllocator(2)
    b = int(a.allocate(1)[0])
    a._refcount[b] = 2**31 - 2  # the twin's containers, set directly: a loop of 2**31 increfs is too slow
    a.incref([b])
    with pytest.raises(InvalidArgumentError):
        a.incref([b])
    a.cache_blocks([b], [11])
    with pytest.raises(InvalidArgumentError):
        a.match_prefix([11])
    assert a.refcounts([b]).tolist() == [2**31 - 1]


# ---- item 4: slot ids fit in int32; append errors change nothing ------------------------------------

@pytest.mark.parametrize("num_blocks, block_size", [(2**27 + 1, 16), (2, 2**31 - 1), (2**31 - 2, 2)])
def test_geometry_past_int32_slots_is_refused(make, num_blocks, block_size):
    with pytest.raises(InvalidArgumentError, match="2147483648"):
        make(num_blocks, block_size)


def test_largest_geometry_is_accepted():
    a = BlockAllocator(2**27, 16)  # exactly 2**31 slots: the last slot id is 2**31 - 1
    assert a.num_blocks * a.block_size == 2**31


class _WideAllocator:
    """An allocator-like object of a geometry kvpool's allocators refuse (BlockTables checks too)."""

    num_blocks, block_size, enable_prefix_caching = 2**28, 16, False


def test_block_tables_refuse_geometry_past_int32_slots():
    from kvpool._reference_tables import ReferenceBlockTables

    with pytest.raises(InvalidArgumentError, match="2147483648"):
        ReferenceBlockTables(_WideAllocator(), 16)
    with pytest.raises(InvalidArgumentError, match="C\\+\\+ allocator"):
        BlockTables(_WideAllocator(), 16)


def test_paged_kv_cache_refuses_geometry_past_int32_slots():
    from kvpool.cache import PagedKVCache

    # refused before any page is allocated (the pool would be 4 TiB)
    with pytest.raises(InvalidArgumentError, match="2147483648"):
        PagedKVCache.for_shard("llama-3.1-8b", 2**27 + 1, 16, 0, 1, "cpu")


def test_append_errors_leave_the_sequence_unchanged(make):
    a = make(4, block_size=4)
    bt = tables_for(a, 4, max_seqs=4)
    bt.add("s", list(range(6)))
    state = (bt.num_tokens("s"), bt.blocks("s").tolist(), snapshot(a))
    for bad in (0, -1, 1.5, True, "2", 2**40):
        with pytest.raises((InvalidArgumentError, OutOfBlocksError)):
            bt.append("s", bad)
        assert (bt.num_tokens("s"), bt.blocks("s").tolist(), snapshot(a)) == state


# ---- item 5: a failed add() changes nothing, eviction order and statistics included --------------

def test_failed_add_leaves_cache_order_and_stats_unchanged(make):
    a = make(6, block_size=4)
    bt = tables_for(a, 4, max_seqs=4)
    prompt = list(range(13))  # 3 full blocks + 1 token: 4 blocks, 3 matchable
    bt.add("first", prompt)
    bt.mark_computed("first")
    bt.free("first")  # 4 free blocks, 3 of them cached
    bt.add("filler", [99] * 8)  # 2 blocks taken: evicts the two least recently freed
    before = snapshot(a)
    with pytest.raises(OutOfBlocksError):
        bt.add("second", prompt + [5] * 20)  # hits the cached blocks, then needs too many fresh ones
    assert "second" not in bt
    assert snapshot(a) == before
    # the same eviction order as if the failed call never happened
    assert a.allocate(a.num_free_blocks).tolist() == make_twin_order(make)


def make_twin_order(make):
    a = make(6, block_size=4)
    bt = tables_for(a, 4, max_seqs=4)
    bt.add("first", list(range(13)))
    bt.mark_computed("first")
    bt.free("first")
    bt.add("filler", [99] * 8)
    return a.allocate(a.num_free_blocks).tolist()


def test_allocate_with_prefix_failure_counts_nothing(make):
    a = make(4, block_size=2)
    tokens = np.arange(4, dtype=np.int32)
    hashes = a.hash_tokens(tokens)
    ids, hits, _ = a.allocate_with_prefix(2, hashes, tokens)
    a.cache_blocks_verified(ids, hashes, tokens)
    a.free(ids)
    before = snapshot(a)
    with pytest.raises(OutOfBlocksError) as err:
        a.allocate_with_prefix(7, hashes, tokens)  # 2 hits revived, 5 fresh needed, 2 left
    assert (err.value.requested, err.value.available) == (5, 2)
    assert snapshot(a) == before


# ---- item 6: constructor arguments ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_blocks=2, block_size=2**31), "block_size=2147483648 must be in"),
    (dict(num_blocks=2, block_size=2**63), "block_size=9223372036854775808 must be in"),
    (dict(num_blocks=2, block_size=0), "block_size=0 must be in"),
    (dict(num_blocks=0), "num_blocks=0"),
    (dict(num_blocks=2**70), "num_blocks"),
    (dict(num_blocks=2.0), "integer"),
    (dict(num_blocks=True), "integer"),
    (dict(num_blocks=4, enable_prefix_caching="no"), "True or False"),
    (dict(num_blocks=4, enable_prefix_caching=1), "True or False"),
    (dict(num_blocks=4, hash_key=-1), "hash_key"),
    (dict(num_blocks=4, hash_key=2**128), "hash_key"),
    (dict(num_blocks=4, hash_key=b"short"), "16"),
])
def test_constructor_refuses_bad_arguments(make, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        make(**kwargs)


def test_numpy_bool_and_integer_arguments_accepted(make):
    a = make(np.int64(4), np.int32(2), np.bool_(False))
    assert (a.num_blocks, a.block_size, a.enable_prefix_caching) == (4, 2, False)


def test_masked_arrays_are_refused(make):
    a = make(4)
    a.allocate(2)
    masked = np.ma.masked_array(np.array([0, 1], dtype=np.int32), mask=[False, True])
    before = snapshot(a)
    with pytest.raises(InvalidArgumentError, match="masked"):
        a.free(masked)
    with pytest.raises(InvalidArgumentError, match="masked"):
        a.match_prefix(np.ma.masked_array(np.array([1], dtype=np.uint64), mask=[True]))
    assert snapshot(a) == before
