"""The host tier's protocol on CPU tensors (issue 14): fake KV pages prove where every block's content came from.

Ordering (no read before a copy lands, no reuse before it), eviction from both tiers, a hit spanning both
tiers, preemption with copies in flight, hash-collision integrity on the host tier, and the errors.
"""
import numpy as np
import pytest
from types import SimpleNamespace

from kvpool import BlockAllocator, BlockIndexError, InvalidArgumentError, OutOfBlocksError
from kvpool.block_table import BlockTables
from kvpool.tier import HostKVTier, Transfers
from tier_util import KEY, DeferredCopier, InstantCopier, TierServer

A = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # 6 full blocks of 2 and one token
B = [9, 9, 8, 8, 7, 7, 6, 6, 5, 5, 4, 4, 3]


def evict_from_gpu(server, n_blocks, first_id="filler"):
    """Serve unrelated prompts until `n_blocks` fresh GPU blocks were handed out (LRU evicts the oldest)."""
    for i in range(n_blocks):
        server.serve(f"{first_id}{i}", [100 + i, 200 + i, 300 + i])  # 1 full block + 1 token: 2 blocks each
        server.run_transfers()
        server.copier.finish_all()


def test_a_prefix_evicted_from_the_gpu_comes_back_from_the_host_with_its_kv():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=InstantCopier)
    assert s.serve("a", A) == 0
    s.run_transfers()  # the next step enqueues A's offloads (done at once here); the next add releases the holds
    s.serve("b", B)  # takes 7 of the 8 GPU blocks: A's are evicted on the GPU but its first
    s.run_transfers()
    assert s.tables.allocator.stats()["evictions"] == 5
    hit = s.add("a2", A)
    assert hit == 12  # all six full blocks, from the host
    transfers = s.forward(["a2"])  # checks every reloaded token's KV before writing the last one
    assert len(transfers.reload_host) > 0
    assert s.tier.stats()["host_hit_blocks"] == len(transfers.reload_host)
    assert s.computed_prompt_tokens == 13 + 13 + 1


def test_a_hit_spans_both_tiers():
    s = TierServer(num_blocks=7, num_host_blocks=32, copier=InstantCopier)
    s.serve("a", A)  # 7 blocks; freed in reverse: block 6, 5, ... first in line for eviction
    s.run_transfers()
    s.serve("x", [50, 51, 52, 53, 54, 55, 56, 57, 58])  # 5 blocks: evicts A's tail, A's first two stay on the GPU
    s.run_transfers()
    hit = s.add("a2", A)
    assert hit == 12
    transfers = s.forward(["a2"])
    assert sorted(transfers.reload_gpu.tolist()) == sorted(s.tables.blocks("a2")[2:6].tolist())  # 2 GPU + 4 host


def test_an_offloaded_block_is_not_read_and_its_gpu_block_not_reused_before_the_copy_lands():
    s = TierServer(num_blocks=9, num_host_blocks=32, copier=DeferredCopier)
    s.serve("a", A)
    transfers = s.run_transfers()  # offloads enqueued on the "side stream", not run yet
    held = transfers.offload_gpu.tolist()
    assert len(held) == 6 and not any(s.tier.readable(h) for h in transfers.offload_host)
    assert all(r == 1 for r in s.refcounts()[held])  # A is freed; the copies still hold its blocks
    with pytest.raises(Exception):  # every block not held by a copy: no more
        s.allocator.allocate(4)
    fresh = s.allocator.allocate(3)  # the pool's other blocks; the in-flight ones are never handed out
    assert not set(fresh.tolist()) & set(held)
    s.allocator.free(fresh)
    hit = s.add("a2", A)  # still on the GPU: a hit there, nothing reloaded from unreadable host blocks
    assert hit == 12 and s.tier.stats()["pending_reloads"] == 0 and s.tier.stats()["host_hit_blocks"] == 0
    s.free("a2")
    s.copier.finish_offloads()  # the side stream runs now: the host gets A's KV
    s.tier.poll()
    assert all(s.tier.readable(h) for h in transfers.offload_host)
    assert (s.refcounts()[held] == 0).all()
    evict_from_gpu(s, 5)
    s.run_transfers()
    assert s.add("a3", A) == 12
    s.forward(["a3"])  # the KV the copy took before the GPU blocks were reused: A's own


def test_a_hit_stops_before_a_host_block_whose_offload_is_in_flight():
    s = TierServer(num_blocks=10, num_host_blocks=32, copier=DeferredCopier)
    s.add("a", A)
    s.forward(["a"], [6])  # chunked prefill: blocks 0..2 first
    s.run_transfers()
    s.copier.finish_offloads()  # their offloads land; blocks 3..5 follow in the next chunk
    s.forward(["a"])
    transfers = s.run_transfers()  # blocks 3..5 are on their way to the host, not there yet
    assert len(transfers.offload_gpu) == 3
    s.free("a")
    s.serve("filler", B)  # 7 fresh blocks: the GPU evicts A's blocks 0..2 (free); 3..5 are held by their copies
    s.run_transfers()
    s.copier.offloads[-1].finish()  # the filler's copies land; A's blocks 3..5 are still in flight
    assert s.add("a2", A) == 6  # blocks 0..2 from the host; the walk stops at block 3, in flight
    s.forward(["a2"])  # reads blocks 0..2 reloaded: A's KV; never the unwritten host blocks 3..5


def test_a_sequence_is_batched_only_once_its_reloads_are_enqueued():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=InstantCopier)
    s.serve("a", A)
    s.run_transfers()
    s.serve("b", B)
    s.run_transfers()
    assert s.add("a2", A) == 12
    with pytest.raises(InvalidArgumentError, match="reloaded from the host"):
        s.tables.batch(["a2"])  # queued
    transfers = s.tables.pop_transfers()
    with pytest.raises(InvalidArgumentError, match="reloaded from the host"):
        s.tables.batch(["a2"])  # popped, but no copy enqueued yet: its blocks still hold garbage
    s.tier.run(transfers)
    s.tables.batch(["a2"])  # the reloads run before anything enqueued after them


def test_a_reload_holds_both_blocks_until_it_completes_even_when_the_sequence_is_preempted():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=DeferredCopier)
    s.serve("a", A)
    s.run_transfers()
    s.copier.finish_offloads()
    s.serve("b", B)
    s.run_transfers()
    s.copier.finish_offloads()
    s.tier.poll()
    assert s.add("a2", A) == 12  # block 0 on the GPU, blocks 1..5 from the host
    gpu_dst = s.tables.blocks("a2")[1:6]
    with pytest.raises(InvalidArgumentError, match="reloaded from the host"):
        s.tables.batch(["a2"])  # its blocks are not on the GPU yet
    s.free("a2")  # preempted before its reloads even ran
    transfers = s.run_transfers()
    host_src = transfers.reload_host.tolist()
    assert set(transfers.reload_gpu.tolist()) == set(gpu_dst.tolist())
    assert (s.refcounts()[transfers.reload_gpu] == 1).all()  # the reload's hold: not handed out
    assert (s.host_refcounts()[host_src] >= 1).all()  # the host block is not evicted under the copy
    s.tier.poll()
    assert (s.refcounts()[transfers.reload_gpu] == 1).all()  # not done yet: still held
    s.copier.finish_reloads()
    s.tier.poll()
    assert (s.refcounts()[transfers.reload_gpu] == 0).all() and (s.host_refcounts()[host_src] == 0).all()
    s.tables.allocator.check_invariants()
    s.tier.allocator.check_invariants()


def test_preemption_with_offloads_in_flight_loses_no_block():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=DeferredCopier)
    s.add("a", A)
    s.forward(["a"])
    s.free("a")  # preempted right after its step: the offloads are queued, not even popped
    assert s.tier.stats()["pending_offloads"] == 6
    assert int(sum(s.refcounts())) == 6  # only the copies' holds
    s.allocator.free(s.allocator.allocate(2))  # the other two blocks; the held six are not handed out
    transfers = s.run_transfers()
    s.tier.poll()
    assert (s.refcounts()[transfers.offload_gpu] == 1).all()  # enqueued, not run: still held
    s.copier.finish_offloads()
    s.tier.poll()
    assert int(sum(s.refcounts())) == 0
    evict_from_gpu(s, 4)
    assert s.add("a2", A) == 12
    s.forward(["a2"])  # A's KV, copied before its GPU blocks went back to the pool


def test_both_tiers_evict_and_a_prompt_lost_by_both_is_recomputed():
    s = TierServer(num_blocks=8, num_host_blocks=6, copier=InstantCopier)
    s.serve("a", A)
    s.run_transfers()
    s.serve("b", B)  # the host holds 6 blocks: B's offloads evict A's on the host, B's fresh blocks A's on the GPU
    s.run_transfers()
    s.tier.poll()
    assert s.tier.stats()["host_evictions"] == 6 and s.allocator.stats()["evictions"] == 5
    assert s.add("a2", A) == 2  # only A's first block, which the GPU's LRU kept
    s.forward(["a2"])
    s.free("a2")
    s.run_transfers()
    assert s.add("b2", B) == 2  # A's second pass evicted B from both tiers in turn, but its first GPU block
    s.forward(["b2"])


def test_the_host_never_serves_another_prompts_kv_after_a_hash_collision():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=InstantCopier, hash_bits=0)  # every hash is 0
    s.serve("a", A)
    s.run_transfers()
    s.serve("b", B)
    s.run_transfers()
    s.tier.poll()
    assert s.tier.allocator.stats()["hash_collisions"] >= 1
    assert s.add("c", A) == 0  # B's blocks took hash 0 on both tiers: A's prompt meets them and misses
    s.forward(["c"])  # the KV read is A's own, never B's under the same hash


def test_salted_requests_share_no_host_block():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=InstantCopier)
    s.serve("a", A, salt="tenant-1")
    s.run_transfers()
    s.serve("b", B)
    s.run_transfers()
    s.tier.poll()
    assert s.add("a-other-tenant", A, salt="tenant-2") == 0
    s.forward(["a-other-tenant"])
    s.free("a-other-tenant")
    s.run_transfers()
    assert s.add("a-same-tenant", A, salt="tenant-1") == 12
    s.forward(["a-same-tenant"])


def test_a_host_block_cached_after_another_incarnation_of_its_prefix_is_not_served():
    s = TierServer(num_blocks=8, num_host_blocks=3, copier=InstantCopier, hash_bits=2)
    for i, prompt in enumerate([A, B, A[:4] + B[4:], A]):
        s.serve(f"p{i}", prompt)
        s.run_transfers()
        s.tier.poll()
    s.add("final", A)
    s.forward(["final"])  # whatever hit, every token's KV is A's own


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_with_a_tiny_hash_space_always_reads_its_own_kv(seed):
    rng = np.random.default_rng(seed)
    s = TierServer(num_blocks=12, num_host_blocks=10, copier=DeferredCopier, hash_bits=int(rng.integers(0, 4)))
    prompts = [rng.integers(0, 2, size=int(rng.integers(2, 12))).tolist() for _ in range(5)]
    for i in range(60):
        if rng.random() < 0.5:
            s.copier.finish_offloads()
        if rng.random() < 0.5:
            s.copier.finish_reloads()
        try:
            s.add(i, prompts[int(rng.integers(0, 5))])
        except OutOfBlocksError:  # the pool is full of in-flight copies now and then: the request waits
            continue
        s.forward([i])  # checks every token's KV the step reads
        s.free(i)  # often with its copies still in flight
    s.copier.finish_all()
    s.tier.synchronize()
    s.run_transfers()
    s.copier.finish_all()
    s.tier.synchronize()
    assert int(sum(s.refcounts())) == 0 and int(sum(s.host_refcounts())) == 0  # every hold was released
    s.allocator.check_invariants()
    s.tier.allocator.check_invariants()


def test_the_tier_refuses_what_it_cannot_serve():
    geometry = SimpleNamespace(block_size=2)
    with pytest.raises(InvalidArgumentError, match="num_host_blocks=0"):
        HostKVTier(geometry, 0, copier=InstantCopier(None, None))
    tier = HostKVTier(geometry, 4, copier=InstantCopier(None, None))
    with pytest.raises(InvalidArgumentError, match="one full-attention KV-cache group"):
        BlockTables(BlockAllocator(8, 2, hash_key=KEY), 2, group_windows=(None, 4), host_tier=tier)
    with pytest.raises(InvalidArgumentError, match="prefix caching"):
        BlockTables(BlockAllocator(8, 2, enable_prefix_caching=False), 2, host_tier=tier)
    with pytest.raises(InvalidArgumentError, match="block_size=2 differs"):
        BlockTables(BlockAllocator(8, 4), 4, host_tier=tier)
    with pytest.raises(InvalidArgumentError, match="HostKVTier"):
        BlockTables(BlockAllocator(8, 2), 2, host_tier="tier")
    tables = BlockTables(BlockAllocator(8, 2), 2, host_tier=tier)  # the refusals above left the tier unbound
    with pytest.raises(InvalidArgumentError, match="serves a BlockTables already"):
        BlockTables(BlockAllocator(8, 2), 2, host_tier=tier)
    with pytest.raises(InvalidArgumentError, match="no host tier"):
        BlockTables(BlockAllocator(8, 2), 2).pop_transfers()
    with pytest.raises(InvalidArgumentError, match="Transfers"):
        tier.run(None)
    with pytest.raises(InvalidArgumentError, match="no transfer batch 7"):
        tier._core.complete(7, True)
    assert len(tables.pop_transfers()) == 0


def test_the_core_tracks_every_host_id_of_a_host_allocator_that_grew():
    from kvpool import _C

    host = BlockAllocator(2, 2, True, hash_key=KEY, max_num_blocks=1 << 16)
    core = _C.HostTier(BlockAllocator(8, 2, True, hash_key=KEY), host)
    host.grow((1 << 16) - 2)  # ids past the two the core saw at construction
    assert all(core.readable(h) for h in range(host.num_blocks))  # no copy in flight: read in bounds


def test_a_batch_is_run_once_in_the_order_popped():
    s = TierServer(num_blocks=10, num_host_blocks=32, copier=InstantCopier)
    s.serve("a", A)
    first = s.tables.pop_transfers()
    s.serve("b", B[:5])
    second = s.tables.pop_transfers()
    s.tier.run(first)
    with pytest.raises(InvalidArgumentError, match="run already"):
        s.tier.run(first)  # twice would complete its copies twice
    s.tier.run(second)
    with pytest.raises(InvalidArgumentError, match="in the order it was popped"):
        s.tier.run(first)
    s.tier.synchronize()
    assert int(sum(s.refcounts())) == 0 and s.tier.stats()["completed_offloads"] == 8


def test_a_batch_popped_but_never_run_is_run_by_the_next_run_and_loses_no_block():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=InstantCopier)
    s.serve("a", A)
    s.run_transfers()
    s.serve("b", B)  # evicts A's blocks on the GPU; the host keeps them
    s.run_transfers()
    assert s.add("a2", A) == 12
    lost = s.tables.pop_transfers()  # a server that drops the Transfers (or raised before running them)
    assert len(lost.reload_host) > 0
    s.free("a2")  # preempted: only the reloads' holds keep its blocks
    s.serve("c", [70, 71, 72])
    s.run_transfers()  # a later batch: the dropped one is run first, in order, then completed
    s.tier.synchronize()
    assert ("reload", lost.reload_host.tolist(), lost.reload_gpu.tolist()) in s.copier.calls
    assert int(sum(s.refcounts())) == 0 and int(sum(s.host_refcounts())) == 0
    assert s.allocator.num_free_blocks == 8 and s.tier.allocator.num_free_blocks == 32
    with pytest.raises(InvalidArgumentError, match="run already"):
        s.tier.run(lost)
    s.tables.allocator.check_invariants()
    s.tier.allocator.check_invariants()


class FlakyCopier(InstantCopier):
    """The next copy of kind `fail` raises before enqueueing anything (a pinned-memory or CUDA error)."""

    fail = None

    def reload(self, host_ids, gpu_ids):
        self._maybe_fail("reload")
        return super().reload(host_ids, gpu_ids)

    def offload(self, gpu_ids, host_ids):
        self._maybe_fail("offload")
        return super().offload(gpu_ids, host_ids)

    def _maybe_fail(self, kind):
        if self.fail == kind:
            self.fail = None
            raise RuntimeError("copy failed")


@pytest.mark.parametrize("fail", ["reload", "offload"])  # the offloads fail after the reloads went out
def test_a_batch_whose_copier_raised_is_retried_by_the_next_run_and_loses_no_block(fail):
    s = TierServer(num_blocks=10, num_host_blocks=32, copier=FlakyCopier)
    s.serve("a", A)
    s.run_transfers()
    s.serve("b", B)  # evicts A's tail on the GPU; the host keeps it
    s.run_transfers()
    assert s.add("a2", A) == 12
    s.add("c", [70, 71, 72])
    s.tables.mark_computed(s.tables.batch(["c"]))  # c's full block joins a2's reloads' batch as an offload
    failed = s.tables.pop_transfers()
    assert len(failed.reload_host) and len(failed.offload_gpu)
    s.copier.fail = fail
    with pytest.raises(RuntimeError, match="copy failed"):
        s.tier.run(failed)
    if fail == "reload":
        with pytest.raises(InvalidArgumentError, match="reloaded from the host"):
            s.tables.batch(["a2"])  # its blocks were never written
    s.tier.run(failed)  # retried (a later batch's run would retry it too): only what did not go out
    s.forward(["a2"])  # a2's reloaded KV is right
    s.free("a2")
    s.free("c")
    s.run_transfers()
    s.tier.synchronize()
    assert int(sum(s.refcounts())) == 0 and int(sum(s.host_refcounts())) == 0
    assert sum(c[0] == "reload" for c in s.copier.calls) == 1  # never copied twice
    s.tables.allocator.check_invariants()
    s.tier.allocator.check_invariants()


def test_run_refuses_a_batch_never_popped_and_readable_names_bad_ids():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=InstantCopier)
    with pytest.raises(InvalidArgumentError, match="serves no BlockTables"):
        HostKVTier(SimpleNamespace(block_size=2), 4, copier=InstantCopier(None, None)).readable(0)
    with pytest.raises(BlockIndexError, match="2199023255552"):
        s.tier.readable(2**41)
    s.serve("a", A)
    ids = np.array([0], np.int32)
    with pytest.raises(InvalidArgumentError, match="batch 5 was never returned by pop_transfers"):
        s.tier.run(Transfers(5, ids, ids, ids, ids))  # made up: it would copy block 0 over block 0
    assert s.copier.calls == [] and s.tier.stats()["completed_offloads"] == 0
    s.run_transfers()  # the real batch 1 still runs
    assert s.tier.stats()["completed_offloads"] == 6 and int(sum(s.refcounts())) == 0


def test_without_a_tier_the_tables_behave_as_before():
    plain = BlockTables(BlockAllocator(8, 2, hash_key=KEY), 2)
    tiered = TierServer(num_blocks=8, num_host_blocks=4, copier=InstantCopier).tables
    for tables in (plain, tiered):
        assert tables.add("a", np.array(A[:5], np.int32)) == 0
        tables.mark_computed("a")
    assert plain.blocks("a").tolist() == tiered.blocks("a").tolist()
    assert plain.host_tier is None


def test_blocks_filled_by_decode_steps_are_offloaded_too():
    s = TierServer(num_blocks=8, num_host_blocks=32, copier=InstantCopier)
    s.add("a", A[:3])
    s.forward(["a"])
    assert s.tier.stats()["offloaded_blocks"] == 1
    for token in (4, 5):  # tokens 3 and 4 fill block 1, token 5 starts block 2
        step = s.tables.decode_step(["a"], [token])
        s.tables.mark_computed(step)
    assert s.tier.stats()["offloaded_blocks"] == 2
    transfers = s.run_transfers()
    assert transfers.offload_gpu.tolist() == s.tables.blocks("a")[:2].tolist()


def test_the_default_copier_moves_a_real_caches_blocks_through_the_host():
    """HostKVTier(cache, n) with its own HostPages and BlockCopier (CPU tensors: the same code, plain copies)."""
    import torch
    from kvpool import PagedKVCache
    from test_cache import MQA_CONFIG
    cache = PagedKVCache.for_shard(MQA_CONFIG, 8, 2, 0, 1, "cpu", kv_dtype="fp32")
    tier = HostKVTier(cache, 16)
    tables = BlockTables.for_cache(BlockAllocator(8, 2, hash_key=KEY), cache, host_tier=tier)
    torch.manual_seed(0)
    tables.add("a", np.array(A, np.int32))
    tier.run(tables.pop_transfers())
    for t in cache.block_tensors():  # "the forward": every block of A gets its KV
        t[tables.blocks("a")] = torch.randn_like(t[tables.blocks("a")])
    written = [t[tables.blocks("a")[:6]].clone() for t in cache.block_tensors()]
    tables.mark_computed("a")
    tables.free("a")
    tier.run(tables.pop_transfers())  # the offloads (done at once on CPU; published at the next call)
    tier.poll()
    tables.add("b", np.array(B, np.int32))  # evicts A's blocks but the first on the GPU
    for t in cache.block_tensors():
        t[tables.blocks("b")] = 0.0
    tables.mark_computed("b")
    tables.free("b")
    tier.run(tables.pop_transfers())
    assert tables.add("a2", np.array(A, np.int32)) == 12
    tier.run(tables.pop_transfers())  # the reloads, before the forward would read them
    for before, t in zip(written, cache.block_tensors()):
        assert torch.equal(t[tables.blocks("a2")[:6]], before)
    tier.synchronize()
    assert tier.stats()["completed_reloads"] == 5
