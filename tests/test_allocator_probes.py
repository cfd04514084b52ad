"""The allocator calls behind prefix hits across KV-cache groups (issue 13), C++ against the reference.

The machine of ``test_allocator_stateful`` plus random probe_chain / probe_anchored / take_cached /
cache_blocks_chained / cache_blocks_anchored calls, valid and invalid, with stamps and chain values
taken from earlier results so that hits, stale stamps and anchored entries all happen. After every
step both allocators agree on everything observable.
"""
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule
from test_allocator_stateful import HASHES, TOKENS, AllocatorVsReference


BROKEN = 2**64 - 1


class ProbesVsReference(AllocatorVsReference):
    """Probes ask mostly for entries the machine cached before (each block with its hash, tokens, salt and
    parent), so hits, misses after eviction and collisions all happen."""

    def entries(self):
        if not hasattr(self, "cached"):
            self.cached = []  # (hash, tokens of one block, context, parent) of every block offered to the cache
        return self.cached

    def offered(self, hashes, tokens, context, parents):
        if len(tokens) == 4 * len(hashes):
            self.entries().extend((h, tokens[4 * j:4 * j + 4], context, p) for j, (h, p) in
                                  enumerate(zip(hashes, parents)))

    def known_blocks(self, data, k):
        """k blocks from earlier offers (a run of one chain when they follow each other), or random ones."""
        if not self.entries() or data.draw(st.integers(0, 3)) == 0:
            hashes, tokens = self.blocks_of(data, k)
            return hashes, tokens, data.draw(st.sampled_from([0, 0, 5])), None
        picks = data.draw(st.lists(st.sampled_from(self.entries()), min_size=k, max_size=k))
        hashes = [h for h, _, _, _ in picks]
        tokens = [t for _, block, _, _ in picks for t in block]
        context = picks[0][2] if picks else 0
        return hashes, tokens, context, [p for _, _, _, p in picks]

    def remember(self, out):
        """Keep probed (block, stamp) pairs for take_cached, and stamps as parents."""
        ids, stamps, _ = out
        self.probed = getattr(self, "probed", []) + list(zip(ids, stamps))
        self.chains.extend(stamps)

    def blocks_of(self, data, k):
        """``(hashes, tokens)`` for k blocks: hashes mostly of cached blocks, tokens sometimes one short."""
        hashes = data.draw(st.lists(HASHES, min_size=k, max_size=k))
        n_tokens = data.draw(st.sampled_from([4 * k, 4 * k, 4 * k - 1])) if k else 0
        return hashes, data.draw(st.lists(TOKENS, min_size=n_tokens, max_size=n_tokens))

    @rule(data=st.data())
    def probe_chain(self, data):
        roots = [e for e in self.entries() if e[3] == 0]
        if roots and data.draw(st.booleans()):  # a first block cached after the root, then what followed it
            first = data.draw(st.sampled_from(roots))
            hashes, tokens, context = [first[0]], list(first[1]), first[2]
            for _ in range(data.draw(st.integers(0, 2))):
                nxt = [e for e in self.entries() if e[2] == context]
                if not nxt:
                    break
                e = data.draw(st.sampled_from(nxt))
                hashes, tokens = hashes + [e[0]], tokens + list(e[1])
        else:
            hashes, tokens, context, _ = self.known_blocks(data, data.draw(st.integers(0, 3)))
        status, out = self.both("probe_chain", hashes, tokens, context)
        if status == "ok":
            self.remember(out)

    @rule(data=st.data())
    def probe_anchored(self, data):
        k = data.draw(st.integers(0, 3))
        hashes, tokens, context, parents = self.known_blocks(data, k)
        if parents is None or data.draw(st.integers(0, 4)) == 0:
            n_parents = data.draw(st.sampled_from([k, k, k + 1]))
            parents = data.draw(st.lists(st.sampled_from(self.chains + [BROKEN]), min_size=n_parents,
                                         max_size=n_parents))
        status, out = self.both("probe_anchored", hashes, tokens, context, parents)
        if status == "ok":
            self.remember(out)

    @rule(data=st.data(), n=st.integers(-1, 6), query_blocks=st.integers(-1, 6), collisions=st.integers(-1, 2))
    def take_cached(self, data, n, query_blocks, collisions):
        probed = getattr(self, "probed", [])
        picks = data.draw(st.lists(st.sampled_from(probed), max_size=3)) if probed else []
        ids = [b for b, _ in picks]
        stamps = [s for _, s in picks]
        if data.draw(st.integers(0, 4)) == 0:  # a stale or bad stamp, a bad id, or one stamp too many
            choice = data.draw(st.integers(0, 2))
            if choice == 0:
                stamps = [s + 1 for s in stamps]
            elif choice == 1:
                ids = ids + [data.draw(st.integers(-1, 13))]
                stamps = stamps + [data.draw(st.sampled_from(self.chains))]
            else:
                stamps = stamps + [0]
        status, fresh = self.both("take_cached", ids, stamps, n, query_blocks, collisions)
        if status == "ok" and fresh is not None:
            self.held.extend(ids + fresh)

    @rule(data=st.data(), k=st.integers(1, 3), context=st.sampled_from([0, 5]), anchored=st.booleans())
    def cache_then_probe(self, data, k, context, anchored):
        """Cache k fresh blocks (as a chain from the root, or each after a known stamp), probe them back."""
        status, ids = self.both("allocate", k)
        if status != "ok":
            return
        self.held.extend(ids)
        hashes, tokens = self.blocks_of(data, k)
        tokens = tokens + [0] * (4 * k - len(tokens))
        if anchored:
            parents = data.draw(st.lists(st.sampled_from(self.chains), min_size=k, max_size=k))
            self.both("cache_blocks_anchored", ids, hashes, tokens, context, parents)
            self.offered(hashes, tokens, context, parents)
            self.remember(self.both("probe_anchored", hashes, tokens, context, parents)[1])
        else:
            chains = self.both("cache_blocks_chained", ids, hashes, tokens, context, 0)[1]
            self.offered(hashes, tokens, context, [0] + chains[:-1])
            self.remember(self.both("probe_chain", hashes, tokens, context)[1])

    @rule(data=st.data(), context=st.sampled_from([0, 5]))
    def cache_chained(self, data, context):
        if self.held and data.draw(st.booleans()):
            ids = data.draw(st.lists(st.sampled_from(self.held), min_size=1, max_size=3))
        else:
            ids = data.draw(st.lists(st.integers(-1, 13), max_size=3))
        hashes, tokens = self.blocks_of(data, len(ids))
        parent = data.draw(st.sampled_from(self.chains + [BROKEN]))
        status, chains = self.both("cache_blocks_chained", ids, hashes, tokens, context, parent)
        if status == "ok":
            self.chains.extend(chains)
            self.offered(hashes, tokens, context, [parent] + chains[:-1])

    @rule(data=st.data(), context=st.sampled_from([0, 5]))
    def cache_anchored(self, data, context):
        if self.held and data.draw(st.booleans()):
            ids = data.draw(st.lists(st.sampled_from(self.held), min_size=1, max_size=3))
        else:
            ids = data.draw(st.lists(st.integers(-1, 13), max_size=3))
        hashes, tokens = self.blocks_of(data, len(ids))
        n_parents = data.draw(st.sampled_from([len(ids), len(ids), len(ids) + 1]))
        parents = data.draw(st.lists(st.sampled_from(self.chains + [BROKEN]), min_size=n_parents,
                                     max_size=n_parents))
        if self.both("cache_blocks_anchored", ids, hashes, tokens, context, parents)[0] == "ok":
            self.offered(hashes, tokens, context, parents)


ProbesVsReference.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestProbesVsReference = ProbesVsReference.TestCase
