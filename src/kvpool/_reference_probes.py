"""The reference allocator's calls for prefix caching across KV-cache groups (issue 13), and the chain values.

A hybrid model's hit is the longest h every group can serve, decided before any block is taken:
read-only probes (a verified chain walk, or blocks each verified against a given parent stamp), then
one `take_cached` that takes the hits and the fresh blocks together, all or nothing. Stamps are never
reused, so `take_cached` knows a probed block still holds what was verified. A windowed group's
entries are cached one by one after given parents (`cache_blocks_anchored`). Mixed into
`kvpool._reference.ReferenceBlockAllocator`, whose state these methods read and change; the C++
twins are ``BlockAllocator.probe_chain`` & co. (``csrc/allocator_groups.cpp``).
"""
import numpy as np

from ._arrays import as_exact_array, as_int
from .errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError

CHAIN_ROOT = 0  # chain value before a sequence's first block
CHAIN_BROKEN = (1 << 64) - 1  # chain value after a block that could not be cached


class GroupProbesMixin:
    """Probes, the all-or-nothing take and anchored caching of `ReferenceBlockAllocator`."""

    def _probe_input(self, fn, hashes, token_ids, context, parents=None):
        hashes = self._hashes(hashes, fn)
        tokens = as_exact_array(token_ids, np.int32, fn, "token_ids").tolist()
        context = self._u64(context, fn, "context")
        if parents is not None:
            parents = as_exact_array(parents, np.uint64, fn, "parents").tolist()
        blocks = self._blocks(tokens, len(hashes), fn)
        if parents is not None and len(parents) != len(hashes):
            raise InvalidArgumentError(f"{fn}: got {len(hashes)} blocks but {len(parents)} parents; pass one per block")
        return hashes, blocks, context, parents

    def probe_chain(self, hashes, token_ids, context=0):
        """The verified walk of `allocate_with_prefix`, taking nothing (no reference, no statistic).

        Returns
        -------
        (np.ndarray, np.ndarray, bool)
            ``ids [h] int32`` of the leading blocks whose entries hold exactly `token_ids`
            (``[k * block_size]``) under `context` after the same cached prefix, their ``stamps [h]
            uint64`` (for `take_cached`), and whether the walk stopped at a block of other content.
        """
        hashes, blocks, context, _ = self._probe_input("probe_chain()", hashes, token_ids, context)
        hit, stamps, collided = self._walk(hashes, blocks, context, CHAIN_ROOT)
        return np.array(hit, dtype=np.int32), np.array(stamps, dtype=np.uint64), collided

    def probe_anchored(self, hashes, token_ids, context, parents):
        """Blocks verified one by one, each after its own parent stamp, from the last one down; takes nothing.

        Block j of ``hashes [k]`` is a hit when its entry holds its tokens under `context` after the
        cached block whose stamp is ``parents[j]`` (``[k] uint64``). Stops at the first miss.

        Returns
        -------
        (np.ndarray, np.ndarray, bool)
            ``ids [r] int32`` and ``stamps [r] uint64`` of the last r blocks, and whether the miss
            found a block of other content.
        """
        hashes, blocks, context, parents = self._probe_input("probe_anchored()", hashes, token_ids, context, parents)
        ids, stamps, collided = [], [], False
        for h, tokens, parent in reversed(list(zip(hashes, blocks, parents))):
            hit, found, collided = self._walk([h], [tokens], context, parent)
            if not hit:
                break
            ids.append(hit[0])
            stamps.append(found[0])
        return np.array(ids[::-1], dtype=np.int32), np.array(stamps[::-1], dtype=np.uint64), collided

    def take_cached(self, ids, stamps, n, query_blocks=0, collisions=0):
        """One reference on each probed block (each still under its stamp), then `n` fresh blocks; all or nothing.

        Counts one prefix query of `query_blocks` hashes that met `collisions` collisions and
        ``len(ids)`` hits, only when it succeeds.

        Returns
        -------
        np.ndarray or None
            ``[n] int32`` the fresh blocks; None, with nothing changed, when a block no longer holds
            the entry it was probed with (evicted since).
        """
        fn = "take_cached()"
        ids = as_exact_array(ids, np.int32, fn, "ids", BlockIndexError).tolist()
        stamps = as_exact_array(stamps, np.uint64, fn, "stamps").tolist()
        n, query_blocks, collisions = (as_int(v, f"{fn}: {w}") for v, w in
                                       ((n, "n"), (query_blocks, "query_blocks"), (collisions, "collisions")))
        if n < 0:
            raise InvalidArgumentError(f"{fn}: n={n} must be >= 0 (fresh blocks wanted)")
        if len(stamps) != len(ids):
            raise InvalidArgumentError(f"{fn}: got {len(ids)} blocks but {len(stamps)} stamps; pass one per block")
        if query_blocks < 0 or collisions < 0:
            raise InvalidArgumentError(f"{fn}: query_blocks={query_blocks} and collisions={collisions} must be >= 0")
        self._check_range(ids, fn)
        for j, b in enumerate(ids):
            if b in ids[:j]:
                raise InvalidArgumentError(f"{fn}: block {b} (position {j}) is listed twice; a sequence takes each "
                                           "cached block once")
        for b, stamp in zip(ids, stamps):
            entry = self._entry.get(b)
            if not self.enable_prefix_caching or entry is None or stamp == 0 or entry[0] != stamp:
                return None
        self._check_new_references(fn, ids)
        available = len(self._free) - sum(self._refcount[b] == 0 for b in ids)
        if n > available:
            raise OutOfBlocksError(f"{fn}: {len(ids)} blocks are cached, the other {n} need new blocks but only "
                                   f"{available} are free", requested=n, available=available)
        self._take(ids)
        fresh = self._pop_free(n)
        self._stats["prefix_queries"] += 1
        self._stats["prefix_query_blocks"] += query_blocks
        self._stats["prefix_hit_blocks"] += len(ids)
        self._stats["hash_collisions"] += collisions
        self._note_used()
        return np.array(fresh, dtype=np.int32)

    def cache_blocks_anchored(self, ids, hashes, token_ids, context, parents):
        """Cache held blocks each on its own: ``ids[j]`` as a verified entry after the stamp ``parents[j]``.

        ``parents [k] uint64``; `CHAIN_BROKEN` skips the block, and so does a block cached already.
        Same entry cached already: not cached twice; other content under the hash: a counted
        collision, a free block replaced, a held one kept (this block stays uncached).
        """
        fn = "cache_blocks_anchored()"
        ids, hashes, tokens, context = self._cache_input(fn, ids, hashes, token_ids, context)
        parents = as_exact_array(parents, np.uint64, fn, "parents").tolist()
        if len(parents) != len(ids):  # the counts first, then the blocks
            raise InvalidArgumentError(f"{fn}: got {len(ids)} blocks but {len(parents)} parents; pass one per block")
        ids, hashes, blocks = self._cache_checked(fn, ids, hashes, tokens)
        if not self.enable_prefix_caching:
            return
        for b, h, tokens, parent in zip(ids, hashes, blocks, parents):
            if parent != CHAIN_BROKEN and b not in self._hash_of:
                self._cache_one(b, h, tokens, context, parent)
