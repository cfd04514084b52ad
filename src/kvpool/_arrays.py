"""Exact conversion of caller input for the allocator, its pure-Python twin and the block tables.

One home for the rules both allocators apply, so they accept and refuse exactly the same things
with the same error classes: integer lists (Python ints and numpy integers, mixed, up to 2**64 - 1)
are converted exactly, never through float64; floats, bools and masked arrays are refused; a value
that does not fit the target dtype is a clear error, never a wrap-around.
"""
from numbers import Integral
from operator import index

import numpy as np

from .errors import InvalidArgumentError

# Slot ids (block * block_size + offset) are int32 in slot_mapping and in every kernel.
MAX_SLOTS = 1 << 31
MAX_BLOCKS = (1 << 31) - 2  # -1 ends the allocator's free list, so INT32_MAX - 1 is the last id


def as_int(value, what: str) -> int:
    """``value`` as an int: Python and numpy integers; never a bool or a float."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{what}={value!r} must be an integer, got {type(value).__name__}")
    try:
        return index(value)
    except TypeError:
        raise InvalidArgumentError(f"{what}={value!r} must be an integer, got {type(value).__name__}") from None


def as_bool(value, what: str) -> bool:
    """``value`` as a bool: True/False (or numpy's); strings such as "no" are refused, not truthy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidArgumentError(f"{what}={value!r} must be True or False, got {type(value).__name__}")


def check_geometry(num_blocks, block_size, where: str = "BlockAllocator") -> tuple[int, int]:
    """Validated ``(num_blocks, block_size)`` of a pool whose slot ids must fit in int32."""
    num_blocks, block_size = as_int(num_blocks, "num_blocks"), as_int(block_size, "block_size")
    if not 1 <= num_blocks <= MAX_BLOCKS:
        raise InvalidArgumentError(f"{where}: num_blocks={num_blocks} must be in [1, {MAX_BLOCKS}]; size the pool "
                                   "with kvpool.plan_memory() or kvpool.size_kv_pool()")
    if not 1 <= block_size < 1 << 31:
        raise InvalidArgumentError(f"{where}: block_size={block_size} must be in [1, 2147483647] tokens per block "
                                   "(typical: 16)")
    if num_blocks * block_size > MAX_SLOTS:
        raise InvalidArgumentError(
            f"{where}: num_blocks * block_size = {num_blocks * block_size} tokens exceeds {MAX_SLOTS}, the most slot "
            "ids an int32 slot_mapping can address; use fewer blocks (one pool per TP shard rarely needs 2**31 "
            "tokens) or a smaller block_size")
    return num_blocks, block_size


def check_capacity(num_blocks: int, block_size: int, max_num_blocks, where: str = "BlockAllocator") -> int:
    """Validated capacity of an elastic pool: ``max_num_blocks`` (None: ``num_blocks``), at least ``num_blocks``."""
    if max_num_blocks is None:
        return num_blocks
    capacity = as_int(max_num_blocks, "max_num_blocks")
    if capacity < num_blocks:
        raise InvalidArgumentError(f"{where}: max_num_blocks={capacity} must be >= num_blocks={num_blocks} (the "
                                   "capacity grow() may reach; None: num_blocks)")
    return check_geometry(capacity, block_size, where)[0]


def as_hash_key(hash_key) -> int:
    """A 128-bit hash key as an int: None draws a random one; an int in [0, 2**128) or 16 bytes."""
    if hash_key is None:
        import secrets  # noqa: PLC0415 (only when a key is drawn)
        return secrets.randbits(128)
    if isinstance(hash_key, (bytes, bytearray)):
        if len(hash_key) != 16:
            raise InvalidArgumentError(f"hash_key of {len(hash_key)} bytes must have 16 (128 bits)")
        return int.from_bytes(hash_key, "little")
    key = as_int(hash_key, "hash_key")
    if not 0 <= key < 1 << 128:
        raise InvalidArgumentError(f"hash_key={key} must be in [0, 2**128); pass PoolSize.hash_key, 16 random bytes, "
                                   "or None for a random key")
    return key


def split_key(key: int) -> tuple[int, int]:
    """``(k0, k1)``: the low and high 64-bit words of a 128-bit key."""
    return key & ((1 << 64) - 1), key >> 64


def as_exact_array(values, dtype, fn: str, what: str, range_error=InvalidArgumentError) -> np.ndarray:
    """``values`` as a 1-D C-contiguous array of ``dtype``, converted exactly, once.

    Parameters
    ----------
    values : array_like
        A numpy integer array (any integer dtype, any strides) or a sequence of Python / numpy
        integers (mixed freely; a list of hashes above and below 2**63 stays exact).
    dtype : np.dtype
        ``int32`` (ids, tokens) or ``uint64`` (hashes).
    fn, what : str
        Named in error messages (``"free()"``, ``"ids"``).
    range_error : type
        Raised for a value outside ``dtype``'s range (BlockIndexError for ids).
    """
    dtype = np.dtype(dtype)
    if isinstance(values, np.ma.MaskedArray):
        raise InvalidArgumentError(f"{fn}: {what} is a masked array; its mask would be ignored: pass "
                                   f"values.compressed() or values.filled(x) instead")
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        array = values
    else:
        array = _exact_from_objects(values, fn, what)
    if array.ndim != 1:
        raise InvalidArgumentError(f"{fn}: {what} must be 1-D, got shape {array.shape}; flatten it first")
    if array.size == 0:
        return np.empty(0, dtype=dtype)
    info = np.iinfo(dtype)
    low, high = int(array.min()), int(array.max())
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise range_error(f"{fn}: {what} value {bad} does not fit in {dtype}; valid values are "
                          f"[{info.min}, {info.max}]")
    return np.ascontiguousarray(array, dtype=dtype)


def _exact_from_objects(values, fn: str, what: str) -> np.ndarray:
    """Integer array of any non-integer-array input; floats and bools refused element by element."""
    if isinstance(values, np.ndarray):
        if values.dtype != object:
            raise _not_integers(fn, what, values.dtype, values.flat[0] if values.size else None)
        items = values.ravel().tolist()
        shape = values.shape
    else:
        try:
            items = list(values)
        except TypeError:
            raise InvalidArgumentError(f"{fn}: {what}={values!r} must be a 1-D sequence of integers") from None
        shape = (len(items),)
    ints = []
    for item in items:
        if isinstance(item, (list, tuple, np.ndarray)):
            raise InvalidArgumentError(f"{fn}: {what} must be 1-D, got a nested {type(item).__name__}; flatten it first")
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (Integral, np.integer)):
            raise _not_integers(fn, what, type(item).__name__, item)
        ints.append(int(item))
    if not ints:
        return np.empty(shape, dtype=np.int64)
    # Python ints of any size: the range check happens on int(min) / int(max) of an object array.
    return np.array(ints, dtype=object).reshape(shape) if _outside_int64(ints) else np.array(ints, dtype=np.int64)


def _outside_int64(ints: list) -> bool:
    return min(ints) < -(1 << 63) or max(ints) >= 1 << 63


def encode_extra(extra) -> tuple[int, bytes]:
    """A salt as ``(tag, payload)``: bytes-like 1, str 2 (UTF-8), int 3 (minimal signed little-endian)."""
    if isinstance(extra, (bytes, bytearray, memoryview)):
        return 1, bytes(extra)
    if isinstance(extra, str):
        return 2, extra.encode("utf-8")
    if isinstance(extra, (int, np.integer)) and not isinstance(extra, (bool, np.bool_)):
        value = int(extra)
        return 3, value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    raise InvalidArgumentError(
        f"hash_block_tokens(): extra={extra!r} of type {type(extra).__name__} is not supported; "
        "pass bytes, str or int (e.g. a LoRA id or a cache salt), or None")


def _not_integers(fn, what, kind, first) -> InvalidArgumentError:
    return InvalidArgumentError(f"{fn}: {what} must be integers, got {kind} (value {first!r}); "
                                "pass a list of ints or an integer numpy array")


def as_prompt(seq_id, prompt_tokens) -> tuple:
    """``(tokens, n)``: ``[n] int32`` prompt tokens (None for a prompt given as a token count) and its length."""
    raw = np.asarray(prompt_tokens)
    if raw.size == 0:
        raise InvalidArgumentError(f"prompt of seq_id {seq_id!r} has 0 tokens; it needs at least 1")
    if raw.dtype.kind not in "iu":
        raise InvalidArgumentError(f"prompt_tokens of seq_id {seq_id!r} must be integer token ids or a token "
                                   f"count, got dtype {raw.dtype}")
    if raw.ndim == 0:
        tokens, n = None, int(raw)
    else:
        if raw.min() < 0 or raw.max() > np.iinfo(np.int32).max:
            raise InvalidArgumentError(f"prompt_tokens of seq_id {seq_id!r} hold ids outside [0, 2**31): "
                                       f"{raw.min()}..{raw.max()}")
        tokens = np.ascontiguousarray(raw, dtype=np.int32).reshape(-1)
        n = len(tokens)
    if n < 1:
        raise InvalidArgumentError(f"prompt of seq_id {seq_id!r} has {n} tokens; it needs at least 1")
    return tokens, n


def as_token_ids(token_ids):
    """Token ids for the C++ core: None, or a 1-D int32 array (``[b, n]`` flattened; the core refuses negatives)."""
    if token_ids is None or (type(token_ids) is np.ndarray and token_ids.dtype == np.int32 and token_ids.ndim == 1):
        return token_ids
    if isinstance(token_ids, np.ndarray) and token_ids.ndim > 1:  # [b, n_tokens]
        token_ids = token_ids.reshape(-1)
    elif isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple, np.ndarray)):
        token_ids = [t for row in token_ids for t in row]
    return as_exact_array(token_ids, np.int32, "token_ids", "token_ids")
