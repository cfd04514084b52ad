"""An elastic KV pool: pages over a reserved virtual range that grow, shrink and sleep in place.

`ElasticKVCache` is a `kvpool.PagedKVCache` whose block tensors never move while physical memory is
mapped under them chunk by chunk; `ElasticKVPool` keeps it, the allocator and the block tables in step
and decides every change collectively over the TP group; `MemoryBudget` shares a byte budget between
pools and processes. See docs/elastic.md.
"""
from .budget import MemoryBudget
from .cache import ElasticKVCache
from .pool import ElasticKVPool
from .regions import RegionLayout

__all__ = ["ElasticKVCache", "ElasticKVPool", "MemoryBudget", "RegionLayout"]
