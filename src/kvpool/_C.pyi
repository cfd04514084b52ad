"""Type stub of the compiled private module ``kvpool._C`` (built from ``csrc/`` by setup.py).

Use it through :mod:`kvpool.allocator`. Id arguments accept any 1-D integer array_like (a
C-contiguous ``int32`` array is read in place; anything else is converted once by
``kvpool.allocator._as_array``); hash arguments likewise with ``uint64``.
"""
from typing import Sequence, Union

import numpy as np
import numpy.typing as npt

_Ids = Union[npt.NDArray[np.integer], Sequence[int]]
_Hashes = Union[npt.NDArray[np.unsignedinteger], npt.NDArray[np.integer], Sequence[int]]

ROOT_HASH: int
"""Parent hash of a sequence's first block when the caller gives none."""
CHAIN_ROOT: int
"""``parent`` of a sequence's first block in ``cache_blocks_verified`` (0)."""

def hash_extra(tag: int, data: bytes, k0: int = 0, k1: int = 0) -> int:
    """64-bit digest of ``extra`` bytes under a type tag (1 bytes, 2 str as UTF-8, 3 int) and a key."""

def hash_block_tokens(token_ids: _Ids, block_size: int, parent_hash: int, extra_key: int, k0: int = 0,
                      k1: int = 0) -> npt.NDArray[np.uint64]:
    """``[n // block_size] uint64`` chained hashes of the full blocks of ``[n] int32`` tokens under key (k0, k1)."""

class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, k0: int, k1: int) -> None: ...
    @property
    def hash_key(self) -> int:
        """The 128-bit prefix-cache hash key."""
    @property
    def num_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def enable_prefix_caching(self) -> bool: ...
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now: refcount 0, evictable cached blocks included."""
    @property
    def num_cached_blocks(self) -> int:
        """Blocks that have a prefix-cache hash, held or free."""
    def allocate(self, n: int) -> npt.NDArray[np.int32]:
        """``[n] int32`` new block ids (refcount 1); OutOfBlocksError and no change if fewer are free."""
    def free(self, ids: _Ids) -> None:
        """Drop one reference per id; blocks reaching 0 join the free list in reverse order of ids."""
    def incref(self, ids: _Ids) -> None:
        """Add one reference per held id."""
    def refcounts(self, ids: _Ids) -> npt.NDArray[np.int32]:
        """``[k] int32`` reference counts of ``[k]`` ids."""
    def cache_blocks(self, ids: _Ids, hashes: _Hashes) -> None:
        """Map ``[k] uint64`` hashes to ``[k]`` held blocks (first writer wins per hash)."""
    def match_prefix(self, hashes: _Hashes) -> npt.NDArray[np.int32]:
        """``[h] int32`` blocks of the longest cached prefix of ``[k] uint64`` hashes, one reference taken on each
        (hash-only: no verification)."""
    def allocate_with_prefix(self, n: int, hashes: _Hashes, token_ids: _Ids,
                             context: int = 0) -> tuple[npt.NDArray[np.int32], int, int]:
        """``([n] int32 ids, h verified hits first, chain)``; all or nothing."""
    def cache_blocks_verified(self, ids: _Ids, hashes: _Hashes, token_ids: _Ids, context: int = 0,
                              parent: int = 0) -> int:
        """Cache consecutive blocks of one sequence with their tokens; returns the chain value after them."""
    def stats(self) -> dict[str, int]:
        """Counters: allocations, frees, increfs, prefix_queries, prefix_query_blocks, prefix_hit_blocks,
        cached_blocks_added, evictions, hash_collisions, high_water_mark, num_blocks, free_blocks, used_blocks,
        cached_blocks, prefix_entry_bytes."""
    def check_invariants(self) -> None:
        """O(num_blocks) self-check; raises AssertionError naming a broken invariant."""

class SeqTable:
    """Per-sequence KV bookkeeping in C++ (csrc/seq_table.h); use it through kvpool.block_table.BlockTables.

    Sequence ids are int64; the batch calls take ``[b] int64`` id arrays and a ``check`` flag (refuse ids
    outside ``[-2**62, 2**62)``). The GIL stays held in every call.
    """

    def __init__(self, allocator: BlockAllocator, max_seqs: int, max_blocks_per_seq: int, prefix_caching: bool,
                 hash_mask: int = ...) -> None: ...
    @property
    def max_seqs(self) -> int: ...
    @property
    def max_blocks_per_seq(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, seq_id: int) -> bool: ...
    def num_tokens(self, seq_id: int) -> int: ...
    def num_computed(self, seq_id: int) -> int: ...
    def blocks(self, seq_id: int) -> npt.NDArray[np.int32]: ...
    def add(self, seq_id: int, tokens: _Ids | None, n: int, context: int) -> int: ...
    def append_batch(self, seq_ids: _Ids, n: int, token_ids: _Ids | None, check: bool) -> npt.NDArray[np.int32]: ...
    def mark_computed(self, seq_ids: _Ids, lens: _Ids | None, check: bool) -> None: ...
    def mark_step_computed(self) -> None: ...
    def fork(self, parent: int, child: int) -> None: ...
    def free(self, seq_id: int) -> None: ...
    def pending_copies(self) -> list[tuple[int, int]]: ...
    def pop_copies(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
    def batch(self, seq_ids: _Ids, num_new_tokens: _Ids | None, pad_slots_to: int, decode: bool,
              check: bool) -> tuple[npt.NDArray[np.int32], int, int, tuple[int, ...]]:
        """``(buffer, max_blocks, new_tokens, offsets)``: table | lens | indptr | indices | last | qsl | slots."""
    def decode_step(self, seq_ids: _Ids, token_ids: _Ids | None, pad_to: int, check: bool) -> int:
        """Appends one token to each sequence and fills the step buffers; returns the longest sequence."""
    def step_table(self) -> npt.NDArray[np.int32]:
        """``[max_seqs, max_blocks_per_seq]`` view of the persistent decode-step table."""
    def step_io(self) -> npt.NDArray[np.int32]:
        """``[3 * max_seqs + 1]`` view: seq_lens [rows] | slot_mapping [rows] | query_start_loc [rows + 1]."""
    def step_deltas(self) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """(flat index, block id) of the table entries the last decode_step changed."""
