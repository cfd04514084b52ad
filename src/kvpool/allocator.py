"""The block allocator: reference-counted KV-cache blocks with LRU eviction and prefix caching.

A thin layer over the C++ core ``kvpool._C`` (``csrc/block_allocator.cpp``): ``BlockAllocator``
subclasses the compiled class, so every call goes straight to C++. Inputs may be numpy arrays or
plain lists; a C-contiguous ``int32`` (ids) / ``uint64`` (hashes) array is read in place, anything
else is converted once by :func:`_as_array`; results are numpy arrays the C++ core filled directly.
The core releases the GIL and guards its state with a mutex, so one allocator may be shared by
several threads. See ``docs/allocator.md`` for the design, the invariants and the eviction order.
"""
from operator import index

import numpy as np

from . import _C
from .errors import InvalidArgumentError

__all__ = ["BlockAllocator", "hash_block_tokens", "ROOT_HASH"]

ROOT_HASH: int = _C.ROOT_HASH
"""Parent hash of a sequence's first block when ``parent_hash`` is None."""



def _as_int(value, what):
    if type(value) is int:
        return value
    try:
        return index(value)
    except TypeError:
        raise InvalidArgumentError(f"{what}={value!r} must be an integer, got {type(value).__name__}") from None


def _as_array(values, dtype, fn, what, range_error=InvalidArgumentError):
    """``values`` as a 1-D C-contiguous array of ``dtype``, converted once.

    Called by the C++ bindings for any input that is not such an array already (lists, other
    integer dtypes, strided views). Refuses values that would not survive the cast.
    """
    array = np.asarray(values)
    if array.ndim != 1:
        raise InvalidArgumentError(f"{fn}: {what} must be 1-D, got shape {array.shape}; flatten it first")
    if array.size == 0:
        return np.empty(0, dtype=dtype)
    if array.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"{fn}: {what} must be integers, got dtype {array.dtype} (first value {array[0]!r}); "
            f"pass a list of ints or a {dtype} array")
    info = np.iinfo(dtype)
    low, high = array.min(), array.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise range_error(f"{fn}: {what} value {bad} does not fit in {dtype}; "
                          f"valid values are [{info.min}, {info.max}]")
    return np.ascontiguousarray(array, dtype=dtype)


class BlockAllocator(_C.BlockAllocator):
    """Fixed pool of ``num_blocks`` KV-cache blocks of ``block_size`` tokens.

    The methods are the C++ core's own (no Python frame on the hot path): ``allocate(n)``,
    ``free(ids)``, ``incref(ids)``, ``refcounts(ids)``, ``cache_blocks(ids, hashes)``,
    ``match_prefix(hashes)``, ``stats()``, ``check_invariants()``; properties ``num_blocks``,
    ``block_size``, ``enable_prefix_caching``, ``num_free_blocks``, ``num_cached_blocks``.
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

    Notes
    -----
    Ids are ``[k] int32`` arrays (lists and other integer arrays are accepted and converted once);
    hashes are ``[k] uint64``. ``allocate`` hands out the least recently freed blocks first.
    ``free`` appends the blocks that reach refcount 0 to the free list in reverse order of ``ids``,
    so a sequence freed front to back keeps its prefix cached longest. Handing out a cached free
    block evicts it (its hash is forgotten). ``num_cached_blocks`` counts blocks with a hash, held
    or free. Every error is raised before anything changes. Safe to share between threads.
    """

    __slots__ = ()

    def __init__(self, num_blocks, block_size=16, enable_prefix_caching=True):
        super().__init__(_as_int(num_blocks, "num_blocks"), _as_int(block_size, "block_size"),
                         bool(enable_prefix_caching))

    def __repr__(self):
        return (f"BlockAllocator(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"enable_prefix_caching={self.enable_prefix_caching}, free={self.num_free_blocks}, "
                f"cached={self.num_cached_blocks})")


def hash_block_tokens(token_ids, block_size, parent_hash=None, extra=None):
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
        ``1``, ``"1"`` and ``b"1"`` give different hashes.

    Returns
    -------
    hashes : np.ndarray
        ``[n // block_size] uint64``: block ``i``'s hash covers its tokens, block ``i-1``'s hash
        (or ``parent_hash``) and ``extra``. A partial last block gets no hash.
    """
    block_size = _as_int(block_size, "block_size")
    if parent_hash is None:
        parent_hash = ROOT_HASH
    else:
        parent_hash = _as_int(parent_hash, "parent_hash")
        if not 0 <= parent_hash < 2**64:
            raise InvalidArgumentError(f"hash_block_tokens(): parent_hash={parent_hash} must be in [0, 2**64); "
                                       "pass a hash returned by hash_block_tokens()")
    return _C.hash_block_tokens(token_ids, block_size, parent_hash, _extra_key(extra))


def _extra_key(extra):
    if extra is None:
        return 0
    if isinstance(extra, (bytes, bytearray, memoryview)):
        return _C.hash_extra(1, bytes(extra))
    if isinstance(extra, str):
        return _C.hash_extra(2, extra.encode("utf-8"))
    if isinstance(extra, (int, np.integer)):
        value = int(extra)
        return _C.hash_extra(3, value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True))
    raise InvalidArgumentError(f"hash_block_tokens(): extra={extra!r} of type {type(extra).__name__} is not "
                               "supported; pass bytes, str or int (e.g. a LoRA id or a cache salt), or None")
