"""ReferenceBlockTables (issue 10's pure-Python twin): decoded blocks in the prefix cache, append_batch
equals sequential appends, decode_step's fixed-width tensors, all-or-nothing errors, max_blocks_per_seq.

Every test runs against both allocators (the C++ one and its pure-Python twin).
"""
import numpy as np
import pytest
import torch
from allocator_util import make, snapshot  # noqa: F401 (make is a fixture)

from kvpool._reference_tables import ReferenceBlockTables
from kvpool.batch_tables import SLOT_PAD, BatchTables
from kvpool.errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError

BS = 4
KEY = 0x5EED_0F_C0FFEE


def state(bt):
    """Everything a ReferenceBlockTables holds, and everything of its allocator."""
    seqs = {sid: (list(s.blocks), s.num_tokens, s.num_computed, None if s.tokens is None else list(s.tokens),
                  list(s.hashes), s.num_cached, s.shared_tail, s.chain) for sid, s in bt._seqs.items()}
    return seqs, bt.pending_copies, dict(bt._queued), snapshot(bt.allocator)


def world(make, num_blocks=40, **kwargs):
    """Three twins sharing a partial tail, two twins forked at a block boundary, a counted and a short prompt."""
    bt = ReferenceBlockTables(make(num_blocks, block_size=BS, hash_key=KEY), BS, max_seqs=8, **kwargs)
    bt.add("p", np.arange(6))
    bt.mark_computed("p")
    bt.fork("p", "c1")
    bt.fork("p", "c2")
    bt.add("q", np.arange(100, 108))
    bt.mark_computed("q")
    bt.fork("q", "q2")
    bt.add("r", 5)  # a token count: never hashed
    bt.add("s", np.arange(200, 203))
    return bt


# --------------------------------------------------------------------------- decoded blocks join the cache
@pytest.mark.parametrize("answer_len", [9, 10])  # P + A = 19 tokens (a partial block) or 20 (whole blocks)
@pytest.mark.parametrize("with_ids", [True, False])
def test_next_turn_hits_prompt_and_answer(make, answer_len, with_ids):
    bt = ReferenceBlockTables(make(32, block_size=BS), BS, max_seqs=4)
    prompt, answer, message = np.arange(10, 20), np.arange(500, 500 + answer_len), np.array([7, 8, 9])
    assert bt.add("t1", prompt, extra="tenant") == 0
    bt.mark_computed("t1")  # the prefill
    for i, token in enumerate(answer):  # decode, token by token
        b = bt.decode_step(["t1"], token_ids=[token] if with_ids else None, pad_batch_to=i % 2 + 1)
        bt.mark_computed(b)
    conversation = np.r_[prompt, answer]
    known = conversation if with_ids else prompt
    want = bt.allocator.hash_tokens(known, "tenant")[:len(conversation) // BS if with_ids else len(prompt) // BS]
    assert bt._seqs["t1"].hashes == want.tolist()  # incremental == whole-sequence chained hashes
    bt.free("t1")
    turn2 = np.r_[conversation, message]
    expected = len(conversation) // BS * BS if with_ids else len(prompt) // BS * BS
    assert bt.add("t2", turn2, extra="tenant") == expected
    assert bt.add("other", turn2, extra="someone else") == 0  # the salt still separates tenants


def test_an_append_without_ids_ends_the_known_tokens(make):
    bt = ReferenceBlockTables(make(32, block_size=BS), BS)
    bt.add("a", np.arange(10, 16))  # 6 tokens: one full block
    bt.append("a", 1, [16])
    bt.append("a")  # token 7 unknown: blocks 1.. are never hashed
    bt.append("a", 5, np.arange(18, 23))
    assert len(bt._seqs["a"].hashes) == 1 and len(bt._seqs["a"].tokens) == 7
    bt.mark_computed("a")
    assert bt.allocator.num_cached_blocks == 1
    bt.free("a")
    assert bt.add("b", np.r_[np.arange(10, 17), 0, np.arange(18, 25)]) == 4


def test_short_prompt_and_forked_answers_are_cached(make):
    bt = ReferenceBlockTables(make(32, block_size=BS), BS)
    bt.add("a", [1, 2])  # shorter than a block: nothing to match, but its tokens are known
    bt.mark_computed("a")
    bt.fork("a", "b")
    bt.mark_computed(bt.decode_step(["a", "b"], token_ids=[3, 9]))  # a copies the shared tail, b writes in place
    bt.mark_computed(bt.decode_step(["a", "b"], token_ids=[4, 9]))
    assert bt.allocator.num_cached_blocks == 2
    assert bt.add("a2", [1, 2, 3, 4, 5]) == 4 and bt.add("b2", [1, 2, 9, 9, 5]) == 4
    assert bt.blocks("a2")[0] == bt.blocks("a")[0] and bt.blocks("b2")[0] == bt.blocks("b")[0]


# --------------------------------------------------------------------------- append_batch
ORDERS = [["p", "c1", "c2", "q", "q2", "r", "s"], ["c2", "r", "p", "q2", "c1", "s", "q"], ["c1", "c2"]]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("with_ids", [True, False])
def test_append_batch_equals_sequential_appends(make, order, n, with_ids):
    batched, sequential = world(make), world(make)
    tokens = np.arange(1000, 1000 + len(order) * n).reshape(len(order), n) if with_ids else None
    slots = batched.append_batch(np.array(order) if order[0] == "c1" else order, n, tokens)
    want = [sequential.append(s, n, None if tokens is None else tokens[i]) for i, s in enumerate(order)]
    assert slots.dtype == np.int32 and slots.tolist() == np.concatenate(want).tolist()
    assert state(batched) == state(sequential)
    if order == ORDERS[0]:  # p and c1 copy the shared tail; c2, the last holder, writes it in place
        assert [src for src, _ in batched.pending_copies] == [int(world(make).blocks("p")[1])] * 2
    for bt in (batched, sequential):
        bt.mark_computed(list(bt._seqs))
        bt.pop_copies()
    assert state(batched) == state(sequential)


def test_append_batch_takes_numpy_ids_and_flat_tokens(make):
    by_array, by_list = ReferenceBlockTables(make(16, block_size=BS, hash_key=KEY), BS), \
        ReferenceBlockTables(make(16, block_size=BS, hash_key=KEY), BS)
    for bt in (by_array, by_list):
        for sid in (3, 5):
            bt.add(np.int64(sid), np.arange(sid, sid + 3))
    assert 3 in by_array and np.int32(5) in by_array and list(by_array._seqs) == [3, 5]
    by_array.append_batch(np.array([5, 3]), 2, np.arange(4))
    by_list.append_batch([5, 3], 2, [[0, 1], [2, 3]])
    assert state(by_array) == state(by_list)
    assert by_array.append_batch([], 3).shape == (0,)


def _append_batch_errors():
    """``(call, error, message fragment)``: each fails on the LAST sequence it names, after valid ones."""
    ps = ["p", "c1", "q"]
    return [
        (lambda bt: bt.append_batch(ps + ["zz"]), BlockIndexError, "zz"),
        (lambda bt: bt.append_batch(ps + ["p"]), InvalidArgumentError, "twice"),
        (lambda bt: bt.append_batch(ps, 0), InvalidArgumentError, "n_tokens"),
        (lambda bt: bt.append_batch(ps, 1.5), InvalidArgumentError, "n_tokens"),
        (lambda bt: bt.append_batch(ps, True), InvalidArgumentError, "n_tokens"),
        (lambda bt: bt.append_batch(ps, 2, np.arange(5)), InvalidArgumentError, "shape"),
        (lambda bt: bt.append_batch(ps, 2, np.ones((2, 3), int)), InvalidArgumentError, "shape"),
        (lambda bt: bt.append_batch(ps, 1, [1.0, 2.0, 3.0]), InvalidArgumentError, "integer"),
        (lambda bt: bt.append_batch(ps, 1, [1, 2, -1]), InvalidArgumentError, "outside"),
        (lambda bt: bt.append_batch(ps, 1, [1, 2, 2**31]), InvalidArgumentError, "outside"),
        (lambda bt: bt.append_batch(["p", "q"], 9), InvalidArgumentError, "max_blocks_per_seq=4"),
        (lambda bt: bt.append("q", 9), InvalidArgumentError, "max_blocks_per_seq=4"),
        (lambda bt: bt.append("zz"), BlockIndexError, "zz"),
        (lambda bt: bt.append("p", 1, [1, 2]), InvalidArgumentError, "shape"),
    ]


@pytest.mark.parametrize("case", range(len(_append_batch_errors())))
def test_append_batch_is_all_or_nothing(make, case):
    call, error, fragment = _append_batch_errors()[case]
    bt = world(make, num_blocks=16, max_blocks_per_seq=4)
    before = state(bt)
    with pytest.raises(error, match=fragment):
        call(bt)
    assert state(bt) == before


def test_out_of_blocks_counts_the_whole_batch(make):
    bt = world(make, num_blocks=12)  # 7 blocks held, 5 free
    before = state(bt)
    with pytest.raises(OutOfBlocksError) as err:  # p 1 + copy, c1 1 + copy, c2 1, q 1, q2 1
        bt.append_batch(["p", "c1", "c2", "q", "q2"], 3)
    assert (err.value.requested, err.value.available) == (7, 5)
    assert state(bt) == before
    bt.append_batch(["p", "c1", "c2"], 3)  # exactly the 5 free blocks
    assert bt.allocator.num_free_blocks == 0 and len(bt.pending_copies) == 2


# --------------------------------------------------------------------------- decode_step
def direct_decode(bt, seq_ids, rows):
    """decode_step's tensors, element by element, from each sequence's blocks after the append."""
    w, b = bt.max_blocks_per_seq, len(seq_ids)
    table, lens = np.zeros((rows, w), np.int64), np.zeros(rows, np.int64)
    slots, last, indptr, indices = np.full(rows, SLOT_PAD), np.zeros(rows, np.int64), [0], []
    for i, s in enumerate(seq_ids):
        blocks, n = bt.blocks(s), bt.num_tokens(s)
        k = -(-n // BS)
        table[i, :k] = blocks[:k]
        lens[i], slots[i], last[i] = n, blocks[(n - 1) // BS] * BS + (n - 1) % BS, n - BS * (k - 1)
        indices += blocks[:k].tolist()
        indptr.append(len(indices))
    indptr += [len(indices)] * (rows - b)
    qsl = list(range(b + 1)) + [b] * (rows - b)
    return dict(block_table=table, seq_lens=lens, slot_mapping=slots, query_start_loc=np.array(qsl),
                kv_indptr=np.array(indptr), kv_indices=np.array(indices), kv_last_page_len=last)


def check_decode(b: BatchTables, bt, seq_ids, rows):
    for name, want in direct_decode(bt, seq_ids, rows).items():
        got = getattr(b, name)
        assert got.dtype == torch.int32, name
        np.testing.assert_array_equal(got.numpy(), want.astype(np.int32), err_msg=name)
    lazy = BatchTables(b.seq_ids, b.block_table, b.seq_lens, b.slot_mapping, b.query_start_loc, b.seq_lens_host,
                       b.num_new_tokens, b.max_seq_len, b.block_size)  # CSR derived on the device instead
    for name in ("kv_indptr", "kv_indices", "kv_last_page_len"):
        np.testing.assert_array_equal(getattr(lazy, name).numpy(), getattr(b, name).numpy(), err_msg=name)
    assert b.seq_lens_host.dtype == np.int32 and b.seq_lens_host.tolist() == b.seq_lens.tolist()
    assert b.num_new_tokens == len(seq_ids) and b.max_seq_len == max(bt.num_tokens(s) for s in seq_ids)


@pytest.mark.parametrize("pad", [None, 5, 8])
def test_decode_step_matches_direct_construction(make, pad):
    bt = world(make, max_blocks_per_seq=6)
    bt.mark_computed(["r", "s"])
    plans = [["p", "c1", "c2", "q", "q2"], ["s", "r", "q"], ["c2", "p"], ["p", "c1", "c2", "q", "q2"]]
    for step in range(8):
        ids = plans[step % len(plans)]
        b = bt.decode_step(ids, token_ids=np.arange(len(ids)) + 10 * step, pad_batch_to=pad)
        rows = pad or len(ids)
        assert b.block_table.shape == (rows, 6) and b.seq_ids == tuple(ids)
        check_decode(b, bt, ids, rows)
        bt.pop_copies()
        bt.mark_computed(b)  # padding rows ignored
        assert all(bt.num_computed(s) == bt.num_tokens(s) for s in ids)


def test_decode_step_with_numpy_ids(make):
    bt = ReferenceBlockTables(make(32, block_size=BS), BS, max_seqs=4, max_blocks_per_seq=5)
    for sid in (7, 8, 9):
        bt.add(sid, np.arange(sid, sid + 3 * sid // 2))
    bt.mark_computed(np.array([7, 8, 9]))
    ids = np.array([9, 7], dtype=np.int32)
    for _ in range(3):
        b = bt.decode_step(ids, pad_batch_to=4)
        assert b.seq_ids is ids
        check_decode(b, bt, [9, 7], 4)
        bt.mark_computed(b)


def _decode_step_errors():
    return [
        (lambda bt: bt.decode_step(["p", "s"]), InvalidArgumentError, "uncomputed"),  # s never computed
        (lambda bt: bt.decode_step([]), InvalidArgumentError, "max_seqs"),
        (lambda bt: bt.decode_step(["p", "c1", "c2", "q", "q2", "r", "s", "x", "y"]), InvalidArgumentError, "max_seqs"),
        (lambda bt: bt.decode_step(["p", "zz"]), BlockIndexError, "zz"),
        (lambda bt: bt.decode_step(["p", "q", "p"]), InvalidArgumentError, "twice"),
        (lambda bt: bt.decode_step(["p", "q"], pad_batch_to=1), InvalidArgumentError, "pad_batch_to"),
        (lambda bt: bt.decode_step(["p", "q"], pad_batch_to=9), InvalidArgumentError, "pad_batch_to"),
        (lambda bt: bt.decode_step(["p", "q"], pad_batch_to=2.0), InvalidArgumentError, "pad_batch_to"),
        (lambda bt: bt.decode_step(["p", "q"], pad_batch_to=True), InvalidArgumentError, "pad_batch_to"),
        (lambda bt: bt.decode_step(["p", "q"], token_ids=[1]), InvalidArgumentError, "shape"),
        (lambda bt: bt.decode_step(["p", "q2"], token_ids=[1, -5]), InvalidArgumentError, "outside"),
        (lambda bt: bt.decode_step(["p", "c1", "c2", "q", "q2"]), OutOfBlocksError, "free"),
    ]


@pytest.mark.parametrize("case", range(len(_decode_step_errors())))
def test_decode_step_is_all_or_nothing(make, case):
    call, error, fragment = _decode_step_errors()[case]
    bt = world(make, num_blocks=10)  # 7 held, 3 free: the last case needs 2 copies + 2 fresh blocks
    bt.mark_computed("r")
    before = state(bt)
    with pytest.raises(error, match=fragment):
        call(bt)
    assert state(bt) == before


# --------------------------------------------------------------------------- max_blocks_per_seq
def test_max_blocks_per_seq_is_enforced(make):
    bt = ReferenceBlockTables(make(16, block_size=BS), BS, max_blocks_per_seq=2)
    before = state(bt)
    for prompt in (np.arange(9), 9):
        with pytest.raises(InvalidArgumentError, match=r"max_blocks_per_seq=2.*ceil\(max_model_len"):
            bt.add("a", prompt)
        assert state(bt) == before
    bt.add("a", np.arange(7))
    bt.mark_computed("a")
    bt.decode_step(["a"])  # 8 tokens: the second block is full
    bt.mark_computed("a")
    before = state(bt)
    for call in (lambda: bt.append("a"), lambda: bt.decode_step(["a"]), lambda: bt.append_batch(["a"], 1, [3])):
        with pytest.raises(InvalidArgumentError, match="max_blocks_per_seq=2"):
            call()
        assert state(bt) == before
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidArgumentError, match="max_blocks_per_seq"):
            ReferenceBlockTables(bt.allocator, BS, max_blocks_per_seq=bad)


def test_mark_computed_refuses_repeats_and_non_integer_lengths(make):
    bt = world(make)
    before = state(bt)
    for call in (lambda: bt.mark_computed(["s", "s"]), lambda: bt.mark_computed(["s"], [2.5]),
                 lambda: bt.mark_computed(["r", "s"], [5, 4])):
        with pytest.raises(InvalidArgumentError):
            call()
        assert state(bt) == before
