"""``--elastic``: the demo's pool starts at a quarter of its size, grows under load, shrinks when idle.

The pages are an :class:`~kvpool.elastic.ElasticKVCache` reserved for the block count ``size_kv_pool``
agreed on (the most the pool may reach) and the allocator starts with a quarter of it. Before each step
:class:`ElasticPolicy` looks at the scheduler (the same state on every rank, so every rank calls the same
collective ``grow`` / ``shrink`` in the same step):

- the running decodes plus the first waiting prompt need more blocks than are free: grow by ``step``
  blocks (or what is missing), up to the maximum;
- nothing runs or waits: shrink to the starting size (the pool is idle; cached blocks are evicted);
- more than two steps' worth of blocks are free beyond that need: shrink by ``step``; held blocks at the
  top move to free lower ids (``copy_blocks``, the tables rewritten), so the tokens stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ElasticStats:
    """What the policy did over a run."""

    grows: int = 0
    shrinks: int = 0
    blocks_added: int = 0
    blocks_released: int = 0
    blocks_moved: int = 0
    peak_blocks: int = 0
    final_blocks: int = 0
    max_blocks: int = 0

    def describe(self) -> str:
        return (f"grew {self.grows}x (+{self.blocks_added} blocks), shrank {self.shrinks}x (-{self.blocks_released}, "
                f"{self.blocks_moved} held blocks moved), peak {self.peak_blocks} of {self.max_blocks}, "
                f"{self.final_blocks} at the end")


def elastic_pages(spec, max_blocks: int, block_size: int, tp_rank: int, tp_size: int, device, *,
                  enable_prefix_caching: bool, hash_key):
    """``(cache, allocator)``: fp32 pages reserved for ``max_blocks``, a quarter of them mapped."""
    import torch  # noqa: PLC0415

    from ..allocator import BlockAllocator  # noqa: PLC0415
    from ..elastic import ElasticKVCache  # noqa: PLC0415

    start = max(1, max_blocks // 4)
    cache = ElasticKVCache.for_shard(spec, max_blocks, block_size, tp_rank, tp_size, device, dtype=torch.float32,
                                     kv_dtype="fp32", num_blocks=start)
    allocator = BlockAllocator(start, block_size, enable_prefix_caching=enable_prefix_caching, hash_key=hash_key,
                               max_num_blocks=max_blocks)
    return cache, allocator


class ElasticPolicy:
    """Grows and shrinks an :class:`~kvpool.ElasticKVPool` from the scheduler's state (see the module doc)."""

    def __init__(self, pool, scheduler):
        self.pool, self.scheduler = pool, scheduler
        self.floor = pool.num_blocks  # the starting size: the idle pool goes back to it
        self.step = max(1, pool.max_num_blocks // 4)
        self.stats = ElasticStats(peak_blocks=pool.num_blocks, final_blocks=pool.num_blocks,
                                  max_blocks=pool.max_num_blocks)

    def _blocks_needed(self) -> int:
        """New blocks this step's decodes and the first waiting prompt take (the scheduler's own count)."""
        s, bs = self.scheduler, self.scheduler.block_size
        need = sum(s.tables.num_tokens(q.seq_id) % bs == 0 for q in s.running)
        if s.waiting and len(s.running) < s.max_running:
            need += -(-len(s.waiting[0].tokens) // bs)
        return s.num_groups * need

    def before_step(self) -> None:
        """Resize the pool for the step about to be scheduled (a collective call on every rank)."""
        pool, s = self.pool, self.scheduler
        free, need = pool.allocator.num_free_blocks, self._blocks_needed()
        if need > free and pool.num_blocks < pool.max_num_blocks:
            added = pool.grow(min(max(self.step, need - free), pool.max_num_blocks - pool.num_blocks))
            self.stats.grows, self.stats.blocks_added = self.stats.grows + 1, self.stats.blocks_added + added
        elif not s.running and not s.waiting:
            self._shrink(pool.num_blocks - self.floor)
        elif free - need >= 2 * self.step:
            self._shrink(self.step)
        self.stats.peak_blocks = max(self.stats.peak_blocks, pool.num_blocks)
        self.stats.final_blocks = pool.num_blocks

    def finish(self) -> None:
        """The run is over: give back everything above the starting size."""
        self._shrink(self.pool.num_blocks - self.floor)
        self.stats.final_blocks = self.pool.num_blocks

    def _shrink(self, count: int) -> None:
        if count <= 0:
            return
        moved = self.pool.moved_blocks
        released = self.pool.shrink(count)
        if released:
            self.stats.shrinks += 1
            self.stats.blocks_released += released
            self.stats.blocks_moved += self.pool.moved_blocks - moved
