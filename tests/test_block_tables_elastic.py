"""BlockTables.relocate_top (issue 16, item 3): held blocks at the top of an elastic pool move to free
lower ids, and every place the tables name them follows: each sequence's lists in every KV-cache group,
the copy-on-write queue, the decode-step table (re-sent in full, deltas and mirror included), the
prefix cache. C++ tables and the pure-Python twin side by side."""
import numpy as np
import pytest
import torch

from kvpool import BlockAllocator, OutOfBlocksError
from kvpool._reference import ReferenceBlockAllocator
from kvpool._reference_tables import ReferenceBlockTables
from kvpool.block_table import BlockTables

BS = 2
KEY = 11


def pair(num_blocks=8, cap=16, **kw):
    fast = BlockTables(BlockAllocator(num_blocks, BS, hash_key=KEY, max_num_blocks=cap), BS, **kw)
    twin = ReferenceBlockTables(ReferenceBlockAllocator(num_blocks, BS, hash_key=KEY, max_num_blocks=cap), BS,
                                **{k: v for k, v in kw.items() if k != "_mirror"})
    return fast, twin


def both(tables, method, *args, **kwargs):
    out = [getattr(t, method)(*args, **kwargs) for t in tables]
    return out


def test_relocation_renames_every_sequence_and_group_and_then_shrink_succeeds():
    tables = pair(num_blocks=12, cap=12, max_seqs=4, group_windows=(None, 3))
    both(tables, "add", 0, [1, 2, 3, 4, 5])  # 3 positions x 2 groups: ids 0..5
    both(tables, "add", 1, [7, 7, 7, 7, 7])  # ids 6..11
    both(tables, "free", 0)
    for t in tables:
        assert t.allocator.held_in_top(6) == 6
        src, dst = t.relocate_top(6)
        assert src.dtype == dst.dtype == torch.int64
        assert sorted(src.tolist()) == list(range(6, 12)) and sorted(dst.tolist()) == list(range(6))
        assert t.allocator.held_in_top(6) == 0
        t.allocator.shrink(6)
        assert t.allocator.num_blocks == 6
        t.allocator.check_invariants()
    fast, twin = tables
    for g in (0, 1):
        assert fast.blocks(1, g).tolist() == twin.blocks(1, g).tolist()
        assert all(b < 6 for b in fast.blocks(1, g).tolist())
    both(tables, "mark_computed", 1)  # the window releases position 0 of group 1: one free block
    for t in tables:
        t.allocator.grow(2)
    both(tables, "append", 1, 2)  # the sequence goes on: a new position, one block per group
    assert fast.blocks(1, 0).tolist() == twin.blocks(1, 0).tolist()


def test_relocation_without_room_changes_nothing_and_says_how_many_could_move():
    fast, twin = pair(num_blocks=8, cap=8, max_seqs=4)
    for t in (fast, twin):
        t.add(0, [1, 2, 3, 4, 5, 6])  # 0, 1, 2
        t.add(1, [9, 9, 9, 9, 9, 9, 9, 9, 9, 9])  # 3..7
        t.free(0)
        before = (t.blocks(1).tolist(), t.allocator.num_free_blocks)
        with pytest.raises(OutOfBlocksError, match="so 1 could move") as err:
            t.relocate_top(7)  # 5 held blocks (3..7) in the top 7 ids, and only id 0 free below them
        assert (err.value.requested, err.value.available) == (5, 1)
        assert (t.blocks(1).tolist(), t.allocator.num_free_blocks) == before


def test_the_copy_on_write_queue_follows_the_moved_blocks():
    fast, twin = pair(num_blocks=6, cap=6, max_seqs=4)
    for t in (fast, twin):
        t.add(0, [1, 2, 3])  # 0, 1 (block 1 partial)
        t.add(9, [5, 5, 5, 5, 5])  # 2, 3, 4: a placeholder below, freed to make room
        t.mark_computed(0)
        t.fork(0, 1)
        t.append(1, 1)  # copy-on-write of the shared partial block 1 into 5
        assert t.pending_copies == [(1, 5)]
        t.free(9)  # free list: 4, 3, 2 (a sequence's blocks join it in reverse order)
        src, dst = t.relocate_top(2)  # ids 4 (free) and 5 (held by seq 1 and the queue); 3 is the first below
        assert (src.tolist(), dst.tolist()) == ([5], [3])
        assert t.pending_copies == [(1, 3)] and t.blocks(1).tolist() == [0, 3]
        assert t.allocator.refcounts([3]).tolist() == [2]  # the sequence's reference and the queue's
        t.pop_copies()
        assert t.allocator.refcounts([1, 3]).tolist() == [1, 1]
        t.allocator.shrink(2)
        t.allocator.check_invariants()


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-buffers", "staged-device-path"])
def test_decode_step_rows_are_resent_after_a_relocation(mirror):
    fast, twin = pair(num_blocks=10, cap=10, max_seqs=3, max_blocks_per_seq=6, _mirror=mirror)
    for t in (fast, twin):
        t.add(0, [1, 2, 3, 4])  # 0, 1
        t.add(1, [3, 3, 3, 3, 3])  # 2, 3, 4
        t.mark_computed([0, 1])
    ids = np.array([1, 0], dtype=np.int64)  # seq 1 in row 0, where it stays
    steps = both((fast, twin), "decode_step", ids, None, 3)
    both((fast, twin), "mark_computed", *[[0, 1]])
    both((fast, twin), "free", 0)  # seq 0's 0, 1, 5 free (free list 6, 7, 8, 9, 5, 1, 0); seq 1 holds 2, 3, 4
    moved = both((fast, twin), "relocate_top", 7)
    assert [m.tolist() for m in moved[0]] == [m.tolist() for m in moved[1]] == [[3, 4], [1, 0]]
    ids = np.array([1], dtype=np.int64)
    b, f = fast.decode_step(ids, pad_batch_to=3), twin.decode_step(ids, pad_batch_to=3)
    # the same sequence in the same row: re-sent in full, not only its new entry (block 6)
    assert b.block_table[0, :4].tolist() == [2, 1, 0, 6]
    for name in ("block_table", "seq_lens", "slot_mapping", "kv_indices"):
        assert torch.equal(getattr(b, name), getattr(f, name)), name
    assert len(steps) == 2


def test_cached_prefix_moves_with_its_blocks_and_still_hits():
    fast, twin = pair(num_blocks=8, cap=8, max_seqs=4)
    prompt = [4, 5, 6, 7, 8]
    for t in (fast, twin):
        t.add(7, [1, 1, 1, 1])  # 0, 1: placeholders, freed below to make room
        t.add(0, prompt)  # 2, 3, 4
        t.mark_computed(0)  # blocks 2, 3 cached (full)
        t.free(7)
        t.relocate_top(5)  # 3, 4 -> 1, 0
        t.allocator.shrink(5)
        t.allocator.grow(1)  # room for the new sequence's last block
        hit = t.add(1, prompt)
        assert hit == 4  # the cached prefix moved with its blocks: both full blocks still hit
        assert t.blocks(1).tolist()[:2] == t.blocks(0).tolist()[:2]
    assert fast.blocks(1).tolist() == twin.blocks(1).tolist()


def test_host_tier_queued_transfers_follow_and_copies_in_flight_refuse_relocation():
    from types import SimpleNamespace

    from kvpool import InvalidArgumentError
    from kvpool.tier import HostKVTier
    from tier_util import DeferredCopier

    gpu, host = torch.zeros(8, BS, dtype=torch.int64), torch.zeros(8, BS, dtype=torch.int64)
    copier = DeferredCopier(gpu, host)
    tier = HostKVTier(SimpleNamespace(block_size=BS), 8, copier=copier)
    tables = BlockTables(BlockAllocator(8, BS, True, hash_key=KEY, max_num_blocks=8), BS, max_seqs=4,
                         host_tier=tier)
    tables.add(7, [9, 9, 9, 9])  # 0, 1: freed below to make room
    tables.add(0, [1, 2, 3, 4, 5])  # 2, 3, 4
    tables.mark_computed(0)  # full blocks 2, 3 offered to the cache: their offloads are queued
    tables.free(7)
    src, dst = tables.relocate_top(5)  # 3, 4 -> 1, 0
    assert (src.tolist(), dst.tolist()) == ([3, 4], [1, 0])
    transfers = tables.pop_transfers()
    assert transfers.offload_gpu.tolist() == [2, 1]  # the queued offload of block 3 follows it to 1
    tier.run(transfers)  # in flight: the copies read GPU blocks 2 and 1
    before = tables.blocks(0).tolist()
    with pytest.raises(InvalidArgumentError, match="2 host-tier copies in flight"):
        tables.relocate_top(7)  # the top 7 hold both blocks being read
    assert tables.blocks(0).tolist() == before == [2, 1, 0]
    copier.finish_all()
    tier.poll()  # the copies landed: their holds are released
    tables.free(0)
    tables.relocate_top(7)
    tables.allocator.shrink(7)
    assert tables.allocator.num_blocks == 1
