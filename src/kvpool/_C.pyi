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

def group_hash(hash: int, group: int, k0: int = 0, k1: int = 0) -> int:
    """KV-cache group ``group``'s prefix-cache hash of a block whose group-0 hash is ``hash`` (group 0: itself)."""

def group_context(context: int, group: int, k0: int = 0, k1: int = 0) -> int:
    """KV-cache group ``group``'s salt digest of a sequence whose salt digest is ``context`` (group 0: itself)."""

class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, k0: int, k1: int,
                 max_num_blocks: int = -1) -> None: ...
    @property
    def max_num_blocks(self) -> int:
        """The capacity grow() may reach (-1 at construction: num_blocks)."""
    @property
    def free_top_blocks(self) -> int:
        """Free ids in a run at the top of the pool: the most shrink() can release now."""
    def grow(self, n: int) -> None:
        """Add ids ``[num_blocks, num_blocks + n)``, free, at the free list's tail."""
    def shrink(self, n: int) -> None:
        """Remove the top ``n`` ids (all free; cached ones evicted); OutOfBlocksError if one is held."""
    def held_in_top(self, n: int) -> int:
        """How many of the top ``n`` ids are held."""
    def relocate_top(self, n: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Move the held blocks among the top ``n`` ids to free lower ids: ``(src [m], dst [m])`` int64."""
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
    def probe_chain(self, hashes: _Hashes, token_ids: _Ids,
                    context: int = 0) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint64], bool]:
        """Verified chain walk taking nothing: ``(ids [h], stamps [h], collided)``."""
    def probe_anchored(self, hashes: _Hashes, token_ids: _Ids, context: int,
                       parents: _Hashes) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint64], bool]:
        """Blocks verified each against ``parents[j]``, from the end: ``(ids [r], stamps [r], collided)``."""
    def take_cached(self, ids: _Ids, stamps: _Hashes, n: int, query_blocks: int = 0,
                    collisions: int = 0) -> npt.NDArray[np.int32] | None:
        """One reference on each probed block and ``n`` fresh blocks (returned), all or nothing; None when a block
        was evicted since its probe."""
    def cache_blocks_chained(self, ids: _Ids, hashes: _Hashes, token_ids: _Ids, context: int = 0,
                             parent: int = 0) -> npt.NDArray[np.uint64]:
        """cache_blocks_verified() returning the chain value after each block (``[k] uint64``)."""
    def cache_blocks_anchored(self, ids: _Ids, hashes: _Hashes, token_ids: _Ids, context: int,
                              parents: _Hashes) -> None:
        """Cache each block on its own after ``parents[j]`` (``2**64 - 1``: skipped)."""
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

    MAX_GROUPS: int
    def __init__(self, allocator: BlockAllocator, max_seqs: int, max_blocks_per_seq: int, prefix_caching: bool,
                 hash_mask: int = ..., group_windows: _Ids = ...) -> None:
        """``group_windows``: one entry per KV-cache group, 0 for full attention, else the window in tokens."""
    @property
    def max_seqs(self) -> int: ...
    @property
    def max_blocks_per_seq(self) -> int: ...
    @property
    def num_groups(self) -> int: ...
    @property
    def group_windows(self) -> npt.NDArray[np.int64]: ...
    def __len__(self) -> int: ...
    def __contains__(self, seq_id: int) -> bool: ...
    def num_tokens(self, seq_id: int) -> int: ...
    def num_computed(self, seq_id: int) -> int: ...
    def blocks(self, seq_id: int, group: int = 0) -> npt.NDArray[np.int32]:
        """Group ``group``'s block at each position (-1: released by its window)."""
    def add(self, seq_id: int, tokens: _Ids | None, n: int, context: int) -> int: ...
    def append_batch(self, seq_ids: _Ids, n: int, token_ids: _Ids | None, check: bool) -> npt.NDArray[np.int32]:
        """``[G * b * n]`` slots, group-major."""
    def mark_computed(self, seq_ids: _Ids, lens: _Ids | None, check: bool) -> None: ...
    def mark_step_computed(self) -> None: ...
    def fork(self, parent: int, child: int) -> None: ...
    def free(self, seq_id: int) -> None: ...
    def pending_copies(self) -> list[tuple[int, int]]: ...
    def pop_copies(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
    def relocate_top(self, n: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The allocator's relocate_top(n), then every table naming a moved block renamed."""
    def batch(self, seq_ids: _Ids, num_new_tokens: _Ids | None, pad_slots_to: int, decode: bool,
              check: bool) -> tuple[npt.NDArray[np.int32], int, int, tuple[int, ...]]:
        """``(buffer, max_blocks, new_tokens, offsets)``: table [G, b, w] | lens [b] | indptr [G, b + 1] | indices
        [G, nnz] | last [G, b] | qsl [b + 1] | slots [G, padded]."""
    def decode_step(self, seq_ids: _Ids, token_ids: _Ids | None, pad_to: int, check: bool) -> int:
        """Appends one token to each sequence and fills the step buffers; returns the longest sequence."""
    def step_table(self) -> npt.NDArray[np.int32]:
        """``[G, max_seqs, max_blocks_per_seq]`` view of the persistent decode-step table."""
    def step_io(self) -> npt.NDArray[np.int32]:
        """``[(G + 2) * max_seqs + 1]`` view: seq_lens [rows] | slot_mapping [G, rows] | query_start_loc [rows + 1]."""
    def step_deltas(self) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """(flat index into the ``[G, max_seqs, W]`` table, block id) of the entries the last decode_step changed."""
    def attach_host_tier(self, tier: HostTier) -> None:
        """Extends the prefix cache to ``tier`` (one full-attention group, prefix caching on, before any add)."""
    def pop_transfers(self) -> tuple[int, npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32],
                                     npt.NDArray[np.int32]]:
        """``(batch, reload_host, reload_gpu, offload_gpu, offload_host)``; batch 0 when nothing was queued."""

class HostTier:
    """The host tier's bookkeeping (csrc/host_tier.h); use it through kvpool.tier.HostKVTier and BlockTables."""

    def __init__(self, gpu_allocator: BlockAllocator, host_allocator: BlockAllocator) -> None: ...
    @property
    def pending_reloads(self) -> int: ...
    @property
    def pending_offloads(self) -> int: ...
    def launched(self, batch: int) -> None:
        """The reloads of popped batch ``batch`` are enqueued: its sequences may be batched."""
    def complete(self, batch: int, reloads: bool) -> None:
        """The copies of one kind of ``batch`` are done: release their holds (offloaded host blocks readable)."""
    def transfers_of(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(reload_host, reload_gpu, offload_gpu, offload_host) ``[n] int32`` of batch ``batch``'s copies not
        completed yet; None when no such batch is in flight (run() enqueues a batch popped but never run)."""
    def readable(self, host_block: int) -> bool: ...
    def stats(self) -> dict[str, int]:
        """host_queries, host_hit_blocks, offloaded/skipped/dropped_blocks, completed_reloads/offloads,
        pending_reloads/offloads, in_flight_reloads/offloads."""

class VirtualRange:
    """A reserved virtual address range whose physical memory is mapped in ``granularity`` chunks.

    ``backend="cuda"``: CUDA VMM on ``device`` (libcuda loaded at first use; ElasticUnavailableError
    without it). ``backend="host"``: mmap with the same semantics and a 2 MiB granularity (CPU tests).
    ``ptr`` never changes; every call releases the GIL.
    """
    def __init__(self, nbytes: int, backend: str = "host", device: int = 0, chunk_bytes: int = 0) -> None: ...
    @property
    def ptr(self) -> int:
        """Base address, granularity-aligned, fixed for the range's life."""
    @property
    def reserved_bytes(self) -> int:
        """``round_up(nbytes, granularity)``."""
    @property
    def granularity(self) -> int:
        """Bytes of one chunk (``chunk_bytes``, or the device's granularity): map/unmap's unit."""
    @property
    def device_granularity(self) -> int:
        """The backend's allocation granularity (2 MiB on the host backend)."""
    @property
    def backend(self) -> str: ...
    @property
    def mapped_bytes(self) -> int:
        """Bytes mapped now (0 while asleep)."""
    @property
    def prepared_bytes(self) -> int:
        """Physical memory created ahead by prepare() and not mapped yet."""
    @property
    def asleep(self) -> bool:
        """True between release_all() and remap_all()."""
    def is_mapped(self, offset: int) -> bool:
        """Whether the chunk holding byte ``offset`` is mapped."""
    def map(self, offset: int, nbytes: int) -> None:
        """Map zero-filled memory at ``[offset, offset + nbytes)`` (aligned, all unmapped); all or nothing."""
    def unmap(self, offset: int, nbytes: int) -> None:
        """Unmap ``[offset, offset + nbytes)`` (aligned, all mapped) and free it; contents dropped."""
    def prepare(self, nbytes: int) -> None:
        """Create physical chunks for the next ``nbytes`` of map() ahead of time."""
    def drop_prepared(self) -> None: ...
    def release_all(self) -> None:
        """Sleep: unmap everything (prepared chunks too), keep the reservation."""
    def remap_all(self) -> None:
        """Wake: map again the chunks mapped at release_all(), at the same addresses."""
