"""ElasticKVPool (#16): grow, shrink (held blocks moved down), sleep and wake; the allocator's id range, the
tables and the pages kept in step; every refused call changes nothing. Host backend here, CUDA with a GPU."""
import numpy as np
import pytest
import torch
from elastic_util import DEVICES, FailingMaps, assert_seq_reads_back, make_pool, write_new_tokens

from kvpool.elastic import MemoryBudget
from kvpool.errors import InvalidArgumentError, OutOfBlocksError, VirtualMemoryError

MiB = 2**20
ROW = 64 * 1024  # WIDE_LLAMA fp32: one block's bytes in each of the 4 block tensors


def _state(pool) -> tuple:
    return (pool.num_blocks, pool.mapped_bytes, pool.allocator.num_free_blocks, pool.held_blocks(), pool.asleep,
            len(pool.tables) if pool.tables is not None else None)


@pytest.mark.parametrize("device", DEVICES)
def test_grow_hands_out_exactly_the_new_ids(device):
    pool = make_pool(device, num_blocks=10)
    ptrs = [t.data_ptr() for t in pool.cache.block_tensors()]
    assert pool.grow(50) == 50 and pool.num_blocks == 60
    assert pool.mapped_bytes == 4 * 2 * 2 * MiB  # 60 rows of 64 KiB: two chunks per region
    ids = pool.allocator.allocate(60)
    assert sorted(ids.tolist()) == list(range(60))
    with pytest.raises(OutOfBlocksError):
        pool.allocator.allocate(1)
    assert [t.data_ptr() for t in pool.cache.block_tensors()] == ptrs
    pool.allocator.free(ids)


@pytest.mark.parametrize("device", DEVICES)
def test_shrink_moves_held_blocks_down_and_their_contents_with_them(device):
    pool = make_pool(device, num_blocks=8)
    pool.grow(120)  # 128 blocks: 4 chunks per region
    for s, n in enumerate([300, 90, 250, 17]):  # 38 + 12 + 32 + 3 blocks, in allocation order
        pool.tables.add(s, n)
    write_new_tokens(pool, [0, 1, 2, 3])
    pool.tables.append(3, 5)  # an uncomputed tail: its block moves too
    pool.tables.free(0)  # the lowest ids go free: room below for the blocks above the new top
    pool.tables.free(2)
    held_before = pool.held_blocks()
    released = pool.shrink(128 - 20)
    assert released == 108 and pool.num_blocks == 20 and pool.held_blocks() == held_before == 12 + 3
    assert pool.moved_blocks > 0
    assert pool.mapped_bytes == pool.cache.regions.mapped_bytes(20) == 4 * 2 * MiB
    for s in (1, 3):
        assert_seq_reads_back(pool, s)
        assert (pool.tables.blocks(s) < 20).all()
    pool.allocator.check_invariants()
    write_new_tokens(pool, [3])  # the moved partial block keeps taking tokens
    assert_seq_reads_back(pool, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_shrink_releases_what_it_can_and_says_so(device):
    pool = make_pool(device, num_blocks=64)
    pool.tables.add(0, 8 * 40)  # 40 blocks held
    write_new_tokens(pool, [0])
    assert pool.shrink(60) == 24 and pool.num_blocks == 40  # each held block needs an id below the top
    assert_seq_reads_back(pool, 0)
    assert pool.shrink(1) == 0 and pool.num_blocks == 40


@pytest.mark.parametrize("device", DEVICES)
def test_without_tables_shrink_stops_at_the_highest_held_block(device):
    pool = make_pool(device, num_blocks=64, tables=False)
    ids = pool.allocator.allocate(64)
    keep = ids[ids == 20]
    pool.allocator.free(ids[ids != 20])
    assert pool.shrink(60) == 43 and pool.num_blocks == 21
    pool.allocator.free(keep)
    assert pool.shrink(21) == 21 and pool.num_blocks == 0 and pool.mapped_bytes == 0


@pytest.mark.parametrize("device", DEVICES)
def test_sleep_and_wake(device):
    pool = make_pool(device, num_blocks=40)
    ptrs = [t.data_ptr() for t in pool.cache.block_tensors()]
    pool.tables.add(7, list(range(64)))  # full blocks: cached once computed
    write_new_tokens(pool, [7])
    with pytest.raises(InvalidArgumentError, match=r"sleep\(\): 8 blocks are held \(1 sequences"):
        pool.sleep()
    pool.tables.free(7)
    assert pool.allocator.num_cached_blocks > 0
    pool.sleep()
    assert (pool.asleep, pool.num_blocks, pool.mapped_bytes, pool.allocator.num_cached_blocks) == (True, 0, 0, 0)
    with pytest.raises(OutOfBlocksError):
        pool.tables.add(8, 10)
    assert pool.wake() == 40 and not pool.asleep
    assert pool.mapped_bytes == pool.cache.regions.mapped_bytes(40)
    assert [t.data_ptr() for t in pool.cache.block_tensors()] == ptrs
    assert pool.tables.add(7, list(range(64))) == 0  # the cache was dropped with the contents: no stale hit
    assert all(not t[:40].any() for t in pool.cache.block_tensors())


CALLS = [  # (call, error, match): each refused on a pool of 32 of max 256 blocks, one sequence held
    (lambda p: p.grow(-1), InvalidArgumentError, r"grow\(\): num_blocks=-1 must be an int in \[0, 224\]"),
    (lambda p: p.grow(225), InvalidArgumentError, r"num_blocks=225 must be an int in \[0, 224\]"),
    (lambda p: p.grow(1.0), InvalidArgumentError, "num_blocks=1.0"),
    (lambda p: p.shrink(33), InvalidArgumentError, r"shrink\(\): num_blocks=33 must be an int in \[0, 32\]"),
    (lambda p: p.wake(), InvalidArgumentError, "not asleep"),
    (lambda p: p.sleep(), InvalidArgumentError, "blocks are held"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call,error,match", CALLS)
def test_refused_calls_change_nothing(device, call, error, match):
    budget = MemoryBudget(64 * MiB)
    pool = make_pool(device, num_blocks=32, budget=budget)
    pool.tables.add(0, 50)
    before, used = _state(pool), budget.used_bytes
    with pytest.raises(error, match=match):
        call(pool)
    assert _state(pool) == before and budget.used_bytes == used
    pool.allocator.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_calls_on_a_sleeping_pool_are_refused(device):
    pool = make_pool(device, num_blocks=32)
    pool.sleep()
    for call in (lambda: pool.grow(1), lambda: pool.shrink(0), pool.sleep):
        with pytest.raises(InvalidArgumentError, match="asleep"):
            call()
    assert pool.asleep and pool.wake() == 32


@pytest.mark.parametrize("device", DEVICES)
def test_two_pools_share_one_budget(device):
    budget = MemoryBudget(32 * MiB)  # 16 chunks: 4 per pool region set
    a, b = make_pool(device, num_blocks=32, budget=budget), make_pool(device, num_blocks=32, budget=budget)
    assert budget.used_bytes == 2 * 4 * 2 * MiB
    assert a.grow(64) == 64 and budget.free_bytes == 0  # a: 96 blocks, 3 chunks per region
    before = _state(b)
    with pytest.raises(OutOfBlocksError, match=r"budget of rank\(s\) \[0\] allows 0"):
        b.grow(32)
    assert _state(b) == before and b.grow(32, partial=True) == 0
    assert a.shrink(64) == 64 and budget.free_bytes == 16 * MiB
    assert b.grow(200, partial=True) == 64 and budget.free_bytes == 0  # as far as the budget goes
    b.sleep()
    assert budget.used_bytes == 4 * 2 * MiB  # a's only
    a.grow(32)
    with pytest.raises(OutOfBlocksError, match=r"wake\(\): the pool needs 25165824 bytes but the budget has 16777216"):
        b.wake()
    assert b.asleep and budget.used_bytes == a.mapped_bytes
    a.shrink(a.num_blocks)
    assert b.wake() == 96 and budget.used_bytes == b.mapped_bytes
    a.close()
    b.close()
    assert budget.used_bytes == 0


def test_a_closed_pool_refuses_to_resize_and_changes_nothing():
    budget = MemoryBudget(64 * MiB)
    pool = make_pool("cpu", num_blocks=64, budget=budget)
    pool.close()  # its bytes are back in the budget: a resize would map or unmap outside it
    pool.close()
    before = _state(pool)
    for call in (lambda: pool.shrink(32), lambda: pool.grow(32), pool.sleep):
        with pytest.raises(InvalidArgumentError, match="closed"):
            call()
        assert _state(pool) == before and budget.used_bytes == 0


def test_grow_refuses_a_partial_that_is_not_a_bool():
    budget = MemoryBudget(8 * MiB)
    pool = make_pool("cpu", num_blocks=32, budget=budget)  # 8 MiB: the budget is spent
    before = _state(pool)
    for partial in ("no", 1, None):
        with pytest.raises(InvalidArgumentError, match=f"partial={partial!r} must be True or False"):
            pool.grow(32, partial=partial)  # "no" would have grown as far as the budget allows
        assert _state(pool) == before and budget.used_bytes == 8 * MiB


def test_the_pool_is_exported():
    import kvpool
    from kvpool.elastic import ElasticKVPool

    assert kvpool.ElasticKVPool is ElasticKVPool
    assert "ElasticKVPool" in dir(kvpool)
    pool = make_pool(num_blocks=np.int64(3))
    assert pool.grow(np.int32(2)) == 2 and "5 of 256 blocks" in repr(pool)


@pytest.mark.parametrize("device", DEVICES)
def test_a_map_that_fails_mid_grow_leaves_everything_as_it_was(device):
    budget = MemoryBudget(64 * MiB)
    pool = make_pool(device, num_blocks=32, budget=budget)
    pool.tables.add(0, 80)
    real = pool.cache._range
    pool.cache._range = FailingMaps(real, fail_at=3)  # the third of the four regions' runs fails
    before, used = _state(pool), budget.used_bytes
    with pytest.raises(VirtualMemoryError, match="injected"):
        pool.grow(64)
    assert _state(pool) == before and budget.used_bytes == used and real.mapped_bytes == 4 * 2 * MiB
    pool.cache._range = real
    assert pool.grow(64) == 64 and budget.used_bytes == pool.mapped_bytes == 4 * 3 * 2 * MiB


def test_tables_with_a_host_tier_are_refused():
    from kvpool.elastic import ElasticKVPool
    from kvpool.tier.host_tier import HostKVTier

    pool = make_pool(num_blocks=8)
    tier = HostKVTier(pool.cache, 4)
    tables = type(pool.tables)(pool.allocator, 8, "cpu", max_seqs=2, host_tier=tier)
    with pytest.raises(InvalidArgumentError, match="with a host tier .* is not supported yet"):
        ElasticKVPool(pool.cache, pool.allocator, tables)
