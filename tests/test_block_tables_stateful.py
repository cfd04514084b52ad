"""Hypothesis drives the C++-backed BlockTables and its pure-Python twin with the same random calls.

add / append / append_batch / decode_step / batch / mark_computed / fork / free / pop_copies, and
the elastic pool's grow / relocate_top / shrink under the tables (issue 16), valid and invalid, on a small pool (so blocks run out, prefixes repeat and copy-on-write happens), with one
group of layers and with KV-cache groups (full attention beside sliding windows, issue 13). After
every step both must agree on everything observable: every returned batch tensor, every slot, every
error class, every sequence's blocks and counts, and the allocators' refcounts and statistics. The
twin runs on the pure-Python allocator, so the C++ allocator is checked against its twin too.
"""

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpool import BlockAllocator, KVPoolError
from kvpool._reference import ReferenceBlockAllocator
from kvpool._reference_tables import ReferenceBlockTables
from kvpool.batch_tables import BatchTables
from kvpool.block_table import BlockTables

KEY = 0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321
TOKENS = st.integers(0, 2)  # a tiny vocabulary: prompts share prefixes, caches hit
SALTS = st.sampled_from([None, None, "tenant"])


def plain(out):
    """A result as comparable plain values (batch tensors as lists)."""
    if isinstance(out, BatchTables):
        names = ("block_table", "seq_lens", "slot_mapping", "query_start_loc", "kv_indptr", "kv_indices",
                 "kv_last_page_len")
        tensors = {n: getattr(out, n).tolist() for n in names}
        return tensors, out.seq_lens_host.tolist(), out.num_new_tokens, out.max_seq_len
    if isinstance(out, tuple):
        return tuple(plain(x) for x in out)
    if isinstance(out, (np.ndarray, torch.Tensor)):
        return out.tolist()
    return out


def _shared_state_agrees(fast, twin, live) -> None:
    """What both tables hold beyond each sequence: sequence count, the copy queue, every refcount, the stats."""
    assert len(fast) == len(twin) == len(live)
    assert fast.pending_copies == twin.pending_copies
    a, r = fast.allocator, twin.allocator
    everything = np.arange(a.num_blocks, dtype=np.int32)
    assert a.refcounts(everything).tolist() == r.refcounts(everything).tolist()
    assert a.stats() == r.stats()
    a.check_invariants()


class TablesVsTwin(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4]),
                max_seqs=st.integers(1, 5), width=st.sampled_from([None, 3, 6]), caching=st.booleans(),
                mirror=st.booleans(), room=st.sampled_from([0, 4, 12]))
    def build(self, num_blocks, block_size, max_seqs, width, caching, mirror, room):
        kw = dict(max_seqs=max_seqs, max_blocks_per_seq=width)
        cap = num_blocks + room  # room > 0: an elastic pool that grows and shrinks under the tables
        self.fast = BlockTables(BlockAllocator(num_blocks, block_size, caching, hash_key=KEY, max_num_blocks=cap),
                                block_size, _mirror=mirror, **kw)
        self.twin = ReferenceBlockTables(
            ReferenceBlockAllocator(num_blocks, block_size, caching, hash_key=KEY, max_num_blocks=cap), block_size,
            **kw)
        self.bs = block_size
        self.live = []
        self.next_id = 0
        self.batches = []  # (fast batch, twin batch) pairs not yet marked computed

    def both(self, method, *args, **kwargs):
        results = []
        for tables in (self.fast, self.twin):
            try:
                results.append(("ok", plain(getattr(tables, method)(*args, **kwargs))))
            except KVPoolError as err:
                results.append(("error", type(err)))
        assert results[0] == results[1], (method, args, kwargs, results)
        return results[0]

    def call_both(self, method, *args, **kwargs):
        """Like `both`, but returns the raw results (batches are marked computed later)."""
        raw, results = [], []
        for tables in (self.fast, self.twin):
            try:
                out = getattr(tables, method)(*args, **kwargs)
                raw.append(out)
                results.append(("ok", plain(out)))
            except KVPoolError as err:
                raw.append(None)
                results.append(("error", type(err)))
        assert results[0] == results[1], (method, args, kwargs, results)
        return raw if results[0][0] == "ok" else None

    def ids(self, data, min_size=0):
        if not self.live:
            return []
        return data.draw(st.lists(st.sampled_from(self.live), min_size=min_size, max_size=len(self.live),
                                  unique=True))

    @rule(data=st.data(), as_count=st.booleans(), salt=SALTS)
    def add(self, data, as_count, salt):
        prompt = data.draw(st.lists(TOKENS, min_size=1, max_size=4 * self.bs + 1))
        seq = self.next_id
        self.next_id += 1
        status, _ = self.both("add", seq, len(prompt) if as_count else prompt, extra=salt)
        if status == "ok":
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(-1, 3), with_ids=st.booleans(), numpy_ids=st.booleans())
    def append_batch(self, data, n, with_ids, numpy_ids):
        seqs = self.ids(data)
        tokens = data.draw(st.lists(TOKENS, min_size=len(seqs) * max(n, 0), max_size=len(seqs) * max(n, 0))) \
            if with_ids else None
        ids = np.array(seqs, dtype=np.int64) if numpy_ids and all(type(s) is int for s in seqs) else seqs
        self.both("append_batch", ids, n, token_ids=tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), with_ids=st.booleans())
    def append_one(self, data, with_ids):
        seq = data.draw(st.sampled_from(self.live))
        n = data.draw(st.integers(1, 2))
        tokens = data.draw(st.lists(TOKENS, min_size=n, max_size=n)) if with_ids else None
        self.both("append", seq, n, token_ids=tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), with_ids=st.booleans(), pad=st.integers(0, 3), mark=st.booleans())
    def decode_step(self, data, with_ids, pad, mark):
        seqs = self.ids(data, min_size=1)
        if data.draw(st.integers(0, 3)):  # mostly a real decode loop: the previous step marked computed
            self.both("mark_computed", seqs)
        tokens = data.draw(st.lists(TOKENS, min_size=len(seqs), max_size=len(seqs))) if with_ids else None
        pad_to = len(seqs) + pad if pad else None
        ids = np.array(seqs, dtype=np.int64) if all(type(s) is int for s in seqs) else seqs
        out = self.call_both("decode_step", ids, tokens, pad_to)
        if out is not None and mark:
            self.mark(out)

    def mark(self, pair):
        fast, twin = pair
        results = []
        for tables, batch in ((self.fast, fast), (self.twin, twin)):
            try:
                tables.mark_computed(batch)
                results.append("ok")
            except KVPoolError as err:
                results.append(type(err))
        assert results[0] == results[1], results

    @precondition(lambda self: self.live)
    @rule(data=st.data(), mark=st.booleans(), chunk=st.booleans())
    def batch(self, data, mark, chunk):
        seqs = self.ids(data, min_size=1)
        new = [data.draw(st.integers(0, 3)) for _ in seqs] if chunk else None
        out = self.call_both("batch", seqs, new)
        if out is not None and mark:
            self.mark(out)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), all_tokens=st.booleans())
    def mark_some(self, data, all_tokens):
        seq = data.draw(st.sampled_from(self.live))
        if all_tokens:
            self.both("mark_computed", seq)
        else:
            self.both("mark_computed", [seq], [data.draw(st.integers(0, 20))])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live))
        child = f"fork-{self.next_id}"  # non-integer ids take the handle path
        self.next_id += 1
        if self.both("fork", parent, child)[0] == "ok":
            self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.both("free", seq)
        self.live.remove(seq)

    @rule(data=st.data())
    def pop_copies_or_unknown_ids(self, data):
        if data.draw(st.booleans()):
            self.both("pop_copies")
        else:  # unknown ids fail alike
            seq = data.draw(st.integers(1000, 1002))
            self.both("append", seq)
            self.both("free", seq)

    # ---- an elastic pool under the tables (issue 16) ---------------------------------------------
    def pools(self, method, *args):
        """`method` on both allocators: same result or same error class."""
        results = []
        for allocator in (self.fast.allocator, self.twin.allocator):
            try:
                results.append(("ok", plain(getattr(allocator, method)(*args))))
            except KVPoolError as err:
                results.append(("error", type(err)))
        assert results[0] == results[1], (method, args, results)
        return results[0]

    @rule(n=st.integers(-1, 8))
    def grow_pool(self, n):
        self.pools("grow", n)

    @rule(data=st.data(), how=st.sampled_from(["all free", "all free", "some", "wrong"]), relocate=st.booleans())
    def shrink_pool(self, data, how, relocate):
        """Shrink by n, moving held top blocks down first (or not: then held ones refuse it). With n = all free
        blocks, exactly as many held blocks lie in the top n as free ids below it: every one must move."""
        if self.live and data.draw(st.booleans()):  # the oldest sequence holds low ids: free them below the top
            self.both("free", self.live.pop(0))
            if hasattr(self, "prompts"):
                self.prompts = {s: p for s, p in self.prompts.items() if s in self.live}
        pool = self.fast.allocator
        n = {"all free": pool.num_free_blocks, "some": data.draw(st.integers(0, pool.num_blocks)),
             "wrong": data.draw(st.sampled_from([-1, pool.num_blocks + 1]))}[how]
        if relocate:
            status, out = self.both("relocate_top", n)
            if status == "ok":
                src, dst = out
                top = self.fast.allocator.num_blocks - n
                assert sorted(src) == src and all(d < top <= s for s, d in zip(src, dst))
                assert self.fast.allocator.held_in_top(n) == 0
        self.pools("shrink", n)

    @precondition(lambda self: len(self.live) >= 2)
    @rule(grow_first=st.integers(0, 4))
    def compact_live_pool(self, grow_first):
        """With sequences running: (grow,) free the oldest (its low ids), then shrink by every free block,
        moving each held block above the new top into a free id below it (as many as there are)."""
        self.pools("grow", min(grow_first, self.fast.allocator.max_num_blocks - self.fast.allocator.num_blocks))
        self.both("free", self.live.pop(0))
        if hasattr(self, "prompts"):
            self.prompts = {s: p for s, p in self.prompts.items() if s in self.live}
        n = self.fast.allocator.num_free_blocks
        held = self.fast.allocator.held_in_top(n)
        status, out = self.both("relocate_top", n)
        if status == "ok":
            assert len(out[0]) == held
            assert self.pools("shrink", n)[0] == "ok"

    @invariant()
    def agree(self):
        if not hasattr(self, "fast"):
            return
        for seq in self.live:
            for method in ("blocks", "num_tokens", "num_computed"):
                assert plain(getattr(self.fast, method)(seq)) == plain(getattr(self.twin, method)(seq)), (method, seq)
        _shared_state_agrees(self.fast, self.twin, self.live)


TablesVsTwin.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestTablesVsTwin = TablesVsTwin.TestCase


# --------------------------------------------------------------------------- KV-cache groups (issue 13)
LAYOUTS = [(None, 3), (None, 5), (6, None), (None, None, 2), (4, None, 7), (None,), (5,)]
COMMON = [2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2, 1, 1, 2, 0, 0, 2, 1, 0]  # a shared prompt: prefixes repeat


class GroupTablesVsTwin(TablesVsTwin):
    """The same calls on hybrid layouts (full + windowed groups, three groups, one windowed group), hashes
    weakened to 0 or 2 bits now and then; every group's blocks compared after every step."""

    @initialize(num_blocks=st.integers(6, 64), block_size=st.sampled_from([1, 2, 4]), max_seqs=st.integers(1, 5),
                width=st.sampled_from([None, None, 4, 8]), caching=st.sampled_from([True, True, False]),
                mirror=st.booleans(), windows=st.sampled_from(LAYOUTS), bits=st.sampled_from([64, 64, 2, 0]),
                room=st.sampled_from([0, 8, 32]))
    def build(self, num_blocks, block_size, max_seqs, width, caching, mirror, windows, bits, room):
        kw = dict(max_seqs=max_seqs, max_blocks_per_seq=width, group_windows=windows, _hash_bits=bits)
        cap = num_blocks + room
        self.fast = BlockTables(BlockAllocator(num_blocks, block_size, caching, hash_key=KEY, max_num_blocks=cap),
                                block_size, _mirror=mirror, **kw)
        self.twin = ReferenceBlockTables(
            ReferenceBlockAllocator(num_blocks, block_size, caching, hash_key=KEY, max_num_blocks=cap), block_size,
            **kw)
        self.bs = block_size
        self.live = []
        self.next_id = 0
        self.prompts = {}  # live sequences added with token ids: (prompt, salt)

    def free(self, data):  # noqa: D102 (the base rule, forgetting the prompt too)
        super().free(data)
        self.prompts = {s: p for s, p in self.prompts.items() if s in self.live}

    @rule(data=st.data(), as_count=st.booleans(), salt=SALTS, shared=st.integers(0, 5))
    def add(self, data, as_count, salt, shared):
        """A prompt that starts with `shared` blocks of the common prompt: hits across the groups."""
        tail = data.draw(st.lists(TOKENS, min_size=0 if shared else 1, max_size=3 * self.bs + 1))
        prompt = COMMON[:shared * self.bs] + tail
        if not as_count:
            self.add_prompt(prompt, salt)
            return
        seq = self.next_id
        self.next_id += 1
        if self.both("add", seq, len(prompt), extra=salt)[0] == "ok":
            self.live.append(seq)

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), keep=st.integers(1, 24), free_first=st.booleans())
    def share_a_prefix(self, data, keep, free_first):
        """Compute a live prompt, (maybe free it), then add a prompt that shares its first `keep` tokens."""
        seq = data.draw(st.sampled_from(sorted(self.prompts, key=str)))
        prompt, salt = self.prompts[seq]
        self.both("mark_computed", seq)
        if free_first:
            self.both("free", seq)
            self.live.remove(seq)
            del self.prompts[seq]
        tail = data.draw(st.lists(TOKENS, min_size=1, max_size=2 * self.bs))
        self.add_prompt(prompt[:keep] + tail, salt)

    def add_prompt(self, prompt, salt):
        seq = self.next_id
        self.next_id += 1
        if self.both("add", seq, prompt, extra=salt)[0] == "ok":
            self.live.append(seq)
            self.prompts[seq] = (prompt, salt)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def blocks_of_a_group(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.both("blocks", seq, data.draw(st.integers(-1, self.twin.num_groups)))

    @invariant()
    def agree(self):
        if not hasattr(self, "fast"):
            return
        assert self.fast.num_groups == self.twin.num_groups
        for seq in self.live:
            for g in range(self.twin.num_groups):
                assert self.fast.blocks(seq, g).tolist() == self.twin.blocks(seq, g).tolist(), (seq, g)
            assert self.fast.num_tokens(seq) == self.twin.num_tokens(seq)
            assert self.fast.num_computed(seq) == self.twin.num_computed(seq)
        _shared_state_agrees(self.fast, self.twin, self.live)


GroupTablesVsTwin.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestGroupTablesVsTwin = GroupTablesVsTwin.TestCase
