"""KV-cache groups in BlockTables: per-group block lists from one allocator, window freeing, prefix hits.

Issue 13 items 1-3 (the contract: docs/page_table.md "Hybrid models"). A group of window W releases block j
of a sequence once ``(j + 1) * block_size <= num_computed - W + 1``; every call stays all or nothing across
groups; a prefix hit of h blocks needs every full group's blocks 0..h-1 and each windowed group's blocks of
tokens ``[h * bs - W + 1, h * bs)``, and a block never serves another group.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool import BlockAllocator, BlockIndexError, InvalidArgumentError, OutOfBlocksError
from kvpool._C import group_context, group_hash
from kvpool.block_table import BlockTables

BS = 4
TWO = (None, 6)                      # one full group, one window of 6 tokens (not a multiple of BS)
SEVEN = (8,) * 6 + (None,)           # Gemma-3-like: six local groups (window 2 blocks) and one global


def tables_for(windows, num_blocks=256, **kw):
    kw.setdefault("max_seqs", 8)
    kw.setdefault("max_blocks_per_seq", 32)
    alloc = BlockAllocator(num_blocks, BS, hash_key=7)
    return BlockTables(alloc, BS, group_windows=windows, **kw), alloc


def released_before(window, num_computed):
    """Positions a group of `window` has released at num_computed (the spec's rule)."""
    return 0 if window is None else max(0, num_computed - window + 1) // BS


def check_lists(tables, seq_id):
    """Every group's list: -1 exactly below the released bound, held blocks elsewhere."""
    n = tables.num_computed(seq_id)
    positions = -(-tables.num_tokens(seq_id) // BS)
    for g, w in enumerate(tables.group_windows):
        blocks = tables.blocks(seq_id, g)
        assert len(blocks) == positions
        cut = released_before(w, n)
        assert (blocks[:cut] == -1).all() and (blocks[cut:] >= 0).all(), (g, w, n, blocks)


def held_ids(tables, seq_ids):
    return [b for s in seq_ids for g in range(tables.num_groups) for b in tables.blocks(s, g) if b >= 0]


def state(tables, alloc, seq_ids):
    """Everything an all-or-nothing failure must leave as it was."""
    lists = {(s, g): tables.blocks(s, g).tolist() for s in seq_ids for g in range(tables.num_groups)}
    counts = {s: (tables.num_tokens(s), tables.num_computed(s)) for s in seq_ids}
    return lists, counts, alloc.num_free_blocks, alloc.stats(), list(tables.pending_copies)


# ---- per-group tables and slots ------------------------------------------------------------------

@pytest.mark.parametrize("windows", [TWO, SEVEN], ids=["2-groups", "7-groups"])
def test_each_group_has_its_own_blocks_tables_and_slots(windows):
    tables, alloc = tables_for(windows)
    g_count = len(windows)
    prompts = {0: np.arange(13), 1: np.arange(100, 106)}
    for s, p in prompts.items():
        assert tables.add(s, p) == 0
    ids = held_ids(tables, prompts)
    assert len(ids) == len(set(ids)) == g_count * (4 + 2)  # every group draws its own ids from the one pool
    assert alloc.num_free_blocks == 256 - len(ids)
    assert tables.append(0, 2).shape == (g_count, 2)
    b = tables.batch([0, 1], num_new_tokens=[9, 6])
    assert b.block_table.shape == (g_count, 2, 3) and b.slot_mapping.shape == (g_count, 15)
    assert b.seq_lens.tolist() == [9, 6] and b.query_start_loc.tolist() == [0, 9, 15]
    for g in range(g_count):
        one = b.group(g)
        assert one.block_table.shape == (2, 3) and one.slot_mapping.shape == (15,)
        blocks = {s: tables.blocks(s, g) for s in prompts}
        assert one.block_table.tolist() == [blocks[0][:3].tolist(), blocks[1][:2].tolist() + [0]]
        slots = [blocks[s][p // BS] * BS + p % BS for s, n in ((0, 9), (1, 6)) for p in range(n)]
        assert one.slot_mapping.tolist() == slots
        assert one.kv_indptr.tolist() == [0, 3, 5] and one.kv_last_page_len.tolist() == [1, 2]
        assert one.kv_indices.tolist() == blocks[0][:3].tolist() + blocks[1][:2].tolist()
        assert torch.equal(b.kv_indices[g], one.kv_indices) and torch.equal(b.kv_indptr[g], one.kv_indptr)
    with pytest.raises(InvalidArgumentError, match="group"):
        b.group(g_count)


def test_one_group_keeps_todays_shapes_and_group_0_is_the_batch():
    tables, _ = tables_for((None,))
    plain, _ = tables_for(None)
    for t in (tables, plain):
        t.add(0, np.arange(9))
        assert t.append(0).shape == (1,)
        b = t.batch([0])
        assert b.block_table.shape == (1, 3) and b.slot_mapping.shape == (10,) and b.group(0) is b
    assert tables.group_windows == plain.group_windows == (None,) and tables.num_groups == 1


@pytest.mark.parametrize("bad", [(), [0], (None, -3), (None, 2.5), (True,), "full"])
def test_bad_group_windows_are_refused(bad):
    with pytest.raises(InvalidArgumentError, match="group_windows"):
        tables_for(bad)


# ---- window freeing ------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, BS, 2 * BS, BS + 1, 2 * BS - 1, 3 * BS + 2])
def test_release_rule_at_every_computed_length(window):
    """Block j goes back exactly when (j + 1) * bs <= num_computed - W + 1, one token at a time."""
    tables, alloc = tables_for((None, window))
    tables.add("s", 1)
    tables.mark_computed("s")
    for n in range(2, 41):
        tables.append("s")
        tables.mark_computed("s")
        check_lists(tables, "s")
        held = -(-n // BS) + (-(-n // BS) - released_before(window, n))
        assert alloc.num_free_blocks == 256 - held


@pytest.mark.parametrize("windows", [TWO, SEVEN, (5, 9)], ids=["2-groups", "7-groups", "windows-only"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_windowed_groups_stay_within_the_bound_after_every_step(windows, data):
    tables, alloc = tables_for(windows, num_blocks=512)
    prompt = data.draw(st.integers(1, 60))
    tables.add("s", np.arange(prompt))

    def check_bound():
        check_lists(tables, "s")
        computed = -(-tables.num_computed("s") // BS)  # positions holding computed tokens
        for g, w in enumerate(windows):
            if w is not None:  # at most ceil((W - 1) / bs) + 1 blocks of computed tokens, however long
                assert (tables.blocks("s", g)[:computed] >= 0).sum() <= -(-(w - 1) // BS) + 1

    while tables.num_computed("s") < prompt:  # chunked prefill
        todo = prompt - tables.num_computed("s")
        tables.mark_computed(tables.batch(["s"], num_new_tokens=[data.draw(st.integers(1, todo))]))
        check_bound()
    for _ in range(data.draw(st.integers(0, 30))):
        tables.mark_computed(tables.decode_step(["s"], [3]))
        check_bound()
    tables.free("s")
    alloc.check_invariants()
    assert alloc.num_free_blocks == 512  # nothing leaks


def test_chunked_prefill_releases_early_blocks_as_chunks_are_written():
    tables, alloc = tables_for(TWO)
    tables.add("long", np.arange(40))  # 10 positions x 2 groups
    assert alloc.num_free_blocks == 256 - 20
    freed = []
    for chunk in (8, 8, 8, 16):
        tables.mark_computed(tables.batch(["long"], num_new_tokens=[chunk]))
        freed.append(alloc.num_free_blocks - (256 - 20))
    # window 6 releases block j once (j + 1) * 4 <= computed - 5: none at 8, 0-1 at 16, 0-3 at 24, 0-7 at 40
    assert freed == [0, 2, 4, 8]
    assert tables.blocks("long", 1).tolist()[:8] == [-1] * 8 and (tables.blocks("long", 0) >= 0).all()
    b = tables.batch(["long"], num_new_tokens=[0])
    assert b.group(1).block_table[0, :8].tolist() == [0] * 8  # released positions are padding to the kernels


def test_released_blocks_stay_cached_and_free():
    tables, alloc = tables_for(TWO)
    tables.add("s", np.arange(24))
    tables.mark_computed("s")
    assert alloc.num_cached_blocks == 2 * 6
    released = [b for b in tables.blocks("s", 1) if b >= 0]
    assert len(released) == 2 and alloc.refcounts(released).tolist() == [1, 1]
    assert (alloc.num_free_blocks, alloc.num_cached_blocks) == (256 - 6 - 2, 12)


def test_decode_step_zeroes_released_entries_at_fixed_addresses():
    """The persistent table gets the zeroed entries as deltas; the staged device path equals the host one."""
    built = [tables_for(TWO, max_seqs=4, max_blocks_per_seq=16, _mirror=m)[0] for m in (False, True)]
    for t in built:
        for s in range(3):
            t.add(s, np.arange(5 + 3 * s) + s)
        t.mark_computed(list(range(3)))
    ptrs = None
    for step in range(14):
        order = np.array([0, 1, 2] if step < 7 else [2, 0, 1])
        steps = [t.decode_step(order, np.full(3, step), pad_batch_to=4) for t in built]
        for b in steps:
            assert b.block_table.shape == (2, 4, 16) and b.slot_mapping.shape == (2, 4)
            assert b.group(1).block_table.shape == (4, 16) and b.group(1).slot_mapping.shape == (4,)
        host, staged = steps
        p = tuple(t.data_ptr() for t in (staged.group(0).block_table, staged.group(1).block_table,
                                         staged.group(1).slot_mapping, staged.seq_lens))
        assert p == (ptrs or p)
        ptrs = p
        assert torch.equal(host.block_table, staged.block_table) and torch.equal(host.slot_mapping, staged.slot_mapping)
        for row, s in enumerate(order):
            for g in range(2):
                blocks = built[0].blocks(int(s), g)
                assert host.block_table[g, row, :len(blocks)].tolist() == np.maximum(blocks, 0).tolist()
                assert not host.block_table[g, row, len(blocks):].any()
        assert not host.block_table[:, 3].any() and host.slot_mapping[:, 3].tolist() == [-1, -1]
        for t, b in zip(built, steps):
            t.mark_computed(b)
    assert built[1].last_step_h2d_bytes >= 4 * (4 * 4 + 1)


def test_decode_step_equals_append_then_decode_batch_in_every_group():
    a, _ = tables_for(SEVEN)
    b, _ = tables_for(SEVEN)
    for t in (a, b):
        for s in range(3):
            t.add(s, np.arange(11 + s))
        t.mark_computed([0, 1, 2])
    for _ in range(6):
        step = a.decode_step(np.arange(3), [5, 6, 7])
        for s, tok in zip(range(3), [5, 6, 7]):
            b.append(s, 1, [tok])
        ref = b.decode_batch([0, 1, 2])
        width = ref.block_table.shape[-1]
        assert torch.equal(step.block_table[:, :, :width], ref.block_table)
        assert torch.equal(step.slot_mapping, ref.slot_mapping) and torch.equal(step.kv_indices, ref.kv_indices)
        a.mark_computed(step)
        b.mark_computed(ref)


# ---- fork, copy-on-write, preemption, all or nothing ---------------------------------------------

def test_fork_shares_every_group_and_copies_each_shared_tail():
    tables, alloc = tables_for(TWO)
    tables.add("p", np.arange(14))
    tables.mark_computed("p")  # window 6 at 14: positions 0-1 released in group 1
    tables.fork("p", "c")
    for g in range(2):
        assert tables.blocks("c", g).tolist() == tables.blocks("p", g).tolist()
    held = [b for g in range(2) for b in tables.blocks("p", g) if b >= 0]
    assert alloc.refcounts(held).tolist() == [2] * len(held)
    tails = [tables.blocks("p", g)[-1] for g in range(2)]
    slots = tables.append("c", 1)
    copies = tables.pending_copies
    assert [src for src, _ in copies] == tails  # one copy per group: each group's shared partial tail
    assert [tables.blocks("c", g)[-1] for g in range(2)] == [dst for _, dst in copies]
    assert slots[:, 0].tolist() == [dst * BS + 14 % BS for _, dst in copies]
    tables.pop_copies()
    tables.mark_computed("c")
    tables.append("p", 1)  # the parent's tails are its own again: no copy
    assert tables.pending_copies == []
    for s in ("p", "c"):
        tables.free(s)
    alloc.check_invariants()
    assert alloc.num_free_blocks == 256


def test_preemption_frees_every_group_and_readding_hits_the_prefix():
    tables, alloc = tables_for(SEVEN)
    prompt = np.arange(30)
    tables.add("r", prompt)
    tables.mark_computed("r")
    tables.mark_computed(tables.decode_step(["r"], [1]))
    tables.free("r")  # preempted
    assert alloc.num_free_blocks == 256
    hit = tables.add("r", np.concatenate([prompt, [1]]))
    assert hit == 28  # (31 - 1) // 4 = 7 blocks in every group that needs them
    check_lists(tables, "r")


@pytest.mark.parametrize("windows", [TWO, (None, 4, 8)])
@pytest.mark.parametrize("call", ["add", "append_batch", "decode_step", "copy_on_write"])
def test_out_of_blocks_leaves_every_group_unchanged(windows, call):
    tables, alloc = tables_for(windows, num_blocks=40)
    g = len(windows)
    tables.add(0, np.arange(8))       # full last block: its next token opens a position in every group
    tables.add(1, np.arange(50, 59))  # partial last block: its next token needs no block (unless shared)
    tables.mark_computed([0, 1])
    seqs = [0, 1]
    if call == "copy_on_write":
        tables.fork(1, 2)
        seqs.append(2)
    need = 2 * g if call == "add" else g  # every group needs its block (or its copy)
    alloc.allocate(alloc.num_free_blocks - need + 1)
    before = state(tables, alloc, seqs)
    with pytest.raises(OutOfBlocksError) as err:
        if call == "add":
            tables.add(3, np.arange(200, 205))  # no prefix hit: 2 positions x G
        elif call == "append_batch":
            tables.append_batch([1, 0], 1)
        elif call == "decode_step":
            tables.decode_step([1, 0], [1, 2], pad_batch_to=2)
        else:
            tables.append(2, 1)  # both groups' shared tails need copies
    assert (err.value.requested, err.value.available) == (need, need - 1)
    assert state(tables, alloc, seqs) == before
    alloc.check_invariants()


# ---- prefix hits across groups -------------------------------------------------------------------

def _serve(tables, seq_id, prompt, decode=()):
    hit = tables.add(seq_id, prompt)
    tables.mark_computed(seq_id)
    for tok in decode:
        tables.mark_computed(tables.decode_step([seq_id], [tok]))
    return hit


def test_a_windowed_group_needs_only_its_window_for_a_hit_even_after_eviction():
    tables, alloc = tables_for(TWO, num_blocks=22)  # exactly one 41-token request: 11 positions x 2 groups
    prompt = np.arange(41)
    _serve(tables, "a", prompt)  # the window (6) released blocks 0-8 of group 1: cached, free, oldest first
    tables.free("a")
    taken = alloc.allocate(8)  # evicts the 8 least recently freed blocks: group 1's blocks 0-7
    assert alloc.stats()["evictions"] == 8
    alloc.free(taken)
    hit = tables.add("b", prompt)
    assert hit == 40  # full group: blocks 0-9 verified; window 6 at 40 tokens: blocks 8-9 only
    assert tables.blocks("b", 1)[:8].tolist() == [-1] * 8
    assert alloc.stats()["prefix_hit_blocks"] == 10 + 2


def test_without_a_full_group_a_windowed_hit_needs_its_whole_chain():
    tables, alloc = tables_for((6,), num_blocks=12)
    prompt = np.arange(41)
    _serve(tables, "a", prompt)
    tables.free("a")
    assert tables.add("b", prompt) == 40  # its own chain, blocks 0-9, all still cached
    assert tables.blocks("b", 0)[:8].tolist() == [-1] * 8  # but only the window's blocks are taken
    tables.free("b")
    evictions = alloc.stats()["evictions"]
    taken = alloc.allocate(1)  # the least recently freed block: block 0 of the chain (released first)
    assert alloc.stats()["evictions"] == evictions + 1
    alloc.free(taken)
    assert tables.add("c", prompt) == 0  # the chain is broken at its first block


def test_the_hit_is_the_largest_every_group_can_serve():
    """A windowed block missing inside the window of h lowers the hit to the next h every group serves."""
    tables, alloc = tables_for((None, 9), num_blocks=64)
    prompt = np.arange(45)  # 11 matchable blocks
    _serve(tables, "a", prompt)
    tables.free("a")
    # Replace group 1's cached block 10 (free) by other content under its hash: that block alone is gone.
    key = alloc.hash_key
    k0, k1 = key & (2**64 - 1), key >> 64
    h10 = group_hash(int(alloc.hash_tokens(prompt[:44])[10]), 1, k0, k1)
    other = alloc.allocate(1)
    alloc.cache_blocks_verified(other, [h10], [9, 9, 9, 9], group_context(0, 1, k0, k1), 0)
    collisions = alloc.stats()["hash_collisions"]
    # h = 11 needs group 1's blocks 9-10 (tokens 36..43): block 10 misses; h = 10 needs blocks 8-9: cached
    assert tables.add("b", prompt) == 40
    assert alloc.stats()["hash_collisions"] == collisions + 1
    assert (tables.blocks("b", 1)[:8] == -1).all() and (tables.blocks("b", 1)[8:] >= 0).all()
    alloc.free(other)


def test_per_group_hashes_and_salts():
    key = (0x1234, 0x5678)
    assert group_hash(99, 0, *key) == 99 and group_context(7, 0, *key) == 7
    hashes = {group_hash(99, g, *key) for g in range(1, 8)} | {99}
    contexts = {group_context(7, g, *key) for g in range(1, 8)} | {7}
    assert len(hashes) == len(contexts) == 8
    assert group_hash(99, 1, *key) != group_hash(99, 1, 0x1235, 0x5678)  # keyed


@pytest.mark.parametrize("windows", [(None, None), (None, 6), (6, None, 10)])
def test_a_block_never_serves_another_group_even_with_a_constant_hash(windows):
    tables, alloc = tables_for(windows, num_blocks=128, _hash_bits=0)  # every block hash is 0
    prompt = np.arange(21)
    _serve(tables, "a", prompt)
    owner = {b: g for g in range(len(windows)) for b in tables.blocks("a", g) if b >= 0}
    tables.free("a")
    tables.add("b", prompt)
    for g in range(len(windows)):
        for b in tables.blocks("b", g):
            assert b < 0 or owner.get(b, g) == g, (g, b)
    assert alloc.stats()["hash_collisions"] >= 1
    alloc.check_invariants()


@pytest.mark.parametrize("windows", [TWO, (None, 5, 9), (5, 9)], ids=["2-groups", "3-groups", "windows-only"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_random_prompts_with_weak_hashes_only_ever_hit_their_own_kv(windows, data):
    """Every hit block of group g holds exactly what group g computed for the same prefix (tiny hash space)."""
    tables, alloc = tables_for(windows, num_blocks=40, _hash_bits=data.draw(st.sampled_from([0, 2, 64])))
    content = {}  # block -> (group, tokens up to the block's end) when its KV was written
    live = []
    for step in range(data.draw(st.integers(1, 12))):
        if live and data.draw(st.booleans()):
            tables.free(live.pop(data.draw(st.integers(0, len(live) - 1))))
            continue
        prompt = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=24))
        try:
            hit = tables.add(step, prompt)
        except OutOfBlocksError:
            continue
        live.append(step)
        lists = [tables.blocks(step, g) for g in range(len(windows))]
        for g, blocks in enumerate(lists):
            for j, b in enumerate(blocks[: hit // BS]):
                if b >= 0:
                    assert content[b] == (g, tuple(prompt[: (j + 1) * BS])), (g, j, b)
        tables.mark_computed(step)  # the forward wrote every block of the lists (a window then released some)
        for g, blocks in enumerate(lists):
            for j, b in enumerate(blocks):
                if b >= 0 and (j + 1) * BS <= len(prompt):
                    content[b] = (g, tuple(prompt[: (j + 1) * BS]))
    for s in live:
        tables.free(s)
    alloc.check_invariants()
    assert alloc.num_free_blocks == 40


# ---- the allocator calls behind it ---------------------------------------------------------------

def _cached_run(alloc, tokens, parent=0):
    """Caches len(tokens) // BS fresh blocks as one chain; returns (ids, hashes, per-block chain values)."""
    hashes = alloc.hash_tokens(tokens)
    ids = alloc.allocate(len(hashes))
    chains = alloc.cache_blocks_chained(ids, hashes, tokens[: len(hashes) * BS], 0, parent)
    return ids, hashes, chains


def test_probes_take_nothing_and_take_cached_is_all_or_nothing():
    alloc = BlockAllocator(16, BS, hash_key=3)
    tokens = np.arange(12)
    ids, hashes, chains = _cached_run(alloc, tokens)
    alloc.free(ids)
    found, stamps, collided = alloc.probe_chain(hashes, tokens)
    assert found.tolist() == ids.tolist() and stamps.tolist() == chains.tolist() and not collided
    assert alloc.refcounts(ids).tolist() == [0, 0, 0]  # a probe takes no reference
    # anchored: block j verified against the chain value before it, checked from the end
    parents = np.array([0, chains[0], 12345], dtype=np.uint64)  # block 2's parent is wrong
    run, _, _ = alloc.probe_anchored(hashes, tokens, 0, parents)
    assert len(run) == 0
    run, run_stamps, _ = alloc.probe_anchored(hashes[:2], tokens[:8], 0, parents[:2])
    assert run.tolist() == ids[:2].tolist() and run_stamps.tolist() == chains[:2].tolist()
    before = (alloc.num_free_blocks, alloc.stats())
    with pytest.raises(OutOfBlocksError) as err:
        alloc.take_cached(found, stamps, 14)  # 16 free, 3 of them revived: 13 fresh at most
    assert (err.value.requested, err.value.available) == (14, 13)
    assert (alloc.num_free_blocks, alloc.stats()) == before
    fresh = alloc.take_cached(found, stamps, 13, query_blocks=3)
    assert len(fresh) == 13 and alloc.num_free_blocks == 0
    assert alloc.stats()["prefix_hit_blocks"] == 3 and alloc.stats()["prefix_query_blocks"] == 3
    alloc.check_invariants()


def test_take_cached_refuses_a_block_evicted_since_its_probe():
    alloc = BlockAllocator(4, BS, hash_key=3)
    tokens = np.arange(8)
    ids, hashes, _ = _cached_run(alloc, tokens)
    alloc.free(ids)
    found, stamps, _ = alloc.probe_chain(hashes, tokens)
    taken = alloc.allocate(4)  # evicts both
    alloc.free(taken)
    _cached_run(alloc, tokens)  # cached again: same content, new stamps
    before = (alloc.num_free_blocks, alloc.stats())
    assert alloc.take_cached(found, stamps, 0) is None
    assert (alloc.num_free_blocks, alloc.stats()) == before


@pytest.mark.parametrize("call, error", [
    (lambda a, i, s: a.take_cached([i[0], i[0]], [s[0], s[0]], 0), "listed twice"),
    (lambda a, i, s: a.take_cached(i, s[:1], 0), "stamps"),
    (lambda a, i, s: a.take_cached(i, s, -1), "n=-1"),
    (lambda a, i, s: a.take_cached(i, s, 0, query_blocks=-2), "query_blocks"),
    (lambda a, i, s: a.probe_anchored([1, 2], np.arange(8), 0, [0]), "parents"),
    (lambda a, i, s: a.probe_chain([1, 2], np.arange(7)), "token ids"),
    (lambda a, i, s: a.cache_blocks_anchored(i[:1], [5], np.arange(4), 0, [0, 0]), "parents"),
])
def test_group_calls_refuse_bad_input_and_change_nothing(call, error):
    alloc = BlockAllocator(8, BS, hash_key=3)
    ids, hashes, _ = _cached_run(alloc, np.arange(8))
    _, stamps, _ = alloc.probe_chain(hashes, np.arange(8))
    before = (alloc.refcounts(ids).tolist(), alloc.num_free_blocks, alloc.stats())
    with pytest.raises(InvalidArgumentError, match=error):
        call(alloc, ids, stamps)
    assert (alloc.refcounts(ids).tolist(), alloc.num_free_blocks, alloc.stats()) == before
    with pytest.raises(BlockIndexError):
        alloc.take_cached([99], [1], 0)


def test_anchored_entries_skip_broken_parents_and_chained_ones_report_each_chain():
    alloc = BlockAllocator(8, BS, hash_key=3)
    tokens = np.arange(8)
    ids, hashes, chains = _cached_run(alloc, tokens)
    assert chains[-1] == alloc.cache_blocks_verified(ids, hashes, tokens)  # cached already: the same chain
    other = alloc.allocate(2)
    broken = 2**64 - 1
    alloc.cache_blocks_anchored(other, [77, 78], np.arange(100, 108), 9, [chains[0], broken])
    assert alloc.num_cached_blocks == 3  # the block without its anchor stays uncached
    run, _, _ = alloc.probe_anchored([77], np.arange(100, 104), 9, [chains[0]])
    assert run.tolist() == [other[0]]


# ---- every refcount matches its holders, whatever the calls ----------------------------------------

def check_holders(tables, alloc, live):
    """Each block's refcount = the (sequence, group, position) entries holding it + the copy queue's."""
    holders = {}
    for s in live:
        for g in range(tables.num_groups):
            for b in tables.blocks(s, g):
                if b >= 0:
                    holders[int(b)] = holders.get(int(b), 0) + 1
    for src, dst in tables.pending_copies:
        holders[src] = holders.get(src, 0) + 1
        holders[dst] = holders.get(dst, 0) + 1
    ids = np.arange(alloc.num_blocks)
    expected = np.array([holders.get(int(b), 0) for b in ids])
    assert alloc.refcounts(ids).tolist() == expected.tolist()
    alloc.check_invariants()


@pytest.mark.parametrize("windows", [TWO, (None, 5, 9), (6,)], ids=["2-groups", "3-groups", "window-only"])
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "append", "step", "chunk", "fork", "free", "copies"]),
                              st.integers(0, 10**6)), max_size=30))
def test_random_calls_keep_every_refcount_equal_to_its_holders(windows, ops):
    tables, alloc = tables_for(windows, num_blocks=48, max_seqs=4, max_blocks_per_seq=16)
    live, next_id = [], 0
    for op, r in ops:
        try:
            if op == "add" or not live:
                tables.add(next_id, [t % 3 for t in range(r % 7, r % 7 + 1 + r % 23)])
                live.append(next_id)
                next_id += 1
            else:
                s = live[r % len(live)]
                if op == "append":
                    tables.append(s, 1 + r % 5, [r % 3] * (1 + r % 5))
                elif op == "step" and tables.num_computed(s) == tables.num_tokens(s):
                    tables.mark_computed(tables.decode_step([s], [r % 3]))
                elif op == "chunk" and tables.num_computed(s) < tables.num_tokens(s):
                    todo = tables.num_tokens(s) - tables.num_computed(s)
                    tables.mark_computed(tables.batch([s], num_new_tokens=[1 + r % todo]))
                elif op == "fork" and tables.num_computed(s) == tables.num_tokens(s) and len(live) < 4:
                    tables.fork(s, next_id)
                    live.append(next_id)
                    next_id += 1
                elif op == "free":
                    tables.free(s)
                    live.remove(s)
                elif op == "copies":
                    tables.pop_copies()
        except (OutOfBlocksError, InvalidArgumentError):
            pass  # all or nothing: the check below sees the state as it was
        check_holders(tables, alloc, live)
        for s in live:
            check_lists(tables, s)
    tables.pop_copies()
    for s in live:
        tables.free(s)
    assert alloc.num_free_blocks == 48


def test_for_cache_takes_the_caches_groups():
    from kvpool import BlockAllocator, PagedKVCache
    from kvpool.errors import InvalidArgumentError
    from kvpool.plan import load_model_spec

    spec = load_model_spec("gemma-2-9b")  # 21 local + 21 global layers: 2 groups sharing 21 slots
    cache = PagedKVCache.for_shard(spec, 8, 16, 0, 8, "cpu", kv_dtype="fp16")
    tables = BlockTables.for_cache(BlockAllocator(8, 16), cache, max_seqs=4)
    assert tables.group_windows == cache.kv_groups.windows == (4096, None) and tables.block_size == 16
    with pytest.raises(InvalidArgumentError, match="takes the KV-cache groups from the cache"):
        BlockTables.for_cache(BlockAllocator(8, 16), cache, group_windows=(None,))


@pytest.mark.parametrize("twin", [False, True])
def test_a_window_only_sequence_cannot_outgrow_the_decode_tables_width(twin):
    """Windowed groups release what leaves the window, so a sequence's positions can outgrow the pool; the decode
    table (width = the pool by default) must then refuse it, not drop its newest block from the row (a kernel
    would read past the row). Regression: the C++ table silently truncated the row at 7 positions of 6."""
    from kvpool._reference import ReferenceBlockAllocator
    from kvpool._reference_tables import ReferenceBlockTables

    if twin:
        bt = ReferenceBlockTables(ReferenceBlockAllocator(6, 4, False), 4, max_seqs=4, group_windows=(6,))
    else:
        bt = BlockTables(BlockAllocator(6, 4, enable_prefix_caching=False), 4, max_seqs=4, group_windows=(6,))
    bt.add(0, 24)
    bt.mark_computed([0])
    assert bt.blocks(0, 0).tolist() == [-1, -1, -1, -1, 4, 5]  # 6 positions, 2 blocks held
    for call in (lambda: bt.decode_step([0], [1]), lambda: bt.append_batch([0], 1)):
        with pytest.raises(InvalidArgumentError, match="more than max_blocks_per_seq=6"):
            call()
    assert bt.num_tokens(0) == 24 and bt.blocks(0, 0).tolist() == [-1, -1, -1, -1, 4, 5]
    wide = BlockTables(BlockAllocator(6, 4, enable_prefix_caching=False), 4, max_seqs=4, group_windows=(6,),
                       max_blocks_per_seq=64) if not twin else None
    if wide is not None:  # a width that covers the positions: the sequence goes on holding 2-3 blocks
        wide.add(0, 24)
        wide.mark_computed([0])
        for step in range(12):
            wide.mark_computed(wide.decode_step([0], [1]))
        assert wide.num_tokens(0) == 36 and (wide.blocks(0, 0) >= 0).sum() <= 3
