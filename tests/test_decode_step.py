"""decode_step: one call per step, tensors at fixed addresses, only deltas sent, decoded blocks cached."""
import numpy as np
import pytest
import torch

from kvpool import BlockAllocator, InvalidArgumentError, OutOfBlocksError
from kvpool._reference import ReferenceBlockAllocator
from kvpool._reference_tables import ReferenceBlockTables
from kvpool.block_table import BlockTables
from kvpool.kernels import paged_decode
from kvpool.kernels.reference import paged_decode_reference

BS = 4


def running(tables, n_seqs, prompt_len=6, seed=0):
    """``n_seqs`` computed prompts (ids 0..n-1) ready to decode."""
    rng = np.random.default_rng(seed)
    for s in range(n_seqs):
        tables.add(s, rng.integers(0, 1000, size=prompt_len))
    tables.mark_computed(list(range(n_seqs)))
    return np.arange(n_seqs, dtype=np.int64)


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-buffers", "staged-device-path"])
def test_tensors_stay_at_fixed_addresses_and_equal_a_fresh_build(mirror):
    tables = BlockTables(BlockAllocator(64, BS, hash_key=3), BS, max_seqs=4, max_blocks_per_seq=8, _mirror=mirror)
    # the twin builds every tensor from scratch at every step
    fresh = ReferenceBlockTables(ReferenceBlockAllocator(64, BS, hash_key=3), BS, max_seqs=4, max_blocks_per_seq=8)
    ids = running(tables, 3)
    running(fresh, 3)
    pointers = None
    for step in range(9):
        order = ids if step < 5 else ids[::-1].copy()  # the rows change owner half way
        b = tables.decode_step(order, pad_batch_to=4)
        f = fresh.decode_step(order, pad_batch_to=4)
        ptrs = tuple(t.data_ptr() for t in (b.block_table, b.seq_lens, b.slot_mapping, b.query_start_loc))
        pointers = pointers or ptrs
        assert ptrs == pointers  # a captured graph reads the same memory after every step
        for name in ("block_table", "seq_lens", "slot_mapping", "query_start_loc", "kv_indptr", "kv_indices",
                     "kv_last_page_len"):
            assert torch.equal(getattr(b, name), getattr(f, name)), (step, name)
        tables.mark_computed(b)
        fresh.mark_computed(f)
    assert b.block_table.shape == (4, 8) and b.seq_lens[3] == 0 and b.slot_mapping[3] == -1


def test_decode_step_is_append_then_decode_batch():
    a, b = (BlockTables(BlockAllocator(64, BS, hash_key=1), BS, max_seqs=4) for _ in range(2))
    ids = running(a, 3)
    running(b, 3)
    step = a.decode_step(ids)
    for s in ids:
        b.append(int(s))
    batch = b.decode_batch(list(ids))
    assert step.slot_mapping.tolist() == batch.slot_mapping.tolist()
    assert step.seq_lens.tolist() == batch.seq_lens.tolist()
    assert step.kv_indices.tolist() == batch.kv_indices.tolist()
    width = batch.block_table.shape[1]
    assert torch.equal(step.block_table[:, :width], batch.block_table)
    assert not step.block_table[:, width:].any()


def test_a_next_turn_hits_the_whole_conversation():
    alloc = BlockAllocator(64, BS)
    tables = BlockTables(alloc, BS, max_seqs=2)
    prompt, answer, message = list(range(10)), [50, 51, 52, 53, 54, 55, 56], [90, 91, 92]
    tables.add("turn-1", prompt)
    tables.mark_computed("turn-1")
    for token in answer:  # each decoded token appended with its id: filled blocks are hashed
        tables.mark_computed(tables.decode_step(["turn-1"], [token]))
    tables.free("turn-1")
    conversation = prompt + answer + message  # 20 tokens: blocks 0..3 full before the last token
    assert tables.add("turn-2", conversation) == 16
    # without the ids of the decoded tokens only the prompt's full blocks could be reused
    tables.free("turn-2")
    tables.add("no-ids", [7] * 9)
    tables.mark_computed("no-ids")
    for _ in range(7):
        tables.mark_computed(tables.decode_step(["no-ids"]))
    tables.free("no-ids")
    assert tables.add("no-ids-2", [7] * 9 + [1] * 11) == 8


def test_padding_rows_give_zero_output_and_read_nothing():
    tables = BlockTables(BlockAllocator(64, BS), BS, max_seqs=4)
    ids = running(tables, 2)
    b = tables.decode_step(ids, pad_batch_to=4)
    torch.manual_seed(0)
    k = torch.randn(64, BS, 2, 8)
    v = torch.randn(64, BS, 2, 8)
    q = torch.randn(4, 4, 8)
    out = paged_decode(q, k, v, b.block_table, b.seq_lens, 0.3)
    want = paged_decode_reference(q, k, v, b.block_table, b.seq_lens, 0.3)
    torch.testing.assert_close(out, want)
    assert not out[2:].any()


def test_decode_step_errors_change_nothing():
    alloc = BlockAllocator(8, BS)
    tables = BlockTables(alloc, BS, max_seqs=2)
    ids = running(tables, 2, prompt_len=8)  # 4 blocks of 8 taken; the next token needs a new block each
    tables.append(0)  # seq 0 now has an uncomputed token
    before = (alloc.stats(), [tables.blocks(s).tolist() for s in (0, 1)], tables.num_tokens(0))
    cases = [
        (dict(seq_ids=ids), "uncomputed"),
        (dict(seq_ids=[1], pad_batch_to=3), "pad_batch_to"),
        (dict(seq_ids=[1, 1]), "twice"),
        (dict(seq_ids=[1], token_ids=[-5]), "negative"),
        (dict(seq_ids=[1], token_ids=[1, 2]), "token ids"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            tables.decode_step(**kwargs)
        assert (alloc.stats(), [tables.blocks(s).tolist() for s in (0, 1)], tables.num_tokens(0)) == before
    alloc = BlockAllocator(5, BS)
    tables = BlockTables(alloc, BS, max_seqs=2)
    ids = running(tables, 2, prompt_len=8)  # one free block; both sequences cross a block boundary
    before = (alloc.stats(), [tables.blocks(s).tolist() for s in (0, 1)])
    with pytest.raises(OutOfBlocksError) as err:
        tables.decode_step(ids)
    assert (err.value.requested, err.value.available) == (2, 1)
    assert (alloc.stats(), [tables.blocks(s).tolist() for s in (0, 1)]) == before
    assert tables.num_tokens(0) == tables.num_tokens(1) == 8


def test_steady_state_decode_sends_at_most_32_bytes_per_sequence():
    tables = BlockTables(BlockAllocator(256 * 20, 16), 16, max_seqs=256, max_blocks_per_seq=20, _mirror=True)
    ids = running(tables, 256, prompt_len=40)
    sent = []
    for _ in range(64):
        tables.mark_computed(tables.decode_step(ids))
        sent.append(tables.last_step_h2d_bytes)
    per_seq = np.mean(sent[1:]) / 256  # the first step fills every row once
    assert per_seq <= 32, per_seq
    assert sent[0] > sent[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_captured_decode_graph_replays_after_the_next_step():
    alloc = BlockAllocator(256, 16)
    tables = BlockTables(alloc, 16, "cuda", max_seqs=8, max_blocks_per_seq=16)
    ids = running(tables, 5, prompt_len=30)
    k = torch.randn(256, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(8, 8, 64, device="cuda", dtype=torch.bfloat16)
    b = tables.decode_step(ids, pad_batch_to=8)
    paged_decode(q, k, v, b.block_table, b.seq_lens, 0.125)  # compile before capture
    torch.cuda.synchronize()
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = paged_decode(q, k, v, b.block_table, b.seq_lens, 0.125)
    for _ in range(20):  # crosses a block boundary: new block ids arrive as deltas
        tables.mark_computed(b)
        b = tables.decode_step(ids, pad_batch_to=8)
        graph.replay()
        eager = paged_decode(q, k, v, b.block_table, b.seq_lens, 0.125)
        torch.testing.assert_close(out, eager)


def test_a_batch_marked_after_a_later_step_records_its_own_lengths():
    tables = BlockTables(BlockAllocator(64, BS), BS, max_seqs=2)
    ids = running(tables, 1)
    first = tables.decode_step(ids)
    tables.mark_computed(first)
    tables.decode_step(ids)  # its lengths overwrite the step buffers
    tables.mark_computed(first)  # late and repeated: must still mean "7 tokens", not the new step's 8
    assert tables.num_computed(0) == 7 and tables.num_tokens(0) == 8
