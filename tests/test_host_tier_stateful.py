"""Hypothesis drives BlockTables with a host tier (C++) and its pure-Python twin (`kvpool._reference_tier`).

Every rule of the tables' own machine (add, append, decode_step, batch, mark_computed, fork, free, ...) plus
the tier's: pop the step's transfers, complete a batch's reloads or offloads (in any order, any time later),
and prompts sharing a common prefix so hits span both tiers. Small GPU and host pools make both LRUs evict;
hashes are weakened now and then so collisions happen on both tiers. After every step both sides agree on
every sequence, both allocators' refcounts and statistics, the tier's counters and which host blocks are
readable.
"""
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from test_block_tables_stateful import KEY, SALTS, TOKENS, TablesVsTwin, plain

from kvpool import BlockAllocator, KVPoolError
from kvpool._reference import ReferenceBlockAllocator
from kvpool._reference_tier import ReferenceTieredTables
from kvpool.block_table import BlockTables
from kvpool.tier import HostKVTier
from tier_util import InstantCopier

COMMON = [2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2, 1, 1, 2, 0, 0, 2, 1, 0]


class TieredTablesVsTwin(TablesVsTwin):
    @initialize(num_blocks=st.integers(4, 24), num_host=st.integers(1, 16), block_size=st.sampled_from([1, 2, 4]),
                max_seqs=st.integers(1, 5), width=st.sampled_from([None, 3, 6]), mirror=st.booleans(),
                bits=st.sampled_from([64, 64, 2, 0]), room=st.sampled_from([0, 0, 8]))
    def build(self, num_blocks, num_host, block_size, max_seqs, width, mirror, bits, room):
        kw = dict(max_seqs=max_seqs, max_blocks_per_seq=width, _hash_bits=bits)
        cap = num_blocks + room  # room > 0: an elastic GPU pool (grow / relocate_top / shrink rules, issue 16)
        tier = HostKVTier(_Geometry(block_size), num_host, copier=InstantCopier(None, None))
        self.fast = BlockTables(BlockAllocator(num_blocks, block_size, True, hash_key=KEY, max_num_blocks=cap),
                                block_size, _mirror=mirror, host_tier=tier, **kw)
        self.twin = ReferenceTieredTables(
            ReferenceBlockAllocator(num_blocks, block_size, True, hash_key=KEY, max_num_blocks=cap), block_size,
            ReferenceBlockAllocator(num_host, block_size, True, hash_key=KEY), **kw)
        self.bs = block_size
        self.live = []
        self.next_id = 0
        self.batches = []
        self.in_flight = []  # (batch, reloads?) not completed yet
        self.unlaunched = []  # popped batches whose reloads are not enqueued yet (their sequences cannot be batched)

    @rule(data=st.data(), salt=SALTS, shared=st.integers(0, 5))
    def add_shared(self, data, salt, shared):
        """A prompt that starts with `shared` blocks of a common prompt: hits on the GPU, the host, or both."""
        tail = data.draw(st.lists(TOKENS, min_size=1, max_size=2 * self.bs))
        seq = self.next_id
        self.next_id += 1
        if self.both("add", seq, COMMON[:shared * self.bs] + tail, extra=salt)[0] == "ok":
            self.live.append(seq)

    @rule()
    def pop_transfers(self):
        fast = self.fast.pop_transfers()
        twin = self.twin.pop_transfers()
        got = (fast.batch, fast.reload_host.tolist(), fast.reload_gpu.tolist(), fast.offload_gpu.tolist(),
               fast.offload_host.tolist())
        assert got == tuple(plain(x) for x in twin), (got, twin)
        if len(fast.reload_host):
            self.in_flight.append((fast.batch, True))
            self.unlaunched.append(fast.batch)
        if len(fast.offload_gpu):
            self.in_flight.append((fast.batch, False))

    @precondition(lambda self: self.unlaunched)
    @rule(data=st.data())
    def launch(self, data):
        """The server enqueues a popped batch's reloads (HostKVTier.run): its sequences may be batched."""
        batch = data.draw(st.sampled_from(self.unlaunched))
        self.fast.host_tier._core.launched(batch)
        self.twin.tier.launched(batch)
        self.unlaunched.remove(batch)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def complete(self, data):
        """A copy finishes (any batch, either kind, in any order); completing it twice fails on both sides."""
        batch, reloads = data.draw(st.sampled_from(self.in_flight))
        self.fast.host_tier._core.complete(batch, reloads)
        self.twin.tier.complete(batch, reloads)
        self.in_flight.remove((batch, reloads))
        if reloads and batch in self.unlaunched:
            self.unlaunched.remove(batch)
        for side in (self.fast.host_tier._core, self.twin.tier):
            try:
                side.complete(batch, reloads)
                raise AssertionError("a batch completed twice")
            except KVPoolError:
                pass

    @rule(data=st.data(), salt=SALTS, shared=st.integers(1, 5))
    def serve_shared(self, data, salt, shared):
        """What a server does with a request: copies of earlier steps complete, the request is added, its
        transfers run, its prompt is computed, and maybe it finishes. Hits span both tiers here."""
        self.settle()
        tail = data.draw(st.lists(TOKENS, min_size=1, max_size=2 * self.bs))
        seq = self.next_id
        self.next_id += 1
        if self.both("add", seq, COMMON[:shared * self.bs] + tail, extra=salt)[0] != "ok":
            return
        self.live.append(seq)
        self.settle()
        self.both("mark_computed", seq)
        if data.draw(st.booleans()):
            self.both("free", seq)
            self.live.remove(seq)

    @rule()
    def settle(self):
        """Pop the queued transfers and complete every copy in flight."""
        self.pop_transfers()
        for batch, reloads in list(self.in_flight):
            self.fast.host_tier._core.complete(batch, reloads)
            self.twin.tier.complete(batch, reloads)
        self.in_flight.clear()
        self.unlaunched.clear()

    @invariant()
    def tiers_agree(self):
        if not hasattr(self, "fast"):
            return
        fast, twin = self.fast.host_tier, self.twin.tier
        everything = np.arange(fast.num_host_blocks, dtype=np.int32)
        assert fast.allocator.refcounts(everything).tolist() == twin.host.refcounts(everything).tolist()
        assert fast.allocator.stats() == twin.host.stats()
        assert fast._core.stats() == twin.stats()
        assert [fast.readable(b) for b in range(fast.num_host_blocks)] == [twin.readable(b) for b in everything]
        fast.allocator.check_invariants()


class _Geometry:
    """What HostKVTier reads of a cache when a copier is given: the block size."""

    def __init__(self, block_size):
        self.block_size = block_size


TieredTablesVsTwin.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestTieredTablesVsTwin = TieredTablesVsTwin.TestCase
