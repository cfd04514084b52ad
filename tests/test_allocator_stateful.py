"""Hypothesis drives the C++ allocator and the pure-Python reference with the same random calls.

After every step both must agree on everything observable (ids handed out, match results, free and
cached counts, refcounts, stats, which errors are raised) and the invariants must hold.
"""
from collections import Counter

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpool import BlockAllocator, KVPoolError
from kvpool._reference import ReferenceBlockAllocator

HASHES = st.integers(0, 12)  # few distinct hashes: collisions, hits and conflicts happen often
TOKENS = st.integers(0, 1)  # two token values: equal and colliding block contents both happen
KEY = 0x5EED_0000_0000_0000_0000_0000_0000_0001  # one key for both, as every TP rank shares one


def plain(out):
    """A result as plain Python values (arrays as lists, tuples element by element)."""
    if isinstance(out, tuple):
        return tuple(plain(x) for x in out)
    return out.tolist() if isinstance(out, np.ndarray) else out


class AllocatorVsReference(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 12), caching=st.booleans(), room=st.sampled_from([0, 0, 3, 8]))
    def build(self, num_blocks, caching, room):
        cap = num_blocks + room  # an elastic pool's capacity (room 0: a fixed pool)
        self.cpp = BlockAllocator(num_blocks, block_size=4, enable_prefix_caching=caching, hash_key=KEY,
                                  max_num_blocks=cap)
        self.ref = ReferenceBlockAllocator(num_blocks, block_size=4, enable_prefix_caching=caching, hash_key=KEY,
                                           max_num_blocks=cap)
        self.held = []  # one entry per reference the test owns
        self.chains = [0]  # chain values returned so far (parents for cache_blocks_verified)

    def both(self, method, *args):
        """Call both; they must return equal arrays or raise the same error class."""
        results = []
        for impl in (self.cpp, self.ref):
            try:
                results.append(("ok", plain(getattr(impl, method)(*args))))
            except KVPoolError as e:
                results.append(("error", type(e)))
        assert results[0] == results[1], (method, args, results)
        return results[0]

    @rule(n=st.integers(-1, 14))
    def allocate(self, n):
        status, ids = self.both("allocate", n)
        if status == "ok":
            self.held.extend(ids)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free_some(self, data):
        picks = data.draw(st.lists(st.integers(0, len(self.held) - 1), unique=True, max_size=len(self.held)))
        ids = [self.held[i] for i in picks]
        assert self.both("free", np.array(ids, dtype=np.int32))[0] == "ok"
        for i in sorted(picks, reverse=True):
            del self.held[i]

    @rule(ids=st.lists(st.integers(-2, 14), max_size=4))
    def free_arbitrary(self, ids):
        # Mostly invalid (double free, out of range); must succeed or fail identically, atomically.
        status, _ = self.both("free", ids)
        if status == "ok":
            left = Counter(self.held) - Counter(ids)
            self.held = list(left.elements())

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def incref_some(self, data):
        ids = data.draw(st.lists(st.sampled_from(self.held), max_size=4))
        assert self.both("incref", ids)[0] == "ok"
        self.held.extend(ids)

    @rule(ids=st.lists(st.integers(-1, 13), max_size=4), data=st.data())
    def cache_some(self, ids, data):
        if data.draw(st.booleans()) and self.held:
            ids = data.draw(st.lists(st.sampled_from(self.held), min_size=1, max_size=4))
        n_hashes = data.draw(st.sampled_from([len(ids), len(ids), len(ids) + 1]))
        hashes = np.array(data.draw(st.lists(HASHES, min_size=n_hashes, max_size=n_hashes)), dtype=np.uint64)
        self.both("cache_blocks", ids, hashes)

    @rule(hashes=st.lists(HASHES, max_size=5))
    def match(self, hashes):
        status, hit = self.both("match_prefix", np.array(hashes, dtype=np.uint64))
        assert status == "ok"
        self.held.extend(hit)

    @rule(n=st.integers(-1, 8), data=st.data())
    def allocate_with_prefix(self, n, data):
        k = data.draw(st.integers(0, 3))
        hashes = data.draw(st.lists(HASHES, min_size=k, max_size=k))
        n_tokens = data.draw(st.sampled_from([4 * k, 4 * k, 4 * k + 1]))
        tokens = data.draw(st.lists(TOKENS, min_size=n_tokens, max_size=n_tokens))
        context = data.draw(st.sampled_from([0, 0, 5]))
        status, out = self.both("allocate_with_prefix", n, hashes, tokens, context)
        if status == "ok":
            ids, hits, chain = out
            assert 0 <= hits <= min(n, k) and len(ids) == n
            self.held.extend(ids)
            self.chains.append(chain)

    @rule(data=st.data())
    def cache_verified(self, data):
        if self.held and data.draw(st.booleans()):
            ids = data.draw(st.lists(st.sampled_from(self.held), min_size=1, max_size=3))
        else:
            ids = data.draw(st.lists(st.integers(-1, 13), max_size=3))
        hashes = data.draw(st.lists(HASHES, min_size=len(ids), max_size=len(ids)))
        n_tokens = data.draw(st.sampled_from([4 * len(ids), 4 * len(ids), 4 * len(ids) - 1]))
        tokens = data.draw(st.lists(TOKENS, min_size=max(n_tokens, 0), max_size=max(n_tokens, 0)))
        parent = data.draw(st.sampled_from(self.chains + [2**64 - 1]))
        context = data.draw(st.sampled_from([0, 5]))
        status, chain = self.both("cache_blocks_verified", ids, hashes, tokens, context, parent)
        if status == "ok":
            self.chains.append(chain)

    # ---- elastic pools: the live ids grow and shrink at the top ------------------------------------

    @rule(n=st.integers(-1, 9))
    def grow(self, n):
        self.both("grow", n)

    @rule(n=st.integers(-1, 14))
    def shrink(self, n):
        self.both("shrink", n)  # refused (same class) while a top block is held or n is out of range

    @rule(n=st.integers(-1, 14))
    def held_in_top(self, n):
        self.both("held_in_top", n)

    @rule(n=st.integers(-1, 14), then_shrink=st.booleans())
    def relocate_top(self, n, then_shrink):
        status, out = self.both("relocate_top", n)
        if status != "ok":
            return
        src, dst = out
        assert sorted(src) == src and all(d < self.cpp.num_blocks - n for d in dst)
        moved = dict(zip(src, dst))
        self.held = [moved.get(b, b) for b in self.held]
        assert self.cpp.held_in_top(n) == 0
        if then_shrink:
            assert self.both("shrink", n)[0] == "ok"

    @invariant()
    def agree_and_consistent(self):
        if not hasattr(self, "cpp"):
            return
        cpp, ref = self.cpp, self.ref
        everything = np.arange(cpp.num_blocks, dtype=np.int32)
        refcounts = cpp.refcounts(everything)
        assert refcounts.tolist() == ref.refcounts(everything).tolist()
        assert (refcounts >= 0).all()
        assert cpp.num_free_blocks == ref.num_free_blocks == int((refcounts == 0).sum())
        assert cpp.num_cached_blocks == ref.num_cached_blocks
        stats = cpp.stats()
        assert stats == ref.stats()
        assert cpp.num_blocks == ref.num_blocks and cpp.free_top_blocks == ref.free_top_blocks
        assert stats["free_blocks"] + stats["used_blocks"] == cpp.num_blocks
        # What the test holds is exactly what the allocator counts: no id both free and held.
        assert Counter(self.held) == Counter({b: rc for b, rc in enumerate(refcounts.tolist()) if rc})
        cpp.check_invariants()
        ref.check_invariants()


AllocatorVsReference.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestAllocatorVsReference = AllocatorVsReference.TestCase
