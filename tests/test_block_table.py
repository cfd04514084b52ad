"""BlockTables: sequence operations, batch tensors vs a direct construction, copy-on-write isolation.

Every test runs on the C++-backed `BlockTables` and on its pure-Python twin `ReferenceBlockTables`
(over the pure-Python allocator, and over the C++ one).
"""
import random

import numpy as np
import pytest
import torch

from kvpool._reference import ReferenceBlockAllocator
from kvpool.allocator import BlockAllocator
from kvpool._reference_tables import ReferenceBlockTables
from kvpool.block_table import BLOCK_TABLE_PAD, SLOT_PAD, BatchTables, BlockTables
from kvpool.errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError
from kvpool.kernels.reference import copy_blocks_reference, gather_kv_reference, write_kv_reference

class Impl:
    """One implementation under test: an allocator class and the block-table class that goes with it."""

    def __init__(self, allocator, tables):
        self.allocator, self.tables = allocator, tables


IMPLS = {
    "cpp": Impl(BlockAllocator, BlockTables),
    "reference": Impl(ReferenceBlockAllocator, ReferenceBlockTables),
    "reference-tables-cpp-allocator": Impl(BlockAllocator, ReferenceBlockTables),
}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


def direct_tables(bt: BlockTables, seq_ids, num_new):
    """The batch tensors built element by element from each sequence's block list."""
    bs = bt.block_size
    lens = [bt.num_computed(s) + n for s, n in zip(seq_ids, num_new)]
    nblocks = [-(-n // bs) for n in lens]
    table = np.full((len(seq_ids), max(nblocks)), BLOCK_TABLE_PAD, dtype=np.int32)
    indptr, indices, last, slots, qsl = [0], [], [], [], [0]
    for i, s in enumerate(seq_ids):
        blocks = bt.blocks(s)
        for j in range(nblocks[i]):
            table[i, j] = blocks[j]
            indices.append(blocks[j])
        indptr.append(len(indices))
        last.append(lens[i] - bs * (nblocks[i] - 1))
        for pos in range(bt.num_computed(s), lens[i]):
            slots.append(blocks[pos // bs] * bs + pos % bs)
        qsl.append(len(slots))
    return dict(block_table=table, seq_lens=np.array(lens), kv_indptr=np.array(indptr),
                kv_indices=np.array(indices), kv_last_page_len=np.array(last),
                slot_mapping=np.array(slots), query_start_loc=np.array(qsl))


def assert_batch_matches(batch: BatchTables, expected: dict):
    for name, want in expected.items():
        got = getattr(batch, name)
        assert got.dtype == torch.int32, name
        np.testing.assert_array_equal(got.cpu().numpy(), want.astype(np.int32).reshape(got.shape), err_msg=name)
    lens = expected["seq_lens"]
    assert batch.num_new_tokens == int((expected["slot_mapping"] >= 0).sum())
    assert batch.max_seq_len == lens.max()
    assert batch.seq_lens_host.tolist() == lens.tolist()


def held_blocks(bt: BlockTables, seq_ids):
    counts = {}
    for s in seq_ids:
        for b in bt.blocks(s).tolist():
            counts[b] = counts.get(b, 0) + 1
    return counts


# --------------------------------------------------------------------------- unit behaviour
def test_add_allocates_and_batch_matches_direct(impl):
    alloc = impl.allocator(32, block_size=4)
    bt = impl.tables(alloc, 4, "cpu", max_seqs=8)
    assert bt.add("a", np.arange(10)) == 0
    assert bt.add("b", np.arange(100, 104)) == 0
    assert bt.add("c", 1) == 0  # a token count: no hashing
    assert [len(bt.blocks(s)) for s in "abc"] == [3, 1, 1]
    assert alloc.num_free_blocks == 32 - 5
    batch = bt.batch(["a", "b", "c"])
    assert_batch_matches(batch, direct_tables(bt, ["a", "b", "c"], [10, 4, 1]))
    np.testing.assert_array_equal(batch.kv_last_page_len.numpy(), [2, 4, 1])
    # length formula: seq_len = block_size * (n_blocks - 1) + last_page_len
    n = np.diff(batch.kv_indptr.numpy())
    np.testing.assert_array_equal(4 * (n - 1) + batch.kv_last_page_len.numpy(), batch.seq_lens.numpy())


def test_append_returns_slots_and_allocates_on_boundary(impl):
    alloc = impl.allocator(16, block_size=4)
    bt = impl.tables(alloc, 4, "cpu")
    bt.add(7, np.arange(3))
    bt.mark_computed(7)
    slots = bt.append(7)  # fills the first block
    blocks = bt.blocks(7)
    assert len(blocks) == 1 and slots.tolist() == [blocks[0] * 4 + 3]
    slots = bt.append(7, 6)  # positions 4..9 -> two more blocks
    blocks = bt.blocks(7)
    assert len(blocks) == 3
    assert slots.tolist() == [blocks[p // 4] * 4 + p % 4 for p in range(4, 10)]
    assert bt.num_tokens(7) == 10 and bt.num_computed(7) == 3
    batch = bt.batch([7])
    np.testing.assert_array_equal(batch.slot_mapping.numpy(), np.r_[bt.blocks(7)[0] * 4 + 3, slots])


def test_prefix_hits_never_cover_the_whole_prompt(impl):
    alloc = impl.allocator(32, block_size=4)
    bt = impl.tables(alloc, 4, "cpu")
    prompt = np.arange(8)  # exactly two full blocks
    assert bt.add("a", prompt) == 0
    assert bt.add("early", prompt) == 0  # a's blocks are not written yet: nothing cached
    bt.mark_computed("a")
    assert alloc.num_cached_blocks == 2
    assert bt.add("b", prompt) == 4  # last token must be recomputed: only the first block hits
    assert bt.blocks("b")[0] == bt.blocks("a")[0] and bt.blocks("b")[1] != bt.blocks("a")[1]
    assert bt.add("c", np.arange(9)) == 8  # one token past: both blocks hit
    np.testing.assert_array_equal(bt.blocks("c")[:2], bt.blocks("a"))
    assert bt.num_computed("c") == 8
    batch = bt.batch(["c"])  # only the uncomputed token is new
    assert batch.num_new_tokens == 1 and batch.seq_lens.tolist() == [9]
    assert bt.add("salted", np.arange(9), extra="lora-1") == 0
    assert alloc.refcounts(bt.blocks("a")).tolist() == [3, 2]


def test_prefix_stays_cached_longest_after_free(impl):
    alloc = impl.allocator(4, block_size=4)
    bt = impl.tables(alloc, 4, "cpu")
    bt.add("a", np.arange(16))
    bt.mark_computed("a")
    first_blocks = bt.blocks("a")
    bt.free("a")
    assert alloc.num_free_blocks == 4
    bt.add("x", 5)  # two blocks: evicts a's LAST two blocks, not its prefix
    assert set(bt.blocks("x").tolist()) == set(first_blocks[2:].tolist())
    bt.free("x")
    assert bt.add("b", np.arange(9)) == 8
    np.testing.assert_array_equal(bt.blocks("b")[:2], first_blocks[:2])


def test_fork_copy_on_write(impl):
    alloc = impl.allocator(16, block_size=4)
    bt = impl.tables(alloc, 4, "cpu")
    bt.add("p", np.arange(6))
    bt.mark_computed("p")
    bt.fork("p", "c")
    shared = bt.blocks("p")
    np.testing.assert_array_equal(bt.blocks("c"), shared)
    assert alloc.refcounts(shared).tolist() == [2, 2]
    slot = bt.append("p")  # writes into the shared partial block -> copy
    p_blocks = bt.blocks("p")
    assert p_blocks[0] == shared[0] and p_blocks[1] != shared[1]
    assert slot.tolist() == [p_blocks[1] * 4 + 2]
    bt.append("c")  # the child now holds the old block alone: written in place, no copy
    np.testing.assert_array_equal(bt.blocks("c"), shared)
    src, dst = bt.pop_copies()
    assert src.dtype == torch.int64 and src.tolist() == [shared[1]] and dst.tolist() == [p_blocks[1]]
    assert bt.pop_copies()[0].numel() == 0
    assert alloc.refcounts([shared[0], shared[1], p_blocks[1]]).tolist() == [2, 1, 1]


def test_fork_at_block_boundary_needs_no_copy(impl):
    alloc = impl.allocator(16, block_size=4)
    bt = impl.tables(alloc, 4, "cpu")
    bt.add("p", np.arange(8))
    bt.mark_computed("p")
    bt.fork("p", "c")
    bt.append("p")
    bt.append("c")
    assert bt.pop_copies()[0].numel() == 0
    assert bt.blocks("p")[2] != bt.blocks("c")[2]


def test_copy_queue_keeps_blocks_alive_until_popped(impl):
    alloc = impl.allocator(8, block_size=4)
    bt = impl.tables(alloc, 4, "cpu")
    bt.add("p", np.arange(2))
    bt.mark_computed("p")
    bt.fork("p", "c")
    bt.append("p")
    src, dst = int(bt.blocks("c")[0]), int(bt.blocks("p")[0])
    bt.free("p")
    bt.free("c")
    assert alloc.refcounts([src, dst]).tolist() == [1, 1]  # queued copy still needs both
    assert alloc.num_free_blocks == 6
    s, d = bt.pop_copies()
    assert (s.tolist(), d.tolist()) == ([src], [dst])
    assert alloc.num_free_blocks == 8


def test_errors_leave_state_unchanged(impl):
    alloc = impl.allocator(6, block_size=4)
    bt = impl.tables(alloc, 4, "cpu", max_seqs=2)
    bt.add("a", np.arange(12))
    bt.mark_computed("a")
    before = (bt.blocks("a").tolist(), alloc.num_free_blocks, alloc.refcounts(np.arange(6)).tolist())

    def unchanged():
        assert (bt.blocks("a").tolist(), alloc.num_free_blocks, alloc.refcounts(np.arange(6)).tolist()) == before
        assert len(bt) == 1

    with pytest.raises(InvalidArgumentError, match="already exists"):
        bt.add("a", [1])
    with pytest.raises(OutOfBlocksError) as err:
        bt.add("b", np.arange(40))  # 3 prefix hits + 7 new blocks > 3 free
    assert err.value.requested == 7 and err.value.available == 3
    unchanged()
    with pytest.raises(OutOfBlocksError):
        bt.append("a", 13)
    unchanged()
    for call in (lambda: bt.append("zz"), lambda: bt.free("zz"), lambda: bt.fork("zz", "y"),
                 lambda: bt.batch(["zz"]), lambda: bt.mark_computed("zz"), lambda: bt.blocks("zz")):
        with pytest.raises(BlockIndexError, match="zz"):
            call()
        unchanged()
    bt.add("b", 1)
    with pytest.raises(InvalidArgumentError, match="already exists"):
        bt.fork("a", "b")
    bt.free("b")
    with pytest.raises(InvalidArgumentError, match="n_tokens"):
        bt.append("a", 0)
    with pytest.raises(InvalidArgumentError, match="at least 1"):
        bt.add("e", [])
    with pytest.raises(InvalidArgumentError, match="integer token ids"):
        bt.add("e", [1.5, 2.0])
    with pytest.raises(InvalidArgumentError, match="outside"):
        bt.add("e", [-3, 2])
    with pytest.raises(InvalidArgumentError, match="max_seqs"):
        bt.batch(["a", "a", "a"])
    with pytest.raises(InvalidArgumentError, match="twice"):
        bt.batch(["a", "a"])
    with pytest.raises(InvalidArgumentError, match="num_new_tokens"):
        bt.batch(["a"], num_new_tokens=[1])  # nothing uncomputed
    with pytest.raises(InvalidArgumentError, match="must lie in"):
        bt.mark_computed("a", 13)
    unchanged()
    bt.append("a")
    with pytest.raises(InvalidArgumentError, match="not yet computed"):
        bt.fork("a", "f")
    with pytest.raises(InvalidArgumentError, match="block_size"):
        impl.tables(alloc, 8, "cpu")


def test_chunked_prefill_padding_and_decode_batch(impl):
    alloc = impl.allocator(32, block_size=4)
    bt = impl.tables(alloc, 4, "cpu")
    bt.add("a", np.arange(11))
    bt.add("b", np.arange(50, 53))
    batch = bt.batch(["a", "b"], num_new_tokens=[5, 3], pad_slots_to=12)
    expected = direct_tables(bt, ["a", "b"], [5, 3])
    assert batch.slot_mapping.tolist()[8:] == [SLOT_PAD] * 4
    expected["slot_mapping"] = np.r_[expected["slot_mapping"], [SLOT_PAD] * 4]
    assert_batch_matches(batch, expected)
    bt.mark_computed(batch)
    assert (bt.num_computed("a"), bt.num_computed("b")) == (5, 3)
    with pytest.raises(InvalidArgumentError, match="uncomputed tokens"):
        bt.decode_batch(["a", "b"])
    bt.mark_computed(["a"])
    bt.append("a")
    bt.append("b")
    batch = bt.decode_batch(["b", "a"])
    assert_batch_matches(batch, direct_tables(bt, ["b", "a"], [1, 1]))


# --------------------------------------------------------------------------- random operations
def _token_kv(tokens: np.ndarray, positions: np.ndarray, heads: int, dim: int):
    """K/V a model would compute: a function of the token id and its position only."""
    base = torch.as_tensor(tokens, dtype=torch.float32)[:, None, None] * 1000 + \
        torch.as_tensor(positions, dtype=torch.float32)[:, None, None]
    k = base + torch.arange(heads * dim, dtype=torch.float32).reshape(1, heads, dim) * 1e-3
    return k, -k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_against_direct_construction(impl, seed):
    rng = random.Random(seed)
    bs, num_blocks, heads, dim = 4, 20, 2, 3
    alloc = impl.allocator(num_blocks, block_size=bs)
    bt = impl.tables(alloc, bs, "cpu", max_seqs=6)
    k_cache = torch.full((num_blocks, bs, heads, dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    tokens = {}  # seq -> the token ids a model would have (the oracle)
    prefixes = [np.arange(k * 100, k * 100 + 13) for k in range(3)]  # shared prompt prefixes
    next_id, next_token = 0, 10_000
    seen = dict.fromkeys(["hit_tokens", "copies", "out_of_blocks", "checks"], 0)

    def check_everything():
        live = list(tokens)
        counts = held_blocks(bt, live)
        for pair in bt.pending_copies:  # the copy queue holds a reference on src and dst
            for b in pair:
                counts[b] = counts.get(b, 0) + 1
        refs = alloc.refcounts(np.array(sorted(counts), dtype=np.int32)).tolist() if counts else []
        assert refs == [counts[b] for b in sorted(counts)]  # one reference per holder, none leaked
        assert alloc.num_free_blocks == num_blocks - len(counts)
        for s in live:
            assert len(bt.blocks(s)) == -(-len(tokens[s]) // bs) and bt.num_tokens(s) == len(tokens[s])

    for _ in range(120):
        live = list(tokens)
        op = rng.random()
        try:
            if op < 0.3 or not live:
                prompt = np.r_[prefixes[rng.randrange(3)][: rng.randrange(1, 14)],
                               np.arange(next_token, next_token + rng.randrange(0, 6))].astype(np.int32)
                next_token += 10
                hit = bt.add(next_id, prompt)
                seen["hit_tokens"] += hit
                assert hit % bs == 0 and hit < len(prompt)
                tokens[next_id] = prompt
                next_id += 1
            elif op < 0.55:
                s = rng.choice(live)
                n = rng.randrange(1, 6)
                slots = bt.append(s, n)
                new = np.arange(next_token, next_token + n)
                next_token += n
                tokens[s] = np.r_[tokens[s], new]
                blocks, start = bt.blocks(s), len(tokens[s]) - n
                assert slots.tolist() == [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            elif op < 0.7:
                s = rng.choice(live)
                if bt.num_computed(s) != bt.num_tokens(s):
                    with pytest.raises(InvalidArgumentError):
                        bt.fork(s, next_id)
                else:
                    bt.fork(s, next_id)
                    tokens[next_id] = tokens[s].copy()
                next_id += 1
            elif op < 0.8:
                s = rng.choice(live)
                bt.free(s)
                del tokens[s]
        except OutOfBlocksError:
            seen["out_of_blocks"] += 1
            check_everything()
            victim = rng.choice(list(tokens))  # preempt, as a server would
            bt.free(victim)
            del tokens[victim]  # all-or-nothing: check_everything() below proves nothing changed
        check_everything()
        live = list(tokens)
        if live and rng.random() < 0.6:  # one forward step over a random subset
            seen["copies"] += len(bt.pending_copies)
            src, dst = bt.pop_copies()
            copy_blocks_reference([k_cache, v_cache], src, dst)
            chosen = rng.sample(live, rng.randrange(1, min(len(live), 6) + 1))
            new = [rng.randrange(0 if bt.num_computed(s) else 1, bt.num_tokens(s) - bt.num_computed(s) + 1)
                   for s in chosen]
            if True:
                expected = direct_tables(bt, chosen, new)
                batch = bt.batch(chosen, num_new_tokens=new)
                assert_batch_matches(batch, expected)
                pos = np.concatenate([np.arange(bt.num_computed(s), bt.num_computed(s) + n)
                                      for s, n in zip(chosen, new)])
                toks = np.concatenate([tokens[s][bt.num_computed(s): bt.num_computed(s) + n]
                                       for s, n in zip(chosen, new)])
                k, v = _token_kv(toks, pos, heads, dim)
                write_kv_reference(k, v, k_cache, v_cache, batch.slot_mapping)
                bt.mark_computed(batch)
        # every sequence reads exactly its own tokens back: no sequence sees another's writes
        if rng.random() < 0.5:
            continue  # leave copies queued across several operations now and then
        seen["copies"] += len(bt.pending_copies)
        copy_blocks_reference([k_cache, v_cache], *bt.pop_copies())  # as the next step would
        done = [s for s in tokens if bt.num_computed(s) > 0]
        if done:
            seen["checks"] += 1
            lens = [bt.num_computed(s) for s in done]
            width = max(len(bt.blocks(s)) for s in done)
            table = torch.zeros(len(done), width, dtype=torch.int32)
            for i, s in enumerate(done):
                table[i, : len(bt.blocks(s))] = torch.from_numpy(bt.blocks(s))
            k, v, _ = gather_kv_reference(k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32))
            want_k, want_v = _token_kv(np.concatenate([tokens[s][:n] for s, n in zip(done, lens)]),
                                       np.concatenate([np.arange(n) for n in lens]), heads, dim)
            torch.testing.assert_close(k, want_k, rtol=0, atol=0)
            torch.testing.assert_close(v, want_v, rtol=0, atol=0)
    print(seen)
    assert all(seen.values()), f"the random run missed a case: {seen}"
    for s in list(tokens):
        bt.free(s)
    bt.pop_copies()
    assert alloc.num_free_blocks == num_blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_equals_cpu():
    alloc = BlockAllocator(64, block_size=16)
    gpu = impl.tables(alloc, 16, "cuda", max_seqs=4)
    gpu.add("a", np.arange(40))
    gpu.add("b", np.arange(100, 117))
    for _ in range(3):  # reused pinned buffers across steps
        batch = gpu.batch(["a", "b"])
        assert batch.block_table.is_cuda
        new = [gpu.num_tokens(s) - gpu.num_computed(s) for s in ("a", "b")]
        assert_batch_matches(batch, direct_tables(gpu, ["a", "b"], new))
        gpu.mark_computed(batch)
        gpu.append("a")
        gpu.append("b")


def test_fork_errors_name_the_callers_ids_not_internal_handles():
    """Regression: fork('p', 'c') of an uncomputed parent said ``fork(4611686018427387904, ...)``."""
    import re

    tables = BlockTables(BlockAllocator(8, 4), 4, "cpu", max_seqs=4)
    tables.add("p", np.arange(5, dtype=np.int32))
    with pytest.raises(InvalidArgumentError) as err:
        tables.fork("p", "c")
    assert "fork('p', 'c')" in str(err.value) and not re.search(r"\d{15,}", str(err.value))
    assert "c" not in tables and tables.num_tokens("p") == 5
