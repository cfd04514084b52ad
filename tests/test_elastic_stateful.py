"""Hypothesis drives an ElasticKVPool through random grow / shrink / sleep / wake between allocations (#16).

Sequences are added, extended (their KV written into the pages), forked and freed while the pool grows and
shrinks by random amounts (shrinks move held blocks down), sleeps and wakes. After every step:

- the allocator's invariants hold, its id range is ``[0, num_blocks)`` and every table names only ids in it;
- after every shrink, every live sequence reads back, through its block table, exactly the KV written for
  it: no relocation lost, mixed or stale data (and each extended sequence right after its write);
- the mapped bytes are the region arithmetic's for ``num_blocks`` (0 asleep) and the budget holds exactly
  them; the tensors never moved.

The pages are tiny (2 layers, 64 KiB rows: 32 blocks a 2 MiB chunk) so that a few dozen blocks cross chunks.
"""
import pytest
from elastic_util import assert_seq_reads_back, make_pool, write_new_tokens
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpool.elastic import MemoryBudget
from kvpool.errors import OutOfBlocksError

MAX_BLOCKS, BS = 96, 8


class ElasticPoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.expected: dict[int, list] = {}  # sequence -> the value of each of its tokens' KV

    @initialize(start=st.integers(0, 40))
    def start(self, start):
        self.budget = MemoryBudget(2**30)
        self.pool = make_pool("cpu", max_blocks=MAX_BLOCKS, num_blocks=start, budget=self.budget)
        self.ptrs = [t.data_ptr() for t in self.pool.cache.block_tensors()]
        self.next_id = 0

    # ----------------------------------------------------------------- sequences
    @precondition(lambda self: not self.pool.asleep)
    @rule(tokens=st.integers(1, 60))
    def add(self, tokens):
        sid = self.next_id
        self.next_id += 1
        try:
            self.pool.tables.add(sid, tokens)
        except OutOfBlocksError:
            return
        self.expected[sid] = write_new_tokens(self.pool, [sid])[sid]

    @precondition(lambda self: not self.pool.asleep and self.pool.allocator.num_free_blocks > 2)
    @rule()
    def fill(self):
        """A sequence taking all but two free blocks: the high ids get used, so shrinks meet held blocks."""
        self.add(tokens=(self.pool.allocator.num_free_blocks - 2) * BS)

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), tokens=st.integers(1, 20))
    def extend(self, data, tokens):
        sid = data.draw(st.sampled_from(sorted(self.expected)))
        try:
            self.pool.tables.append(sid, tokens)
        except OutOfBlocksError:
            return
        src, dst = self.pool.tables.pop_copies()  # after a fork the shared partial block is copied first
        if len(src):
            from kvpool.kernels import copy_blocks

            copy_blocks(self.pool.cache.block_tensors(), src, dst)
        self.expected[sid] += write_new_tokens(self.pool, [sid])[sid]
        assert_seq_reads_back(self.pool, sid, self.expected[sid])  # a copied partial block included

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.expected)))
        child = self.next_id
        self.next_id += 1
        self.pool.tables.fork(parent, child)
        self.expected[child] = list(self.expected[parent])  # the parent's blocks, shared

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.expected)))
        self.pool.tables.free(sid)
        del self.expected[sid]

    # ----------------------------------------------------------------- the pool
    @precondition(lambda self: not self.pool.asleep)
    @rule(n=st.integers(0, MAX_BLOCKS))
    def grow(self, n):
        n = min(n, MAX_BLOCKS - self.pool.num_blocks)
        before = self.pool.num_blocks
        assert self.pool.grow(n) == n and self.pool.num_blocks == before + n

    @precondition(lambda self: not self.pool.asleep)
    @rule(n=st.integers(0, MAX_BLOCKS))
    def shrink(self, n):
        n = min(n, self.pool.num_blocks)
        before, held = self.pool.num_blocks, self.pool.held_blocks()
        released = self.pool.shrink(n)
        assert released == min(n, before - held) and self.pool.num_blocks == before - released
        assert self.pool.held_blocks() == held
        self.every_sequence_reads_back()  # (after the moves only: reading every page each step is slow here)

    @precondition(lambda self: not self.pool.asleep and not self.expected)
    @rule()
    def sleep_and_wake(self):
        blocks = self.pool.num_blocks
        self.pool.sleep()
        assert self.pool.mapped_bytes == 0 and self.budget.used_bytes == 0 and self.pool.num_blocks == 0
        assert self.pool.wake() == blocks

    # ----------------------------------------------------------------- what must always hold
    @invariant()
    def pool_is_consistent(self):
        pool = self.pool
        pool.allocator.check_invariants()
        assert pool.allocator.num_blocks == pool.num_blocks <= MAX_BLOCKS
        assert pool.mapped_bytes == pool.cache.regions.mapped_bytes(pool.num_blocks) == self.budget.used_bytes
        assert [t.data_ptr() for t in pool.cache.block_tensors()] == self.ptrs
        assert len(pool.tables) == len(self.expected)

    def every_sequence_reads_back(self):
        for sid, values in self.expected.items():
            assert_seq_reads_back(self.pool, sid, values)


ElasticPoolMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
TestElasticPool = pytest.mark.slow(ElasticPoolMachine.TestCase)


def test_machine_reads_kv_through_the_tables():
    """The machine's read-back check can fail: a block overwritten behind the tables' back is caught."""
    pool = make_pool("cpu", num_blocks=16)
    pool.tables.add(0, 20)
    write_new_tokens(pool, [0])
    pool.cache.k_caches[1][int(pool.tables.blocks(0)[1])] += 1
    with pytest.raises(AssertionError, match="sequence 0, layer 1"):
        assert_seq_reads_back(pool, 0)
