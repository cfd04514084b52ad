"""ElasticKVPool over real gloo groups (#16 item 3): every rank decides the same (the MIN rule), a failure on
one rank raises the same error on all of them and changes nothing anywhere."""
import pytest
from gloo_util import run_ranks

pytestmark = pytest.mark.slow

MiB = 2**20


def _pool(rank, budget_mib):
    import torch.distributed as dist

    from kvpool.elastic import ElasticKVPool, MemoryBudget

    from elastic_util import FP32, WIDE_LLAMA

    budget = MemoryBudget(budget_mib * MiB)
    # WIDE_LLAMA has 16 KV heads: tp=2 gives each rank 8 (32 KiB rows, 64 blocks a chunk)
    return ElasticKVPool.for_shard(WIDE_LLAMA, 512, 8, rank, dist.get_world_size(), "cpu", num_blocks=64, max_seqs=4,
                                   budget=budget, **FP32)


def _outcome(call) -> dict:
    import kvpool

    try:
        return {"ok": call()}
    except kvpool.KVPoolError as err:
        return {"error": type(err).__name__, "message": str(err)}


def _scenario(rank: int, world: int) -> dict:
    # 4 regions of 2 MiB chunks, 64 blocks a chunk: rank 0 may map 48 MiB (6 chunks a region, 384 blocks), rank 1
    # 40 MiB (5 a region, 320 blocks)
    pool = _pool(rank, 48 if rank == 0 else 40)
    out = {"start": pool.num_blocks}
    out["grow_too_far"] = _outcome(lambda: pool.grow(448))
    out["after_refusal"] = [pool.num_blocks, pool.mapped_bytes, pool.budget.used_bytes]
    if rank == 1:  # rank 1's device runs out of memory mid-map: rank 0, which mapped, undoes it too
        from elastic_util import FailingMaps

        pool.cache._range = FailingMaps(pool.cache._range, fail_at=2)
    out["map_fails_on_one_rank"] = _outcome(lambda: pool.grow(64))
    out["after_map_failure"] = [pool.num_blocks, pool.mapped_bytes, pool.budget.used_bytes]
    pool.cache._range = getattr(pool.cache._range, "_range", pool.cache._range)
    out["grow_partial"] = _outcome(lambda: pool.grow(448, partial=True))
    out["mismatch"] = _outcome(lambda: pool.shrink(1 if rank == 0 else 2))
    out["bad_on_one_rank"] = _outcome(lambda: pool.grow(-1 if rank == 1 else 0))
    pool.tables.add("s", 8 * 100)  # 100 blocks held, the same ids on every rank
    out["shrink"] = _outcome(lambda: pool.shrink(pool.num_blocks))
    out["held_blocks_below"] = int(pool.tables.blocks("s").max()) < pool.num_blocks
    out["sleep_held"] = _outcome(pool.sleep)
    pool.tables.free("s")
    out["sleep"] = _outcome(pool.sleep)
    out["wake"] = _outcome(pool.wake)
    out["end"] = [pool.num_blocks, pool.mapped_bytes, pool.budget.used_bytes]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(2, tmp_path_factory.mktemp("elastic2"), _scenario)


def test_grow_beyond_a_budget_is_refused_on_every_rank_and_changes_nothing(results):
    for r in results:
        assert r["grow_too_far"]["error"] == "OutOfBlocksError"
        assert "budget of rank(s) [1] allows 256 (the pool has 64)" in r["grow_too_far"]["message"]
        assert r["after_refusal"][0] == 64 and r["after_refusal"][1] == r["after_refusal"][2] == 4 * 2 * MiB


def test_partial_grow_takes_the_min_over_ranks(results):
    # rank 1 reaches 320 blocks, rank 0 could reach 384: both grow by 256
    assert [r["grow_partial"] for r in results] == [{"ok": 256}] * 2


def test_mismatched_and_bad_arguments_raise_on_every_rank(results):
    for r in results:
        assert r["mismatch"]["error"] == "RankMismatchError" and "[1, 2]" in r["mismatch"]["message"]
        assert r["bad_on_one_rank"]["error"] == "InvalidArgumentError"
        assert "rank 1: InvalidArgumentError: grow(): num_blocks=-1" in r["bad_on_one_rank"]["message"]


def test_shrink_moves_the_same_blocks_on_every_rank(results):
    for r in results:
        assert r["shrink"] == {"ok": 220} and r["held_blocks_below"]  # 320 - 100 held
        assert r["sleep_held"]["error"] == "InvalidArgumentError"
        assert r["sleep"] == {"ok": None} and r["wake"] == {"ok": 100}
        assert r["end"][0] == 100 and r["end"][1] == r["end"][2] == 4 * 2 * 2 * MiB


def test_a_map_failing_on_one_rank_is_undone_on_every_rank(results):
    for r in results:
        assert r["map_fails_on_one_rank"]["error"] == "VirtualMemoryError"
        assert "rank 1: VirtualMemoryError: map(" in r["map_fails_on_one_rank"]["message"]
        assert r["after_map_failure"] == [64, 4 * 2 * MiB, 4 * 2 * MiB]  # as before the call
