"""Pure-Python twin of kvpool's C++ block allocator and block hash: small, obviously right, slow.

It is the oracle of the allocator tests and the baseline of ``benchmarks/bench_allocator.py``,
and other parts may use it in their tests. It has the same API and the same behaviour as
:mod:`kvpool.allocator`: the same ids in the same order, the same error classes raised before any
state changes, and the same hash values (``docs/allocator.md`` defines the hash). Input
conversion is shared with the C++ bindings (:mod:`kvpool._arrays`), so both accept and refuse
exactly the same values.
"""
from collections import Counter, OrderedDict
from itertools import count

import numpy as np

from ._arrays import as_bool, as_exact_array, as_hash_key, as_int, check_capacity, check_geometry, encode_extra, split_key
from ._reference_elastic import ElasticMixin
from ._reference_probes import CHAIN_BROKEN, CHAIN_ROOT, GroupProbesMixin
from .errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError

__all__ = ["ReferenceBlockAllocator", "hash_block_tokens", "encode_extra", "ROOT_HASH", "CHAIN_ROOT", "CHAIN_BROKEN"]

# ---- block hash ---------------------------------------------------------------------------

MASK = (1 << 64) - 1
K1 = 0x9E3779B97F4A7C15
K2 = 0xC2B2AE3D27D4EB4F
K3 = 0x165667B19E3779F9
ROOT_HASH = 0x00006B76706F6F6C  # parent of the first block when none is given ("kvpool" in ASCII)
MAX_REFCOUNT = (1 << 31) - 1


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & MASK


def _mix64(x):
    """splitmix64's finalizer."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _absorb(state, word):
    return (_rotl(state ^ ((word * K2) & MASK), 31) * K1) & MASK


def hash_extra(tag, data, key=0):
    """64-bit digest of ``data`` under a type tag and a 128-bit key; 0 stands for "no extra"."""
    k0, k1 = split_key(key)
    e = _mix64(K1 ^ tag ^ k0)
    for pos in range(0, len(data), 8):
        e = _absorb(e, int.from_bytes(data[pos:pos + 8], "little"))  # a short last word is zero-padded
    return _mix64(e ^ len(data) ^ k1)


def extra_key(extra, key=0):
    """The keyed digest of a salt (0 for None): what the verified calls take as ``context``."""
    return 0 if extra is None else hash_extra(*encode_extra(extra), key)


def hash_block_tokens(token_ids, block_size, parent_hash=None, extra=None, key=None):
    """One chained 64-bit hash per full block of ``token_ids``: ``[len(token_ids) // block_size] uint64``."""
    tokens = as_exact_array(token_ids, np.int32, "hash_block_tokens()", "token_ids").tolist()
    block_size = as_int(block_size, "block_size")
    if block_size < 1:
        raise InvalidArgumentError(f"hash_block_tokens(): block_size={block_size} must be >= 1")
    key = 0 if key is None else as_hash_key(key)
    k0, k1 = split_key(key)
    parent = ROOT_HASH if parent_hash is None else as_int(parent_hash, "parent_hash")
    if not 0 <= parent <= MASK:
        raise InvalidArgumentError(f"hash_block_tokens(): parent_hash={parent} must be in [0, 2**64)")
    salt = extra_key(extra, key)
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = K3 ^ k0
        for t in tokens[start:start + block_size]:
            digest = _absorb(digest, t & 0xFFFFFFFF)
        parent = _mix64(((parent * K2) & MASK) ^ digest ^ salt ^ k1)
        hashes.append(parent)
    return np.array(hashes, dtype=np.uint64)


# ---- allocator ----------------------------------------------------------------------------


class ReferenceBlockAllocator(GroupProbesMixin, ElasticMixin):
    """The allocator as plain Python containers (see :class:`kvpool.allocator.BlockAllocator`)."""

    def __init__(self, num_blocks, block_size=16, enable_prefix_caching=True, hash_key=None, max_num_blocks=None):
        self.num_blocks, self.block_size = check_geometry(num_blocks, block_size)
        self.max_num_blocks = check_capacity(self.num_blocks, self.block_size, max_num_blocks)
        self.enable_prefix_caching = as_bool(enable_prefix_caching, "enable_prefix_caching")
        self.hash_key = as_hash_key(hash_key)
        self._refcount = [0] * self.max_num_blocks
        self._free = OrderedDict.fromkeys(range(self.num_blocks))  # LRU order: first = next handed out
        self._hash_of = {}  # block -> hash
        self._block_of = {}  # hash -> block
        self._entry = {}  # block -> (stamp, parent stamp, context, tokens): verified entries
        self._stamps = count(1)
        self._stats = dict.fromkeys(
            ["allocations", "frees", "increfs", "prefix_queries", "prefix_query_blocks",
             "prefix_hit_blocks", "cached_blocks_added", "evictions", "hash_collisions", "high_water_mark"], 0)

    @property
    def num_free_blocks(self):
        return len(self._free)

    @property
    def num_cached_blocks(self):
        return len(self._hash_of)

    def extra_key(self, extra=None):
        return extra_key(extra, self.hash_key)

    def hash_tokens(self, token_ids, extra=None):
        return hash_block_tokens(token_ids, self.block_size, extra=extra, key=self.hash_key)

    # ---- input --------------------------------------------------------------------------

    def _ids(self, ids, fn, hashes=None):
        """Converted ids (and hashes), checked in the C++ order: convert both, count, then range."""
        ids = as_exact_array(ids, np.int32, fn, "ids", BlockIndexError).tolist()
        if hashes is not None:
            hashes = self._hashes(hashes, fn)
            if len(hashes) != len(ids):
                raise InvalidArgumentError(f"{fn}: {len(ids)} ids but {len(hashes)} hashes")
        self._check_range(ids, fn)
        return ids if hashes is None else (ids, hashes)

    def _check_range(self, ids, fn):
        for j, b in enumerate(ids):
            if not 0 <= b < self.num_blocks:
                raise BlockIndexError(f"{fn}: block id {b} (position {j}) is out of range [0, {self.num_blocks})")

    @staticmethod
    def _hashes(hashes, fn):
        return as_exact_array(hashes, np.uint64, fn, "hashes").tolist()

    def _blocks(self, tokens, k, fn):
        """``[k * block_size]`` token ids as k tuples, one per block."""
        if len(tokens) != k * self.block_size:
            raise InvalidArgumentError(f"{fn}: got {len(tokens)} token ids for {k} blocks of {self.block_size}")
        return [tuple(tokens[j * self.block_size:(j + 1) * self.block_size]) for j in range(k)]

    @staticmethod
    def _u64(value, fn, what):
        if isinstance(value, (bool, np.bool_)):
            raise InvalidArgumentError(f"{fn}: {what}={value!r} must be an integer in [0, 2**64)")
        value = as_int(value, f"{fn}: {what}")
        if not 0 <= value <= MASK:
            raise InvalidArgumentError(f"{fn}: {what}={value} must be an integer in [0, 2**64)")
        return value

    def _check_new_references(self, fn, ids):
        for b, extra in Counter(ids).items():
            if self._refcount[b] + extra > MAX_REFCOUNT:
                raise InvalidArgumentError(f"{fn}: block {b} would hold more than 2147483647 references")

    def _check_cacheable(self, fn, ids, hashes):
        wanted = {}  # block -> the hash this call gives it
        for b, h in zip(ids, hashes):
            if self._refcount[b] == 0:
                raise InvalidArgumentError(f"{fn}: block {b} is free")
            if self._hash_of.get(b, wanted.get(b, h)) != h:
                raise InvalidArgumentError(f"{fn}: block {b} already has another hash")
            wanted.setdefault(b, h)

    # ---- state changes --------------------------------------------------------------------

    def _note_used(self):
        used = self.num_blocks - len(self._free)
        self._stats["high_water_mark"] = max(self._stats["high_water_mark"], used)

    def _forget(self, b):
        del self._block_of[self._hash_of.pop(b)]
        self._entry.pop(b, None)

    def _cache(self, b, h):
        self._hash_of[b] = h
        self._block_of[h] = b
        self._stats["cached_blocks_added"] += 1

    def _pop_free(self, n):
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            if b in self._hash_of:  # evict: the block's cached content is about to be overwritten
                self._forget(b)
                self._stats["evictions"] += 1
            self._refcount[b] = 1
            out.append(b)
        self._stats["allocations"] += n
        return out

    def _take(self, hits):
        for b in hits:
            self._free.pop(b, None)  # a cached free block comes back to life
            self._refcount[b] += 1

    # ---- public operations ------------------------------------------------------------------

    def allocate(self, n):
        n = as_int(n, "n")
        if n < 0:
            raise InvalidArgumentError(f"allocate(): n={n} must be >= 0")
        if n > len(self._free):
            raise OutOfBlocksError(f"allocate(): requested {n} blocks but only {len(self._free)} are free",
                                   requested=n, available=len(self._free))
        out = self._pop_free(n)
        self._note_used()
        return np.array(out, dtype=np.int32)

    def free(self, ids):
        ids = self._ids(ids, "free()")
        for b, times in Counter(ids).items():
            if times > self._refcount[b]:
                raise InvalidArgumentError(f"free(): block {b} freed {times} times, refcount {self._refcount[b]}")
        for b in reversed(ids):
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free[b] = None  # appended at the tail: evicted last
                self._stats["frees"] += 1

    def incref(self, ids):
        ids = self._ids(ids, "incref()")
        for b in ids:
            if self._refcount[b] == 0:
                raise InvalidArgumentError(f"incref(): block {b} is free")
        self._check_new_references("incref()", ids)
        for b in ids:
            self._refcount[b] += 1
        self._stats["increfs"] += len(ids)

    def refcounts(self, ids):
        return np.array([self._refcount[b] for b in self._ids(ids, "refcounts()")], dtype=np.int32)

    def cache_blocks(self, ids, hashes):
        ids, hashes = self._ids(ids, "cache_blocks()", hashes)
        self._check_cacheable("cache_blocks()", ids, hashes)
        if not self.enable_prefix_caching:
            return
        for b, h in zip(ids, hashes):
            if b not in self._hash_of and h not in self._block_of:  # first writer wins
                self._cache(b, h)

    def match_prefix(self, hashes):
        hashes = self._hashes(hashes, "match_prefix()")
        hit = []
        for h in hashes if self.enable_prefix_caching else []:
            b = self._block_of.get(h)
            if b is None:
                break
            hit.append(b)
        self._check_new_references("match_prefix()", hit)
        self._take(hit)
        self._stats["prefix_queries"] += 1
        self._stats["prefix_query_blocks"] += len(hashes)
        self._stats["prefix_hit_blocks"] += len(hit)
        self._note_used()
        return np.array(hit, dtype=np.int32)

    # ---- verified prefix caching: every hit's tokens, salt and prefix compared ------------------

    def _holds(self, b, tokens, context, parent):
        entry = self._entry.get(b)
        return entry is not None and entry[1:] == (parent, context, tokens)

    def _other_content(self, b, tokens, context):
        entry = self._entry.get(b)
        return entry is not None and entry[2:] != (context, tokens)

    def _walk(self, hashes, blocks, context, parent):
        """The verified chain walk: ``(hits, stamps, collided)`` of the longest prefix held after `parent`."""
        hit, stamps, collided = [], [], False
        for h, tokens in zip(hashes, blocks) if self.enable_prefix_caching else []:
            b = self._block_of.get(h)
            if b is None:
                break
            if not self._holds(b, tokens, context, parent):
                collided = self._other_content(b, tokens, context)
                break
            hit.append(b)
            parent = self._entry[b][0]
            stamps.append(parent)
        return hit, stamps, collided

    def allocate_with_prefix(self, n, hashes, token_ids, context=0):
        fn = "allocate_with_prefix()"
        n = as_int(n, "n")
        hashes = self._hashes(hashes, fn)
        tokens = as_exact_array(token_ids, np.int32, fn, "token_ids").tolist()
        context = self._u64(context, fn, "context")
        if n < 0:
            raise InvalidArgumentError(f"{fn}: n={n} must be >= 0")
        blocks = self._blocks(tokens, len(hashes), fn)
        hit, stamps, collided = self._walk(hashes[:n], blocks[:n], context, CHAIN_ROOT)
        parent = stamps[-1] if stamps else CHAIN_ROOT
        self._check_new_references(fn, hit)
        available = len(self._free) - sum(self._refcount[b] == 0 for b in hit)
        if n - len(hit) > available:
            raise OutOfBlocksError(f"{fn}: {n - len(hit)} new blocks needed but only {available} are free",
                                   requested=n - len(hit), available=available)
        self._take(hit)
        fresh = self._pop_free(n - len(hit))
        self._stats["prefix_queries"] += 1
        self._stats["prefix_query_blocks"] += len(hashes)
        self._stats["prefix_hit_blocks"] += len(hit)
        self._stats["hash_collisions"] += collided
        self._note_used()
        return np.array(hit + fresh, dtype=np.int32), len(hit), parent

    def _cache_input(self, fn, ids, hashes, token_ids, context):
        """The converted arguments of the caching calls, in the bindings' order."""
        ids = as_exact_array(ids, np.int32, fn, "ids", BlockIndexError).tolist()
        hashes = self._hashes(hashes, fn)
        tokens = as_exact_array(token_ids, np.int32, fn, "token_ids").tolist()
        return ids, hashes, tokens, self._u64(context, fn, "context")

    def _cache_checked(self, fn, ids, hashes, tokens):
        """``(ids, hashes, blocks)`` once ids, hashes and the token count are valid for caching."""
        ids, hashes = self._ids(ids, fn, hashes)
        self._check_cacheable(fn, ids, hashes)
        return ids, hashes, self._blocks(tokens, len(ids), fn)

    def _cache_one(self, b, h, tokens, context, chain):
        """Cache held block b as a verified entry after `chain`; returns the chain value after it."""
        if chain == CHAIN_BROKEN:
            return CHAIN_BROKEN  # nothing after a block that could not be cached is cached
        if b in self._hash_of:  # cached already: a verified hit, or a fork twin's block
            return self._entry[b][0] if self._holds(b, tokens, context, chain) else CHAIN_BROKEN
        q = self._block_of.get(h)
        if q is not None and self._holds(q, tokens, context, chain):
            return self._entry[q][0]
        if q is not None:
            self._stats["hash_collisions"] += self._other_content(q, tokens, context)
            if self._refcount[q]:
                return CHAIN_BROKEN  # a held block keeps its hash
            self._forget(q)  # a free block under our hash holds another prefix: ours replaces it
        self._cache(b, h)
        stamp = next(self._stamps)
        self._entry[b] = (stamp, chain, context, tokens)
        return stamp

    def cache_blocks_verified(self, ids, hashes, token_ids, context=0, parent=CHAIN_ROOT):
        return self._cache_chain("cache_blocks_verified()", ids, hashes, token_ids, context, parent)[-1]

    def cache_blocks_chained(self, ids, hashes, token_ids, context=0, parent=CHAIN_ROOT):
        """`cache_blocks_verified` returning ``[k] uint64``, the chain value after every block (`CHAIN_BROKEN`
        from where caching stopped): the anchors of a hybrid model's windowed groups."""
        return np.array(self._cache_chain("cache_blocks_chained()", ids, hashes, token_ids, context, parent)[1:],
                        dtype=np.uint64)

    def _cache_chain(self, fn, ids, hashes, token_ids, context, parent):
        """The chain value before and after each block: ``[parent, after ids[0], ...]``."""
        ids, hashes, tokens, context = self._cache_input(fn, ids, hashes, token_ids, context)
        chains = [self._u64(parent, fn, "parent")]
        ids, hashes, blocks = self._cache_checked(fn, ids, hashes, tokens)
        if not self.enable_prefix_caching:
            return [CHAIN_BROKEN] * (len(ids) + 1)
        for b, h, tokens in zip(ids, hashes, blocks):
            chains.append(self._cache_one(b, h, tokens, context, chains[-1]))
        return chains

    def stats(self):
        free = len(self._free)
        entry_bytes = self.max_num_blocks * (4 * self.block_size + 24) if self.enable_prefix_caching else 0
        return {**self._stats, "num_blocks": self.num_blocks, "free_blocks": free,
                "used_blocks": self.num_blocks - free, "cached_blocks": len(self._hash_of),
                "prefix_entry_bytes": entry_bytes}

    def check_invariants(self):
        """Raises AssertionError when the containers disagree (for tests)."""
        assert all(rc >= 0 for rc in self._refcount)
        assert set(self._free) == {b for b, rc in enumerate(self._refcount[:self.num_blocks]) if rc == 0}
        assert not any(self._refcount[self.num_blocks:]) and all(b < self.num_blocks for b in self._hash_of)
        assert {h: b for b, h in self._hash_of.items()} == self._block_of
        assert set(self._entry) <= set(self._hash_of)
