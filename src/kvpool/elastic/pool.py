"""`ElasticKVPool`: an elastic cache, its allocator and its block tables, resized together.

Every change is decided collectively over the TP group (``kvpool.runtime.group.gather_step``: each step
exchanges every rank's status, so a failure raises the same error on every rank and none hangs) with the
MIN rule of ``size_kv_pool``: a grow goes as far as the tightest rank's budget allows, a shrink only as far
as every rank can. The ranks hold identical allocators (the same ids), so they move the same blocks.

One call's order (each numbered step is one exchange):

- grow: (1) check the argument, reserve the bytes in the budget, share how far this rank can go; (2) map
  the chunks of the agreed size; then the allocator hands out the new ids.
- shrink: (1) share how far this rank can go (held blocks each need a free lower id); (2) move the held
  blocks above the target to free lower ids (``copy_blocks`` + the tables), take the top ids from the
  allocator (evicting cached ones), unmap the chunks no block needs, release their bytes.
- sleep: (1) refuse unless no block is held; (2) drop every cached block, unmap everything, release the
  bytes. wake: (1) reserve the bytes; (2) map again at the same addresses.
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError, KVPoolError, OutOfBlocksError, RankMismatchError
from ..runtime import group as _group
from .budget import MemoryBudget
from .cache import ElasticKVCache, _check_count


class ElasticKVPool:
    """The pages, allocator and (optionally) block tables of one TP rank, grown and shrunk in place.

    Parameters
    ----------
    cache : ElasticKVCache
    allocator : kvpool.BlockAllocator
        Built with ``max_num_blocks=cache.max_num_blocks`` and ``cache.num_blocks`` blocks.
    tables : kvpool.BlockTables, optional
        The live sequences' tables over `allocator`: with them a shrink moves held blocks down; without,
        it stops at the highest held block.
    group : ProcessGroup, optional
        The TP group deciding together (default: the default group when torch.distributed is initialized and
        ``cache.tp_size > 1``, else this process alone).
    budget : MemoryBudget, optional
        Bytes this pool draws from (shared with other pools or processes); None: no limit but the device.

    Notes
    -----
    Call every method on every rank of the group, in the same order. On error nothing has changed (the
    message names the rank and the reason). Not thread-safe (one scheduler thread owns it).
    """

    def __init__(self, cache: ElasticKVCache, allocator, tables=None, *, group=None,
                 budget: MemoryBudget | None = None):
        if not isinstance(cache, ElasticKVCache):
            raise InvalidArgumentError(f"cache must be an ElasticKVCache, got {type(cache).__name__}")
        if allocator.max_num_blocks != cache.max_num_blocks or allocator.num_blocks != cache.num_blocks:
            raise InvalidArgumentError(
                f"the allocator ({allocator.num_blocks} of max {allocator.max_num_blocks} blocks) must match the cache "
                f"({cache.num_blocks} of max {cache.max_num_blocks}); build it with "
                "BlockAllocator(cache.num_blocks, cache.block_size, max_num_blocks=cache.max_num_blocks)")
        if tables is not None and tables.allocator is not allocator:
            raise InvalidArgumentError("tables must draw from this pool's allocator (BlockTables(allocator, ...))")
        if tables is not None and getattr(tables, "host_tier", None) is not None:
            # a copy in flight pins its block, and its timing differs between ranks: one rank could refuse a
            # relocation the others made
            raise InvalidArgumentError("ElasticKVPool with a host tier (BlockTables(host_tier=)) is not supported "
                                       "yet: build the tables without host_tier (docs/elastic.md)")
        if budget is not None and not isinstance(budget, MemoryBudget):
            raise InvalidArgumentError(f"budget must be a MemoryBudget, got {type(budget).__name__}")
        alone = group is None and cache.tp_size == 1  # a single-GPU pool decides alone even under torch.distributed
        self.group = _group.Group(None, 0, 1, cache.device, "none") if alone else _group.resolve_group(group)
        if budget is not None and cache.mapped_bytes and not budget.try_reserve(cache.mapped_bytes):
            raise OutOfBlocksError(f"the cache maps {cache.mapped_bytes} bytes but the budget has {budget.free_bytes} "
                                   "free; start smaller or shrink another pool first")
        self.cache, self.allocator, self.tables, self.budget = cache, allocator, tables, budget
        self._charged = cache.mapped_bytes if budget is not None else 0  # bytes this pool holds of the budget
        self._awake_blocks = None  # num_blocks before sleep(); None while awake
        self._closed = False  # close() gave the bytes back: no resize may map or unmap outside the budget
        self.moved_blocks = 0  # held blocks shrink() moved to lower ids, over the pool's life

    @classmethod
    def for_shard(cls, spec, max_num_blocks: int, block_size: int, tp_rank: int = 0, tp_size: int = 1,
                  device="cpu", *, num_blocks: int = 0, enable_prefix_caching: bool = True, hash_key=None,
                  max_seqs: int | None = None, max_blocks_per_seq: int | None = None, group=None,
                  budget: MemoryBudget | None = None, **cache_kwargs) -> "ElasticKVPool":
        """Reserve an `ElasticKVCache` for ``max_num_blocks``, map ``num_blocks``, and build its allocator (and
        `kvpool.BlockTables` when ``max_seqs`` is given, ``max_blocks_per_seq`` wide: default ``max_num_blocks``).
        ``cache_kwargs``: ``dtype``, ``kv_dtype``, ``layout``, ``fp8_scales`` as `kvpool.PagedKVCache.for_shard`;
        ``hash_key`` the group's (``PoolSize.hash_key``)."""
        from ..allocator import BlockAllocator  # noqa: PLC0415
        from ..block_table import BlockTables  # noqa: PLC0415

        cache = ElasticKVCache.for_shard(spec, max_num_blocks, block_size, tp_rank, tp_size, device,
                                         num_blocks=num_blocks, **cache_kwargs)
        # the allocator and the tables are built with at least one block, then taken to the cache's size
        allocator = BlockAllocator(max(1, cache.num_blocks), block_size, enable_prefix_caching, hash_key,
                                   max_num_blocks=max_num_blocks)
        width = max_num_blocks if max_blocks_per_seq is None else max_blocks_per_seq
        tables = None if max_seqs is None else BlockTables.for_cache(allocator, cache, max_seqs=max_seqs,
                                                                     max_blocks_per_seq=width)
        allocator.shrink(allocator.num_blocks - cache.num_blocks)
        return cls(cache, allocator, tables, group=group, budget=budget)

    # ----------------------------------------------------------------- figures
    @property
    def num_blocks(self) -> int:
        """Blocks the allocator may hand out now: ids ``[0, num_blocks)`` (0 asleep)."""
        return int(self.allocator.num_blocks)

    @property
    def max_num_blocks(self) -> int:
        return self.cache.max_num_blocks

    @property
    def mapped_bytes(self) -> int:
        """Physical bytes mapped under the pages now (0 asleep)."""
        return self.cache.mapped_bytes

    @property
    def asleep(self) -> bool:
        return self._awake_blocks is not None

    def held_blocks(self) -> int:
        """Blocks with a reference (sequences, pending copies): they cannot be dropped, only moved."""
        return int(self.allocator.num_blocks - self.allocator.num_free_blocks)

    # ----------------------------------------------------------------- grow
    def grow(self, num_blocks: int, *, partial: bool = False) -> int:
        """Add ``num_blocks`` blocks at the top: ids ``[old, old + num_blocks)`` become free blocks.

        Parameters
        ----------
        num_blocks : int
            Blocks to add, in ``[0, max_num_blocks - self.num_blocks]``; the same on every rank.
        partial : bool
            When some rank's budget cannot hold all of it, grow as far as every rank can (MIN over the
            group) instead of refusing.

        Returns
        -------
        int
            Blocks added (``num_blocks`` unless ``partial``).

        Raises
        ------
        InvalidArgumentError
            ``num_blocks`` out of range, or the pool is asleep.
        RankMismatchError
            The ranks asked for different sizes.
        OutOfBlocksError
            A budget cannot hold the growth (and not ``partial``): nothing changed.
        VirtualMemoryError
            Mapping failed on some rank (out of device memory): nothing changed on any rank.
        """
        old, regions = self.num_blocks, self.cache.regions
        taken, mapped = [], []

        def reserve():
            if not isinstance(partial, (bool, np.bool_)):  # checked on every rank, inside the exchange
                raise InvalidArgumentError(f"grow(): partial={partial!r} must be True or False")
            target, reachable, nbytes = self._reserve_growth(num_blocks)
            taken.append(nbytes)
            return target, reachable

        def map_agreed():
            self.cache.resize(agreed)
            mapped.append(True)

        try:
            _, shares = _group.gather_step(self.group, "ElasticKVPool.grow: check and reserve", InvalidArgumentError,
                                           reserve, share=lambda r: r)
            agreed = _agreed_growth(shares, old, partial)
            _group.gather_step(self.group, "ElasticKVPool.grow: map", KVPoolError, map_agreed)
        except BaseException:
            if mapped:  # mapped here, failed on another rank
                self.cache.resize(old)
            self._release(taken[0] if taken else 0)
            raise
        charge = regions.mapped_bytes(agreed) - regions.mapped_bytes(old) if self.budget is not None else 0
        self._release(taken[0] - charge)  # what a tighter rank's MIN left unused here
        self._charged += charge
        self.allocator.grow(agreed - old)
        return agreed - old

    def _reserve_growth(self, num_blocks) -> tuple[int, int, int]:
        """``(target, reachable, bytes reserved)`` of this rank: sizes after the grow, ``reachable`` what its
        budget allows."""
        self._check_awake("grow")
        old = self.num_blocks
        target = old + _check_count(num_blocks, self.max_num_blocks - old, "grow(): num_blocks")
        regions = self.cache.regions
        need = regions.mapped_bytes(target) - regions.mapped_bytes(old)
        if self.budget is None:
            return target, target, 0
        taken = self.budget.reserve_within(
            lambda free: regions.mapped_bytes(regions.max_blocks_within(old, free, target)) - regions.mapped_bytes(old))
        reachable = target if taken == need else regions.max_blocks_within(old, taken, target)
        return target, reachable, taken

    # ----------------------------------------------------------------- shrink
    def shrink(self, num_blocks: int) -> int:
        """Take up to ``num_blocks`` blocks off the top; return how many were released.

        Free blocks at the top are taken back (cached ones evicted); held ones are moved to free lower ids
        (``copy_blocks`` over every block tensor, the tables rewritten), which needs ``tables`` (the only
        holder of blocks then). With too few free lower ids the pool releases what every rank can (MIN
        over the group): ``min(num_blocks, self.num_blocks - held_blocks())`` with tables, the run of free
        ids at the top without. The chunks no remaining block needs are unmapped and their bytes go back
        to the budget.

        Raises
        ------
        InvalidArgumentError
            ``num_blocks`` outside ``[0, self.num_blocks]``, or the pool is asleep.
        RankMismatchError
            The ranks asked for different counts.
        """
        _, shares = _group.gather_step(self.group, "ElasticKVPool.shrink: check", InvalidArgumentError,
                                       lambda: self._releasable(num_blocks), share=lambda r: r)
        asked = sorted({s[0] for s in shares})
        if len(asked) > 1:
            raise RankMismatchError(f"ElasticKVPool.shrink: the ranks asked for different counts {asked}; every "
                                    "rank must call shrink(n) with the same n")
        count = min(s[1] for s in shares)
        _group.gather_step(self.group, "ElasticKVPool.shrink: move and unmap", KVPoolError,
                           lambda: self._shrink_by(count))
        return count

    def _releasable(self, num_blocks) -> tuple[int, int]:
        """``(asked, releasable)``: the top blocks this rank can give back of the ``num_blocks`` asked."""
        self._check_awake("shrink")
        n = _check_count(num_blocks, self.num_blocks, "shrink(): num_blocks")
        if self.tables is not None:
            return n, min(n, self.num_blocks - self.held_blocks())
        return n, min(n, int(self.allocator.free_top_blocks))

    def _shrink_by(self, count: int) -> None:
        if count == 0:
            return
        old = self.num_blocks
        if self.tables is not None and self.allocator.held_in_top(count):
            src, dst = self.tables.relocate_top(count)
            self.moved_blocks += len(src)
            if len(src):
                from ..kernels import copy_blocks  # noqa: PLC0415

                copy_blocks(self.cache.block_tensors(), src, dst)
        self.allocator.shrink(count)
        self.cache.resize(old - count)
        self._uncharge(self.cache.regions.mapped_bytes(old) - self.cache.regions.mapped_bytes(old - count))

    # ----------------------------------------------------------------- sleep and wake
    def sleep(self) -> None:
        """Release all physical memory; the addresses stay. Contents are dropped (a host tier keeping them
        is future work, docs/elastic.md), so no block may be held: free every sequence first. Cached blocks
        are evicted; the allocator hands out nothing until `wake`."""
        _group.gather_step(self.group, "ElasticKVPool.sleep: check", InvalidArgumentError, self._check_can_sleep)
        blocks = self.num_blocks
        _group.gather_step(self.group, "ElasticKVPool.sleep: release", KVPoolError, self._release_all)
        self._awake_blocks = blocks

    def _check_can_sleep(self) -> None:
        self._check_awake("sleep")
        held, seqs = self.held_blocks(), 0 if self.tables is None else len(self.tables)
        if held or seqs:
            raise InvalidArgumentError(f"sleep(): {held} blocks are held ({seqs} sequences in the tables); their "
                                       "contents would be lost: free every sequence (and run pending copies) first")

    def _release_all(self) -> None:
        self.allocator.shrink(self.num_blocks)  # evicts every cached block: their pages are about to be dropped
        self.cache.release()
        self._uncharge(self._charged)

    def wake(self) -> int:
        """Map the pool again at the same addresses (pages read as new) and hand its ids back to the
        allocator; return ``num_blocks``. Raises ``OutOfBlocksError`` when a budget cannot hold it (the pool
        stays asleep on every rank)."""
        nbytes = self.cache.regions.mapped_bytes(self.cache.num_blocks) if self.budget is not None else 0
        taken, mapped = [], []

        def reserve():
            self._check_open("wake")
            if not self.asleep:
                raise InvalidArgumentError("wake(): the pool is not asleep")
            if nbytes and not self.budget.try_reserve(nbytes):
                raise OutOfBlocksError(f"wake(): the pool needs {nbytes} bytes but the budget has "
                                       f"{self.budget.free_bytes} free; shrink or sleep another pool first")
            taken.append(nbytes)

        def remap():
            self.cache.remap()
            mapped.append(True)

        try:
            _group.gather_step(self.group, "ElasticKVPool.wake: reserve", InvalidArgumentError, reserve)
            _group.gather_step(self.group, "ElasticKVPool.wake: map", KVPoolError, remap)
        except BaseException:
            if mapped:
                self.cache.release()
            self._release(taken[0] if taken else 0)
            raise
        self._charged += nbytes
        self.allocator.grow(self._awake_blocks)
        self._awake_blocks = None
        return self.num_blocks

    # ----------------------------------------------------------------- helpers
    def _check_open(self, fn: str) -> None:
        if self._closed:
            raise InvalidArgumentError(f"{fn}(): the pool is closed (close() gave its bytes back to the budget); "
                                       "build a new pool")

    def _check_awake(self, fn: str) -> None:
        self._check_open(fn)
        if self.asleep:
            raise InvalidArgumentError(f"{fn}(): the pool is asleep; call wake() first")

    def _release(self, nbytes: int) -> None:
        if self.budget is not None and nbytes:
            self.budget.release(nbytes)

    def _uncharge(self, nbytes: int) -> None:
        if self.budget is not None and nbytes:
            self.budget.release(nbytes)
            self._charged -= nbytes

    def close(self) -> None:
        """Give this pool's bytes back to the budget (the memory goes when the cache is collected); grow, shrink,
        sleep and wake are refused from then on."""
        self._uncharge(self._charged)
        self._closed = True

    def __repr__(self) -> str:
        state = "asleep" if self.asleep else f"{self.num_blocks} of {self.max_num_blocks} blocks"
        return (f"ElasticKVPool({state}, {self.mapped_bytes / 2**20:.1f} MiB mapped, "
                f"{self.held_blocks() if not self.asleep else 0} held, rank {self.group.rank}/{self.group.size})")


def _agreed_growth(shares, old: int, partial: bool) -> int:
    """The size every rank grows to: the MIN of what each rank's budget allows (``shares``: each rank's
    ``(asked, reachable)``); raises on every rank alike when they asked for different sizes, or when the MIN
    falls short and ``partial`` is False."""
    asked, reachable = sorted({s[0] for s in shares}), min(s[1] for s in shares)
    if len(asked) > 1:
        raise RankMismatchError(f"ElasticKVPool.grow: the ranks asked for different sizes {asked} (blocks after "
                                "the grow); every rank must call grow(n) with the same n on the same pool")
    if reachable < asked[0] and not partial:
        tight = [r for r, s in enumerate(shares) if s[1] == reachable]
        raise OutOfBlocksError(
            f"ElasticKVPool.grow by {asked[0] - old} blocks: the memory budget of rank(s) {tight} allows "
            f"{reachable - old} (the pool has {old}); shrink or sleep another pool first, or pass partial=True",
            requested=asked[0] - old, available=reachable - old)
    return reachable
