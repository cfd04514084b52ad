"""KV-cache groups in the pure-Python twin (issue 13): the window rule, hits across groups, all or nothing.

Worked examples with their arithmetic first; then a hypothesis state machine drives the twin alone
(several group layouts, shared prefixes, chunked prefill, fork, preemption, weak hashes) and checks
after every step: a windowed group holds exactly the positions its window still reads (at most
``ceil((W - 1) / bs) + 1`` computed blocks), every refcount equals its (sequence, group, position)
holders plus the copy queue, a failed call changes nothing, a prefix hit serves only blocks whose KV
was computed by the same group from the same tokens, and freeing everything frees every block.
"""
import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpool import BlockAllocator, KVPoolError
from kvpool._reference import CHAIN_BROKEN, CHAIN_ROOT, ReferenceBlockAllocator
from kvpool._reference_groups import released_blocks
from kvpool._reference_tables import ReferenceBlockTables
from kvpool.errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError

BS = 4
KEY = 0x0DDBA11_5EED


def tables(num_blocks, windows, allocator=ReferenceBlockAllocator, **kwargs):
    return ReferenceBlockTables(allocator(num_blocks, BS, hash_key=KEY), BS, max_seqs=8, group_windows=windows,
                                **kwargs)


@pytest.fixture(params=["reference", "cpp"])
def allocator(request):
    """The twin over either allocator."""
    return ReferenceBlockAllocator if request.param == "reference" else BlockAllocator


def state(bt):
    """Everything the twin holds, and everything of its allocator."""
    a = bt.allocator
    seqs = {sid: ([list(t) for t in s.tables], s.num_tokens, s.num_computed, s.tokens and list(s.tokens),
                  list(s.hashes), s.num_cached, s.shared_tail, list(s.chains)) for sid, s in bt._seqs.items()}
    return seqs, bt.pending_copies, a.refcounts(np.arange(a.num_blocks)).tolist(), list(a._free), a.stats()


# --------------------------------------------------------------------------- the window rule
def test_released_blocks_arithmetic():
    # block j goes once (j + 1) * bs <= num_computed - W + 1: the query at num_computed reads from num_computed - W + 1
    assert [released_blocks(nc, 6, 4) for nc in (0, 8, 9, 12, 16, 20, 21)] == [0, 0, 1, 1, 2, 3, 4]
    assert released_blocks(20, None, 4) == 0 and released_blocks(20, 1, 4) == 5  # W = 1: only the query itself


def test_chunked_prefill_releases_early_blocks():
    bt = tables(32, (None, 6))
    assert bt.add("a", np.arange(21)) == 0
    windowed = bt.blocks("a", 1).tolist()
    for chunk, gone in ((8, 0), (4, 1), (4, 2), (4, 3), (1, 4)):  # computed: 8, 12, 16, 20, 21 tokens
        bt.mark_computed(bt.batch(["a"], [chunk]))
        assert bt.blocks("a", 1).tolist() == [-1] * gone + windowed[gone:]
        assert bt.allocator.refcounts(windowed[:gone]).tolist() == [0] * gone  # back in the pool ...
        assert bt.blocks("a", 0).tolist() == list(range(0, 12, 2))  # the full group keeps all (position-major ids)
    assert bt.allocator.num_cached_blocks == 5 + 5  # ... and still cached: 5 full blocks per group
    assert bt.allocator.num_free_blocks == 32 - 12 + 4


def test_a_windowed_hit_needs_only_the_window(allocator):
    """Group 1's blocks at positions 0..2 are evicted, 3..4 still cached: the hit is still 20 tokens."""
    bt = tables(16, (None, 6), allocator)
    bt.add("a", np.arange(21))  # position-major: group 0 holds 0, 2, .., 10, group 1 holds 1, 3, .., 11
    for chunk in (12, 4, 4, 1):  # group 1 gives back positions 0, 1, 2, 3 in turn: LRU order 1, 3, 5, 7
        bt.mark_computed(bt.batch(["a"], [chunk]))
    other = ReferenceBlockTables(bt.allocator, BS)  # one pool, another user
    other.add("x", 7 * BS)  # fresh blocks 12..15, then the least recently freed: 1, 3, 5 evicted
    bt.free("a")
    assert bt.add("b", np.arange(21)) == 20  # the query at 20 reads tokens 15..19: group 1's blocks 3, 4
    assert bt.blocks("b", 0).tolist() == [0, 2, 4, 6, 8, 11]
    assert bt.blocks("b", 1).tolist() == [-1, -1, -1, 7, 9, 10]


def test_a_window_miss_caps_the_hit(allocator):
    """Group 1 misses block 3: no hit can cover it, so h = 3, whose window (tokens 7..11) is cached."""
    bt = tables(16, (None, 6), allocator)
    bt.add("a", np.arange(21))
    windowed = bt.blocks("a", 1).tolist()
    bt.mark_computed("a")
    bt.free("a")
    group1 = bt._allocator_hashes(bt.allocator.hash_tokens(np.arange(21)).tolist(), 1)
    for j in (1, 2):  # positions 1 and 2 of group 1 become the most recently freed
        bt.allocator.free(bt.allocator.match_prefix([group1[j]]))
    other = ReferenceBlockTables(bt.allocator, BS)
    other.add("x", 6 * BS)  # 12..15, then blocks 1 and 7: group 1's positions 0 and 3
    assert other.blocks("x").tolist() == [12, 13, 14, 15, windowed[0], windowed[3]]
    other.free("x")
    assert bt.add("b", np.arange(21)) == 12
    assert bt.blocks("b", 1)[:3].tolist() == [-1, windowed[1], windowed[2]]  # the query at 12 reads from token 7


def test_without_a_full_group_a_hit_walks_the_whole_chain(allocator):
    bt = tables(11, (6,), allocator)
    bt.add("a", np.arange(21))
    bt.mark_computed("a")  # positions 0..3 given back (still cached)
    bt.free("a")
    assert bt.add("b", np.arange(21)) == 20  # every block 0..4 verified, only 3..4 taken
    assert bt.blocks("b").tolist() == [-1, -1, -1, 3, 4, 6]
    assert bt.allocator.refcounts([0, 1, 2]).tolist() == [0, 0, 0] and bt.allocator.stats()["prefix_hit_blocks"] == 2
    bt.free("b")
    other = ReferenceBlockTables(bt.allocator, BS)
    other.add("x", 9 * BS)  # evicts block 0 (the least recently freed cached block)
    other.free("x")
    assert bt.add("c", np.arange(21)) == 0  # block 0 gone: the chain of block 3 cannot be verified


def test_group_hashes_and_salts_keep_groups_apart(allocator):
    """Every hash is 0 (the test knob): a block of one group never serves another, whatever the hash says."""
    bt = tables(32, (None, None, 8), allocator, _hash_bits=0)
    bt.add("a", np.arange(9))
    bt.mark_computed("a")
    assert bt.allocator.num_cached_blocks == 1  # one hash value, so one cached block: group 0's first
    bt.free("a")
    assert bt.add("b", np.arange(9)) == 0  # group 0 could hit block 0, groups 1 and 2 cannot: no hit
    assert bt.allocator.stats()["hash_collisions"] >= 2  # their lookups found group 0's block under hash 0


def test_one_full_group_is_the_single_table():
    def run(windows):
        bt = tables(24, windows)
        bt.add("p", np.arange(6))
        bt.mark_computed("p")
        bt.fork("p", "c")
        bt.append_batch(["p", "c"], 3, np.arange(6))
        bt.add("q", np.arange(9))
        bt.mark_computed(["p", "c", "q"])
        bt.free("p")
        bt.add("r", np.arange(9))
        return state(bt), bt.decode_step(["c", "q"]).block_table.tolist()
    assert run(None) == run((None,))
    assert tables(8, None).group_windows == (None,) and tables(8, (None, 4)).num_groups == 2


# --------------------------------------------------------------------------- outputs with a group axis
def test_outputs_gain_a_group_axis():
    bt = tables(32, (None, 5))
    bt.add("a", np.arange(10))
    bt.add("b", np.arange(20, 25))
    b = bt.batch(["a", "b"], [8, 5])  # position-major: a holds 0, 2, 4 and 1, 3, 5; b 6, 8 and 7, 9
    assert b.block_table.shape == (2, 2, 2) and b.slot_mapping.shape == (2, 13) and b.seq_lens.tolist() == [8, 5]
    assert b.slot_mapping[1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 28, 29, 30, 31, 36]
    one = b.group(1)
    assert one.block_table.tolist() == [[1, 3], [7, 9]] and one.kv_indices.tolist() == [1, 3, 7, 9]
    assert one.slot_mapping.tolist() == b.slot_mapping[1].tolist() and one.seq_lens is b.seq_lens
    bt.mark_computed(b)  # a at 8: group 1 gives back block 1 (tokens 0..3; the query at 8 reads from 4)
    assert bt.blocks("a", 1).tolist() == [-1, 3, 5]
    slots = bt.append_batch(["a", "b"], 2)
    assert slots.shape == (2, 4) and slots.dtype == np.int32
    b = bt.batch(["a", "b"])
    assert b.group(1).block_table[0].tolist() == [0, 3, 5]  # a released position reads as padding 0
    assert b.group(0).block_table[0].tolist() == [0, 2, 4]
    with pytest.raises(InvalidArgumentError, match="group"):
        bt.blocks("a", 2)


def test_fork_copies_each_groups_shared_tail():
    bt = tables(32, (None, 6))
    bt.add("p", np.arange(6))
    bt.mark_computed("p")
    bt.fork("p", "c")
    assert bt.allocator.refcounts(bt.blocks("p", 0).tolist() + bt.blocks("p", 1).tolist()).tolist() == [2] * 4
    bt.append_batch(["p", "c"], 1)  # p copies its tail in both groups; c, the last holder, writes in place
    assert bt.pending_copies == [(2, 4), (3, 5)]  # p held 0, 2 and 1, 3 (position-major)
    assert bt.blocks("p", 0).tolist() == [0, 4] and bt.blocks("p", 1).tolist() == [1, 5]
    assert bt.blocks("c", 0).tolist() == [0, 2] and bt.blocks("c", 1).tolist() == [1, 3]


def test_every_call_is_all_or_nothing_across_groups():
    bt = tables(10, (None, 6))
    for seq, first in (("a", 0), ("b", 20)):
        bt.add(seq, np.arange(first, first + 8))  # 2 positions x 2 groups each: 8 held, 2 free
        bt.mark_computed(seq)  # the query at 8 still reads token 3: nothing given back
    before = state(bt)
    for call, requested in ((lambda: bt.add("c", np.arange(50, 59)), 6),
                            (lambda: bt.append_batch(["a", "b"], 4), 4),  # one more position per group each
                            (lambda: bt.decode_step(["a", "b"], [1, 2]), 4)):
        with pytest.raises(OutOfBlocksError) as err:
            call()
        assert (err.value.requested, err.value.available) == (requested, 2)
        assert state(bt) == before


def test_bad_group_windows_are_refused():
    alloc = ReferenceBlockAllocator(8, BS)
    for bad in ((), (0,), (None, -3), (2.5,), (True,), "full", 7):
        with pytest.raises(InvalidArgumentError, match="group_windows"):
            ReferenceBlockTables(alloc, BS, group_windows=bad)


class WithoutProbes:
    """An allocator from before issue 13: no probes across groups."""

    def __init__(self):
        self._inner = ReferenceBlockAllocator(8, BS)

    def __getattr__(self, name):
        if name in ("probe_chain", "probe_anchored", "take_cached"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_hits_across_groups_need_an_allocator_with_probes():
    with pytest.raises(InvalidArgumentError, match="probe"):
        ReferenceBlockTables(WithoutProbes(), BS, group_windows=(None, 4))
    ReferenceBlockTables(WithoutProbes(), BS, group_windows=(None, 4), enable_prefix_caching=False)
    ReferenceBlockTables(WithoutProbes(), BS, group_windows=None)  # one full group: today's calls only


# --------------------------------------------------------------------------- the allocator's lookups
def test_probes_take_nothing_and_taking_is_all_or_nothing():
    a = ReferenceBlockAllocator(6, BS, hash_key=KEY)
    tokens = np.arange(12)
    hashes = a.hash_tokens(tokens)
    ids, _, _ = a.allocate_with_prefix(3, hashes, tokens)
    chains = a.cache_blocks_chained(ids, hashes, tokens)
    a.free(ids)
    before = (a.stats(), list(a._free))
    found, stamps, collided = a.probe_chain(hashes, tokens)
    assert found.tolist() == [0, 1, 2] and stamps.tolist() == chains.tolist() and not collided
    assert (a.stats(), list(a._free)) == before
    found, _, _ = a.probe_anchored(hashes, tokens, 0, [CHAIN_ROOT, stamps[0], stamps[1]])
    assert found.tolist() == [0, 1, 2]
    found, _, _ = a.probe_anchored(hashes, tokens, 0, [CHAIN_ROOT, 12345, stamps[1]])
    assert found.tolist() == [2]  # from the last block down: block 1's entry hangs on stamp 1, not 12345
    with pytest.raises(OutOfBlocksError) as err:
        a.take_cached([0, 1], stamps[:2], 5, query_blocks=3)  # 6 free, 2 of them revived: 4 left
    assert (err.value.requested, err.value.available) == (5, 4) and (a.stats(), list(a._free)) == before
    for bad_ids, bad_stamps, error in (([0, 0], stamps[:1].tolist() * 2, InvalidArgumentError),
                                       ([7], [1], BlockIndexError), ([0], [1, 2], InvalidArgumentError)):
        with pytest.raises(error):
            a.take_cached(bad_ids, bad_stamps, 1)
    assert a.take_cached([3], [stamps[0]], 1) is None  # block 3 holds no such entry: nothing taken
    assert (a.stats(), list(a._free)) == before
    assert a.take_cached([0, 1], stamps[:2], 4, query_blocks=3).tolist() == [3, 4, 5, 2]  # never used, then LRU
    stats = a.stats()
    assert (stats["prefix_queries"], stats["prefix_query_blocks"], stats["prefix_hit_blocks"], stats["evictions"]) == \
        (2, 6, 2, 1)  # the allocate_with_prefix above, then this one


def test_anchored_entries_hang_on_given_parents():
    a = ReferenceBlockAllocator(8, BS, hash_key=KEY)
    tokens = np.arange(8)
    hashes = a.hash_tokens(tokens)
    ids = a.allocate(2)
    a.cache_blocks_anchored(ids, hashes, tokens, 7, [CHAIN_BROKEN, 99])  # broken parent: block 0 skipped
    assert a.num_cached_blocks == 1
    assert a.probe_anchored(hashes[1:], tokens[4:], 7, [99])[0].tolist() == [1]
    assert a.probe_anchored(hashes[1:], tokens[4:], 8, [99])[2]  # other salt: a collision, no hit
    with pytest.raises(InvalidArgumentError, match="parents"):
        a.cache_blocks_anchored(ids, hashes, tokens, 7, [1])


# --------------------------------------------------------------------------- properties, step by step
LAYOUTS = [(None, 3), (None, 5), (7, None), (None, None, 2), (1, None, 6), (6,), (2, 9)]
TOKENS = st.integers(0, 1)  # a two-token vocabulary: prompts share prefixes, windows hit
COMMON = [5, 1, 0, 7, 1, 1, 0, 2, 3, 3, 0, 1, 6, 0, 0, 1, 2, 2, 0, 0]  # a shared prompt, 5 blocks of 4


class GroupsMachine(RuleBasedStateMachine):
    """The twin alone, several group layouts; the KV oracle records what every block's pages hold."""

    @initialize(windows=st.sampled_from(LAYOUTS), num_blocks=st.integers(6, 60), bs=st.sampled_from([1, 2, 4]),
                caching=st.booleans(), bits=st.sampled_from([64, 64, 0]), width=st.sampled_from([None, 8]))
    def build(self, windows, num_blocks, bs, caching, bits, width):
        self.bs = bs
        self.bt = ReferenceBlockTables(ReferenceBlockAllocator(num_blocks, bs, caching, hash_key=KEY), bs,
                                       max_seqs=4, max_blocks_per_seq=width, group_windows=windows, _hash_bits=bits)
        self.live, self.next_id = [], 0
        self.known = {}  # seq -> (salt, its known leading token ids)
        self.content = {}  # block -> (group, salt, the token prefix its pages were computed from)

    def call(self, method, *args, **kwargs):
        """Call the twin; on a KVPoolError nothing may have changed."""
        before = state(self.bt)
        try:
            return getattr(self.bt, method)(*args, **kwargs)
        except KVPoolError as err:
            assert state(self.bt) == before, method
            event(f"{method}: {type(err).__name__}")
            return None

    def mark(self, what, num_computed=None):
        """mark_computed(what): the forward pass wrote every full computed block whose tokens are known.

        Recorded from the tables before the call: a windowed group may give a block back in the same call.
        """
        before = {s: [self.bt.blocks(s, g) for g in range(self.bt.num_groups)] for s in self.live}
        self.call("mark_computed", what, num_computed)
        for seq, tables in before.items():
            salt, tokens = self.known[seq]
            full = self.bt.num_computed(seq) // self.bs
            for g, blocks in enumerate(tables):
                for j, b in enumerate(blocks[:min(full, len(tokens) // self.bs)].tolist()):
                    if b >= 0:
                        self.content[b] = (g, salt, tuple(tokens[:(j + 1) * self.bs]))

    @rule(data=st.data(), salt=st.sampled_from([None, None, "t"]), shared=st.integers(0, 5))
    def add(self, data, salt, shared):
        """A prompt: the first `shared` blocks of the common prompt (prefixes repeat), then random tokens."""
        tail = data.draw(st.lists(TOKENS, min_size=0 if shared else 1, max_size=3 * self.bs + 1))
        prompt = COMMON[:shared * self.bs] + tail
        seq, self.next_id = self.next_id, self.next_id + 1
        hit = self.call("add", seq, prompt, extra=salt)
        if hit is None:
            return
        self.live.append(seq)
        self.known[seq] = (salt, list(prompt))
        event("add: hit" if hit else "add: miss")
        for g, w in enumerate(self.bt.group_windows):  # every hit block holds this group's KV of this prefix
            lo = released_blocks(hit, w, self.bs)
            if lo:
                event("add: a hit past a window (positions never taken)")
            blocks = self.bt.blocks(seq, g).tolist()
            assert blocks[:lo] == [-1] * lo
            for j in range(lo, hit // self.bs):
                assert self.content[blocks[j]] == (g, salt, tuple(prompt[:(j + 1) * self.bs])), (g, j)

    def grown(self, seqs, n, tokens):
        """Known tokens grow with appended ids, and stop for good at the first token without one."""
        for i, seq in enumerate(seqs):
            salt, known = self.known[seq]
            if len(known) < self.bt.num_tokens(seq) - n:
                continue
            self.known[seq] = (salt, known + tokens[i * n:(i + 1) * n] if tokens is not None else known)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 3), with_ids=st.booleans())
    def append_batch(self, data, n, with_ids):
        seqs = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=len(self.live), unique=True))
        tokens = data.draw(st.lists(TOKENS, min_size=len(seqs) * n, max_size=len(seqs) * n)) if with_ids else None
        if self.call("append_batch", seqs, n, tokens) is not None:
            self.grown(seqs, n, tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def decode_step(self, data):
        seqs = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=min(4, len(self.live)),
                                  unique=True))
        self.mark(seqs)
        tokens = data.draw(st.lists(TOKENS, min_size=len(seqs), max_size=len(seqs)))
        if self.call("decode_step", seqs, tokens) is not None:
            self.grown(seqs, 1, tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def chunked_prefill(self, data):
        seqs = data.draw(st.lists(st.sampled_from(self.live), min_size=1, max_size=min(4, len(self.live)),
                                  unique=True))
        new = [data.draw(st.integers(0, 2 * self.bs)) for _ in seqs]
        b = self.call("batch", seqs, [min(k, self.bt.num_tokens(s) - self.bt.num_computed(s)) for k, s in
                                      zip(new, seqs)])
        if b is not None:
            self.mark(b)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), partial=st.booleans())
    def mark_computed(self, data, partial):
        seq = data.draw(st.sampled_from(self.live))
        held = sum((self.bt.blocks(seq, g) >= 0).sum() for g in range(self.bt.num_groups))
        if partial:
            lo, hi = self.bt.num_computed(seq), self.bt.num_tokens(seq)
            self.mark(seq, data.draw(st.integers(lo, hi)))
        else:
            self.mark(seq)
        if sum((self.bt.blocks(seq, g) >= 0).sum() for g in range(self.bt.num_groups)) < held:
            event("mark_computed: a window gave blocks back")

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child, self.next_id = f"fork-{self.next_id}", self.next_id + 1
        self.mark(parent)
        self.call("fork", parent, child)
        if child in self.bt:
            self.live.append(child)
            self.known[child] = self.known[parent]

    @precondition(lambda self: self.live)
    @rule(data=st.data(), readd=st.booleans())
    def free_or_preempt(self, data, readd):
        seq = data.draw(st.sampled_from(self.live))
        all_known = len(self.known[seq][1]) == self.bt.num_tokens(seq)
        self.call("free", seq)
        self.live.remove(seq)
        salt, tokens = self.known.pop(seq)
        if readd and all_known:  # preemption: the same tokens come back as a new prompt
            hit = self.call("add", seq, tokens, extra=salt)
            if hit is not None:
                self.live.append(seq)
                self.known[seq] = (salt, tokens)

    @rule()
    def pop_copies(self):
        self.bt.pop_copies()

    @invariant()
    def windows_hold_exactly_what_they_read(self):
        if not hasattr(self, "bt"):
            return
        for seq in self.live:
            computed, n = self.bt.num_computed(seq), -(-self.bt.num_tokens(seq) // self.bs)
            for g, w in enumerate(self.bt.group_windows):
                blocks = self.bt.blocks(seq, g)
                gone = released_blocks(computed, w, self.bs)
                assert len(blocks) == n and (blocks[:gone] == -1).all() and (blocks[gone:] >= 0).all(), (seq, g)
                if w is not None:  # the bound on the blocks of computed tokens
                    assert -(-computed // self.bs) - gone <= -(-(w - 1) // self.bs) + 1

    @invariant()
    def refcounts_are_the_holders(self):
        if not hasattr(self, "bt"):
            return
        a = self.bt.allocator
        holders = np.zeros(a.num_blocks, dtype=np.int64)
        for seq in self.live:
            for g in range(self.bt.num_groups):
                held = self.bt.blocks(seq, g)
                np.add.at(holders, held[held >= 0], 1)
        for src, dst in self.bt.pending_copies:
            holders[[src, dst]] += 1
        assert a.refcounts(np.arange(a.num_blocks)).tolist() == holders.tolist()
        a.check_invariants()

    def teardown(self):
        if hasattr(self, "bt"):  # nothing leaks: freeing every sequence frees every block
            self.bt.pop_copies()
            for seq in list(self.live):
                self.bt.free(seq)
            assert self.bt.allocator.num_free_blocks == self.bt.allocator.num_blocks


GroupsMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
TestGroups = GroupsMachine.TestCase
