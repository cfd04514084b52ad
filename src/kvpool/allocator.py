"""The block allocator: reference-counted KV-cache blocks with LRU eviction and prefix caching.

A thin layer over the C++ core ``kvpool._C`` (``csrc/block_allocator.cpp``): ``BlockAllocator``
subclasses the compiled class, so every call goes straight to C++. Inputs may be numpy arrays or
plain lists; a C-contiguous ``int32`` (ids) / ``uint64`` (hashes) array is read in place, anything
else is converted once by :func:`_as_array`; results are numpy arrays the C++ core filled directly.
The core releases the GIL and guards its state with a mutex, so one allocator may be shared by
several threads. See ``docs/allocator.md`` for the design, the invariants and the eviction order.
"""
import numpy as np

from . import _C
from ._arrays import as_bool, as_hash_key, as_int, check_capacity, check_geometry, encode_extra, split_key
from .errors import InvalidArgumentError

__all__ = ["BlockAllocator", "hash_block_tokens", "ROOT_HASH", "CHAIN_ROOT"]

ROOT_HASH: int = _C.ROOT_HASH
"""Parent hash of a sequence's first block when ``parent_hash`` is None."""

CHAIN_ROOT: int = _C.CHAIN_ROOT
"""``parent`` of a sequence's first block in ``cache_blocks_verified``."""


class BlockAllocator(_C.BlockAllocator):
    """Fixed pool of ``num_blocks`` KV-cache blocks of ``block_size`` tokens.

    The methods are the C++ core's own (no Python frame on the hot path): ``allocate(n)``,
    ``free(ids)``, ``incref(ids)``, ``refcounts(ids)``, ``cache_blocks(ids, hashes)``,
    ``match_prefix(hashes)``, ``allocate_with_prefix(n, hashes, token_ids, context)``,
    ``cache_blocks_verified(ids, hashes, token_ids, context, parent)``, ``stats()``,
    ``check_invariants()``; properties ``num_blocks``, ``block_size``, ``enable_prefix_caching``,
    ``hash_key``, ``num_free_blocks``, ``num_cached_blocks``; elastic pools: ``grow(n)``, ``shrink(n)``,
    ``held_in_top(n)``, ``relocate_top(n)``, ``max_num_blocks``, ``free_top_blocks``.
    ``help(BlockAllocator.free)`` etc. show each one's docstring.

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool, ids ``0 .. num_blocks - 1`` (the same ids on every TP rank).
    block_size : int
        Tokens per block (for callers hashing blocks; the allocator itself only counts blocks).
    enable_prefix_caching : bool
        When False, ``cache_blocks`` validates its input but caches nothing and ``match_prefix``
        always returns an empty array.
    hash_key : int or bytes, optional
        The 128-bit key of the block hashes (an int in ``[0, 2**128)`` or 16 bytes). None draws a
        random key, so nobody outside the server can compute block hashes and craft collisions.
        Every TP rank must use the same key: pass ``PoolSize.hash_key`` from ``size_kv_pool`` (or
        one key your server broadcasts). Hash prompts with ``hash_tokens`` (or
        ``hash_block_tokens(..., key=allocator.hash_key)``).
    max_num_blocks : int, optional
        The capacity of an elastic pool (default: ``num_blocks``): ``grow(n)`` adds ids up to it,
        ``shrink(n)`` removes the top ids again (free ones only; ``relocate_top(n)`` moves held ones
        down first), ``held_in_top(n)`` and ``free_top_blocks`` tell what a shrink would meet. Every
        array is sized for the capacity once (zeroed pages, touched only when used). See
        docs/elastic.md.

    Notes
    -----
    Ids are ``[k] int32`` arrays (lists and other integer arrays are accepted and converted once);
    hashes are ``[k] uint64``. ``allocate`` hands out the least recently freed blocks first.
    ``free`` appends the blocks that reach refcount 0 to the free list in reverse order of ``ids``,
    so a sequence freed front to back keeps its prefix cached longest. Handing out a cached free
    block evicts it (its hash is forgotten). ``num_cached_blocks`` counts blocks with a hash, held
    or free. Every error is raised before anything changes. Safe to share between threads.

    Prefix integrity: ``match_prefix`` trusts hashes (for callers who verify). The verified pair
    ``allocate_with_prefix`` / ``cache_blocks_verified`` stores each cached block's tokens and
    compares them on every hit, after the very same cached prefix and salt: a hash collision is a
    counted miss (``stats()["hash_collisions"]``), never another prompt's KV. ``BlockTables`` uses
    only the verified pair. See docs/allocator.md, "Security model".
    """

    __slots__ = ()

    def __init__(self, num_blocks, block_size=16, enable_prefix_caching=True, hash_key=None, max_num_blocks=None):
        num_blocks, block_size = check_geometry(num_blocks, block_size)
        capacity = check_capacity(num_blocks, block_size, max_num_blocks)
        k0, k1 = split_key(as_hash_key(hash_key))
        super().__init__(num_blocks, block_size, as_bool(enable_prefix_caching, "enable_prefix_caching"), k0, k1,
                         capacity)

    def extra_key(self, extra=None) -> int:
        """The keyed 64-bit digest of a salt (``context`` of the verified calls); 0 for None."""
        return _extra_key(extra, self.hash_key)

    def hash_tokens(self, token_ids, extra=None) -> np.ndarray:
        """``[n // block_size] uint64`` chained hashes of a prompt under this allocator's key.

        Same as ``hash_block_tokens(token_ids, self.block_size, extra=extra, key=self.hash_key)``.
        """
        return hash_block_tokens(token_ids, self.block_size, extra=extra, key=self.hash_key)

    def __repr__(self):
        return (f"BlockAllocator(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"enable_prefix_caching={self.enable_prefix_caching}, max_num_blocks={self.max_num_blocks}, "
                f"free={self.num_free_blocks}, "
                f"cached={self.num_cached_blocks})")


def hash_block_tokens(token_ids, block_size, parent_hash=None, extra=None, key=None):
    """Chained 64-bit hashes of the full blocks of a token sequence (prefix-caching keys).

    Parameters
    ----------
    token_ids : array_like
        ``[n] int32`` token ids.
    block_size : int
        Tokens per block.
    parent_hash : int, optional
        Hash of the block before ``token_ids[0]`` (to continue a sequence); ``ROOT_HASH`` when None.
    extra : bytes, str or int, optional
        Mixed into every block's hash (a LoRA id, a multimodal hash, a cache salt). str is hashed
        as UTF-8, int as its minimal signed little-endian bytes; each type has its own tag, so
        ``1``, ``"1"`` and ``b"1"`` give different hashes. Use it as a per-tenant / per-LoRA cache
        salt (vLLM's ``cache_salt``): prompts with different salts never share a block.
    key : int or bytes, optional
        The 128-bit hash key (``BlockAllocator.hash_key``); None is key 0, the public unkeyed hash.

    Returns
    -------
    hashes : np.ndarray
        ``[n // block_size] uint64``: block ``i``'s hash covers its tokens, block ``i-1``'s hash
        (or ``parent_hash``) and ``extra``. A partial last block gets no hash.
    """
    block_size = as_int(block_size, "block_size")
    key = 0 if key is None else as_hash_key(key)
    if parent_hash is None:
        parent_hash = ROOT_HASH
    else:
        parent_hash = as_int(parent_hash, "parent_hash")
        if not 0 <= parent_hash < 2**64:
            raise InvalidArgumentError(f"hash_block_tokens(): parent_hash={parent_hash} must be in [0, 2**64); "
                                       "pass a hash returned by hash_block_tokens()")
    return _C.hash_block_tokens(token_ids, block_size, parent_hash, _extra_key(extra, key), *split_key(key))


def _extra_key(extra, key):
    if extra is None:
        return 0
    tag, payload = encode_extra(extra)
    return _C.hash_extra(tag, payload, *split_key(key))
