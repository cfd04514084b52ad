"""Pure-Python twin of kvpool's C++ block allocator and block hash: small, obviously right, slow.

It is the oracle of the allocator tests and the baseline of ``benchmarks/bench_allocator.py``,
and other parts may use it in their tests. It has the same API and the same behaviour as
:mod:`kvpool.allocator`: the same ids in the same order, the same error classes raised before any
state changes, and the same hash values (``docs/allocator.md`` defines the hash).
"""
from collections import Counter, OrderedDict
from operator import index

import numpy as np

from .errors import BlockIndexError, InvalidArgumentError, OutOfBlocksError

__all__ = ["ReferenceBlockAllocator", "hash_block_tokens", "encode_extra", "ROOT_HASH"]

# ---- block hash ---------------------------------------------------------------------------

MASK = (1 << 64) - 1
K1 = 0x9E3779B97F4A7C15
K2 = 0xC2B2AE3D27D4EB4F
K3 = 0x165667B19E3779F9
ROOT_HASH = 0x00006B76706F6F6C  # parent of the first block when none is given ("kvpool" in ASCII)


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


def encode_extra(extra):
    """``extra`` as ``(tag, payload bytes)``: bytes-like 1, str 2 (UTF-8), int 3 (minimal signed little-endian)."""
    if isinstance(extra, (bytes, bytearray, memoryview)):
        return 1, bytes(extra)
    if isinstance(extra, str):
        return 2, extra.encode("utf-8")
    if isinstance(extra, (int, np.integer)):
        value = int(extra)
        return 3, value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    raise InvalidArgumentError(
        f"hash_block_tokens(): extra={extra!r} of type {type(extra).__name__} is not supported; "
        "pass bytes, str or int (e.g. a LoRA id or a cache salt), or None")


def hash_extra(tag, data):
    """64-bit digest of ``data`` under a type tag; 0 stands for "no extra"."""
    e = _mix64(K1 ^ tag)
    for pos in range(0, len(data), 8):
        e = _absorb(e, int.from_bytes(data[pos:pos + 8], "little"))  # a short last word is zero-padded
    return _mix64(e ^ len(data))


def hash_block_tokens(token_ids, block_size, parent_hash=None, extra=None):
    """One chained 64-bit hash per full block of ``token_ids``: ``[len(token_ids) // block_size] uint64``."""
    array = np.asarray(token_ids)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise InvalidArgumentError(f"hash_block_tokens(): token_ids must be 1-D integers, got "
                                   f"shape {array.shape} dtype {array.dtype}")
    tokens = array.tolist()
    if not all(-(1 << 31) <= t < (1 << 31) for t in tokens):
        raise InvalidArgumentError("hash_block_tokens(): token ids must fit in int32")
    if index(block_size) < 1:
        raise InvalidArgumentError(f"hash_block_tokens(): block_size={block_size} must be >= 1")
    parent = ROOT_HASH if parent_hash is None else index(parent_hash)
    if not 0 <= parent <= MASK:
        raise InvalidArgumentError(f"hash_block_tokens(): parent_hash={parent} must be in [0, 2**64)")
    extra_key = 0 if extra is None else hash_extra(*encode_extra(extra))
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = K3
        for t in tokens[start:start + block_size]:
            digest = _absorb(digest, t & 0xFFFFFFFF)
        parent = _mix64(((parent * K2) & MASK) ^ digest ^ extra_key)
        hashes.append(parent)
    return np.array(hashes, dtype=np.uint64)


# ---- allocator ----------------------------------------------------------------------------


def _int(value, what):
    try:
        return index(value)
    except TypeError:
        raise InvalidArgumentError(f"{what}={value!r} must be an integer") from None


class ReferenceBlockAllocator:
    """The allocator as plain Python containers (see :class:`kvpool.allocator.BlockAllocator`)."""

    def __init__(self, num_blocks, block_size=16, enable_prefix_caching=True):
        num_blocks, block_size = _int(num_blocks, "num_blocks"), _int(block_size, "block_size")
        if not 1 <= num_blocks <= 2**31 - 2:
            raise InvalidArgumentError(f"BlockAllocator: num_blocks={num_blocks} must be in [1, 2147483646]")
        if block_size < 1:
            raise InvalidArgumentError(f"BlockAllocator: block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._refcount = [0] * num_blocks
        self._free = OrderedDict.fromkeys(range(num_blocks))  # LRU order: first = next handed out
        self._hash_of = {}  # block -> hash
        self._block_of = {}  # hash -> block
        self._stats = dict.fromkeys(
            ["allocations", "frees", "increfs", "prefix_queries", "prefix_query_blocks",
             "prefix_hit_blocks", "cached_blocks_added", "evictions", "high_water_mark"], 0)

    @property
    def num_free_blocks(self):
        return len(self._free)

    @property
    def num_cached_blocks(self):
        return len(self._hash_of)

    def _ids(self, ids, fn):
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise InvalidArgumentError(f"{fn}: ids must be 1-D, got shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{fn}: ids must be integers, got dtype {ids.dtype}")
        ids = [_int(i, f"{fn}: id") for i in ids.tolist()]
        for j, b in enumerate(ids):
            if not 0 <= b < self.num_blocks:
                raise BlockIndexError(f"{fn}: block id {b} (position {j}) is out of range [0, {self.num_blocks})")
        return ids

    def _note_used(self):
        used = self.num_blocks - len(self._free)
        self._stats["high_water_mark"] = max(self._stats["high_water_mark"], used)

    def allocate(self, n):
        n = _int(n, "n")
        if n < 0:
            raise InvalidArgumentError(f"allocate(): n={n} must be >= 0")
        if n > len(self._free):
            raise OutOfBlocksError(f"allocate(): requested {n} blocks but only {len(self._free)} are free",
                                   requested=n, available=len(self._free))
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            if b in self._hash_of:  # evict: the block's cached content is about to be overwritten
                del self._block_of[self._hash_of.pop(b)]
                self._stats["evictions"] += 1
            self._refcount[b] = 1
            out.append(b)
        self._stats["allocations"] += n
        self._note_used()
        return np.array(out, dtype=np.int32)

    def free(self, ids):
        ids = self._ids(ids, "free()")
        for b, count in Counter(ids).items():
            if count > self._refcount[b]:
                raise InvalidArgumentError(f"free(): block {b} freed {count} times, refcount {self._refcount[b]}")
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
        for b in ids:
            self._refcount[b] += 1
        self._stats["increfs"] += len(ids)

    def refcounts(self, ids):
        return np.array([self._refcount[b] for b in self._ids(ids, "refcounts()")], dtype=np.int32)

    def cache_blocks(self, ids, hashes):
        hashes = [int(h) for h in np.asarray(hashes, dtype=np.uint64).reshape(-1).tolist()]
        if len(hashes) != len(np.asarray(ids).reshape(-1)):
            raise InvalidArgumentError(f"cache_blocks(): {len(ids)} ids but {len(hashes)} hashes")
        ids = self._ids(ids, "cache_blocks()")
        wanted = {}  # block -> the hash this call gives it
        for b, h in zip(ids, hashes):
            if self._refcount[b] == 0:
                raise InvalidArgumentError(f"cache_blocks(): block {b} is free")
            if self._hash_of.get(b, wanted.get(b, h)) != h:
                raise InvalidArgumentError(f"cache_blocks(): block {b} already has another hash")
            wanted.setdefault(b, h)
        if not self.enable_prefix_caching:
            return
        for b, h in zip(ids, hashes):
            if b not in self._hash_of and h not in self._block_of:  # first writer wins
                self._hash_of[b] = h
                self._block_of[h] = b
                self._stats["cached_blocks_added"] += 1

    def match_prefix(self, hashes):
        hashes = [int(h) for h in np.asarray(hashes, dtype=np.uint64).reshape(-1).tolist()]
        self._stats["prefix_queries"] += 1
        self._stats["prefix_query_blocks"] += len(hashes)
        hit = []
        for h in hashes if self.enable_prefix_caching else []:
            b = self._block_of.get(h)
            if b is None:
                break
            self._free.pop(b, None)  # a cached free block comes back to life
            self._refcount[b] += 1
            hit.append(b)
        self._stats["prefix_hit_blocks"] += len(hit)
        self._note_used()
        return np.array(hit, dtype=np.int32)

    def stats(self):
        free = len(self._free)
        return {**self._stats, "num_blocks": self.num_blocks, "free_blocks": free,
                "used_blocks": self.num_blocks - free, "cached_blocks": len(self._hash_of)}

    def check_invariants(self):
        """Raises AssertionError when the containers disagree (for tests)."""
        assert all(rc >= 0 for rc in self._refcount)
        assert set(self._free) == {b for b, rc in enumerate(self._refcount) if rc == 0}
        assert {h: b for b, h in self._hash_of.items()} == self._block_of
