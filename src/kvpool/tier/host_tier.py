"""`HostKVTier`: the host-memory tier of the prefix cache, given to ``BlockTables(..., host_tier=tier)``.

The protocol (docs/host_tier.md, with a diagram of one block's life):

1. **Offload (write-through).** Every full block a sequence offers to the GPU prefix cache (``mark_computed``,
   the hashing of ``decode_step``) is queued for a copy to a fresh host block (the host LRU evicts), unless
   the host holds, or is receiving, that verified content already. Until the copy completes the GPU block is
   held (never handed out) and the host block is not readable (a hit stops before it).
2. **Reload on a hit.** ``add()`` matches on the GPU first, then goes on over the host's own verified chain
   (same tokens after the very same prefix, same salt, whatever the hashes say). Host hits get fresh GPU
   blocks and a queued host-to-GPU copy, and count as computed tokens in ``add()``'s result. The host block
   and the GPU block stay held until the copy completes. A sequence waiting for its reloads cannot be put in
   a batch until ``run`` enqueued them (popping alone is not enough: a copier error leaves them unlaunched, and
   the sequence is refused by ``batch()`` rather than read before its KV is there; the next ``run`` retries).
3. **The server's one call per step**, before the forward::

       tier.run(tables.pop_transfers())

   ``run`` first completes the copies of earlier steps that are done (offloaded host blocks become readable,
   GPU holds are released), then enqueues the step's reloads on the current (compute) stream, so the forward
   enqueued after it reads them, and its offloads on a side stream ordered after everything enqueued so far
   (the steps that wrote the blocks). Nothing ever waits on the host for a copy.

The bookkeeping is the C++ core's (``csrc/host_tier.{h,cpp}``, one pointer test per call when no tier is
attached); this class owns the host pages, the copier and the host `BlockAllocator`, and drives the copies.
One KV-cache group of full attention only: `BlockTables` refuses a host tier for hybrid models.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _C
from .._arrays import as_int
from ..allocator import BlockAllocator
from ..errors import BlockIndexError, InvalidArgumentError


@dataclass(frozen=True)
class Transfers:
    """One step's queued copies between the tiers (`BlockTables.pop_transfers`).

    Attributes
    ----------
    batch : int
        The batch's id in the tier (0: nothing was queued).
    reload_host, reload_gpu : np.ndarray
        ``[r] int32``: host block ``reload_host[i]`` is copied into GPU block ``reload_gpu[i]``.
    offload_gpu, offload_host : np.ndarray
        ``[o] int32``: GPU block ``offload_gpu[i]`` is copied to host block ``offload_host[i]``.
    """

    batch: int
    reload_host: np.ndarray
    reload_gpu: np.ndarray
    offload_gpu: np.ndarray
    offload_host: np.ndarray

    def __len__(self) -> int:
        return len(self.reload_host) + len(self.offload_gpu)


_EMPTY_IDS = np.zeros(0, dtype=np.int32)
_EMPTY_IDS.flags.writeable = False
NO_TRANSFERS = Transfers(0, _EMPTY_IDS, _EMPTY_IDS, _EMPTY_IDS, _EMPTY_IDS)  # a step with nothing queued


class HostKVTier:
    """Pinned host pages of a cache's geometry, the copier between the tiers, and the host block ids.

    Parameters
    ----------
    cache : PagedKVCache
        This TP rank's GPU pages (CPU tensors stand in for them in tests).
    num_host_blocks : int
        Blocks in the host pool (``kvpool plan --host-kv-gib N`` sizes it); the same on every TP rank.
    staging_blocks : int, optional
        Blocks per copy round (`BlockCopier`'s staging buffers).
    copier : object, optional
        Anything with ``offload(gpu_ids, host_ids)`` and ``reload(host_ids, gpu_ids)`` returning tickets with
        ``done()`` and ``wait()``; default ``BlockCopier(cache, HostPages(cache, num_host_blocks))``. Tests pass
        one whose tickets complete on demand.

    Notes
    -----
    The host `BlockAllocator` (``self.allocator``, prefix caching on) is built when a `BlockTables` takes the
    tier, under that table's allocator's hash key; one tier serves one `BlockTables` (one TP group).
    Not thread-safe: it belongs to the scheduler thread, like its `BlockTables`.
    """

    def __init__(self, cache, num_host_blocks: int, *, staging_blocks: int = 64, copier=None):
        n = as_int(num_host_blocks, "num_host_blocks")
        if n < 1:
            raise InvalidArgumentError(f"HostKVTier: num_host_blocks={num_host_blocks} must be >= 1; size it with "
                                       "`kvpool plan --host-kv-gib N` (host_tier.blocks)")
        self.cache = cache
        self.block_size = int(cache.block_size)
        self.num_host_blocks = n
        self.pages = None
        if copier is None:
            from .copier import BlockCopier  # noqa: PLC0415 (torch-heavy; only when the default is wanted)
            from .host_pages import HostPages  # noqa: PLC0415
            self.pages = HostPages(cache, n)
            copier = BlockCopier(cache, self.pages, staging_blocks=staging_blocks)
        self.copier = copier
        self.allocator: BlockAllocator | None = None
        self._core = None
        self._in_flight: list = []  # (batch, reloads?, ticket), oldest first
        self._last_batch = 0  # the last batch run: batches run once each, in the order popped

    def _bind(self, gpu_allocator):
        """The C++ bookkeeping for `gpu_allocator`'s table (called by `BlockTables`); once per tier."""
        if self._core is not None:
            raise InvalidArgumentError("this HostKVTier serves a BlockTables already; build one tier per "
                                       "BlockTables (one per TP group)")
        if gpu_allocator.block_size != self.block_size:
            raise InvalidArgumentError(f"HostKVTier: the cache's block_size={self.block_size} differs from the "
                                       f"allocator's {gpu_allocator.block_size}; build both for the same cache")
        allocator = BlockAllocator(self.num_host_blocks, self.block_size, True, hash_key=gpu_allocator.hash_key)
        core = _C.HostTier(gpu_allocator, allocator)
        self.allocator, self._core = allocator, core
        return core

    # ----------------------------------------------------------------- the server's call
    def run(self, transfers: Transfers) -> None:
        """Complete finished copies, then enqueue `transfers`: reloads on the current stream, offloads on the
        side stream. Call it with ``tables.pop_transfers()`` before every forward."""
        if not isinstance(transfers, Transfers):
            raise InvalidArgumentError(f"run() takes BlockTables.pop_transfers()'s Transfers, got "
                                       f"{type(transfers).__name__}")
        if transfers.batch == 0:
            if self._in_flight:
                self.poll()
            return
        if transfers.batch <= self._last_batch:
            raise InvalidArgumentError(
                f"run(): transfer batch {transfers.batch} was run already (or a later one was: {self._last_batch}); "
                "run each pop_transfers() result once, in the order it was popped")
        if self._core.transfers_of(transfers.batch) is None:  # made up: its copies would move arbitrary blocks
            raise InvalidArgumentError(f"run(): transfer batch {transfers.batch} was never returned by "
                                       "pop_transfers(); pass the Transfers that tables.pop_transfers() returned")
        self.poll()
        # Batches popped but never run (dropped, or their copier raised) first: their blocks are held until
        # their copies complete. A batch counts as run once all of it is enqueued, so a raise retries it.
        for batch in range(self._last_batch + 1, transfers.batch + 1):
            self._enqueue(batch)
            self._last_batch = batch
        self.poll()  # copies that finished at once (CPU tensors) release their blocks now, not a step later

    def _enqueue(self, batch: int) -> None:
        """The copies of `batch` not enqueued yet (the core's pairs: a kind done or in flight is never copied
        twice): reloads on the current stream (then its sequences may be batched), offloads on the side one."""
        pairs = self._core.transfers_of(batch)
        if pairs is None:
            return
        reload_host, reload_gpu, offload_gpu, offload_host = pairs
        enqueued = {(b, reloads) for b, reloads, _ in self._in_flight}
        if len(reload_host) and (batch, True) not in enqueued:
            self._in_flight.append((batch, True, self.copier.reload(reload_host, reload_gpu)))
            self._core.launched(batch)  # now (not at pop) the waiting sequences may be batched
        if len(offload_gpu) and (batch, False) not in enqueued:
            self._in_flight.append((batch, False, self.copier.offload(offload_gpu, offload_host)))

    def poll(self) -> int:
        """Complete every enqueued copy that is done (never waits); returns how many batches it completed."""
        still, completed = [], 0
        for batch, reloads, ticket in self._in_flight:
            if ticket.done():  # asked once per ticket: an answer that changes meanwhile waits for the next poll
                self._core.complete(batch, reloads)
                completed += 1
            else:
                still.append((batch, reloads, ticket))
        self._in_flight = still
        return completed

    def synchronize(self) -> None:
        """Wait for every enqueued copy and complete it (shutdown, tests)."""
        for _, _, ticket in self._in_flight:
            ticket.wait()
        self.poll()

    # ----------------------------------------------------------------- introspection
    def readable(self, host_block: int) -> bool:
        """True when host block `host_block` holds no copy in flight (an offload's destination is not)."""
        self._check_bound("readable()")
        b = as_int(host_block, "readable(): host_block")
        if not 0 <= b < self.num_host_blocks:  # checked here: the core takes an int32
            raise BlockIndexError(f"readable(): host block {b} is out of range [0, {self.num_host_blocks})")
        return self._core.readable(b)

    def stats(self) -> dict:
        """Counters of the tier: host queries and hit blocks, offloaded / skipped / dropped blocks, completed
        and in-flight copies, plus the host allocator's ``free_blocks`` / ``cached_blocks`` / ``evictions``."""
        self._check_bound("HostKVTier.stats()")
        out = self._core.stats()
        host = self.allocator.stats()
        out.update(host_free_blocks=host["free_blocks"], host_cached_blocks=host["cached_blocks"],
                   host_evictions=host["evictions"])
        return out

    def _check_bound(self, fn: str) -> None:
        if self._core is None:
            raise InvalidArgumentError(f"{fn}: the tier serves no BlockTables yet; pass it as "
                                       "BlockTables(..., host_tier=tier)")

    def __repr__(self) -> str:
        bound = "unbound" if self._core is None else f"free={self.allocator.num_free_blocks}"
        return (f"HostKVTier(num_host_blocks={self.num_host_blocks}, block_size={self.block_size}, {bound}, "
                f"copies_in_flight={len(self._in_flight)})")
