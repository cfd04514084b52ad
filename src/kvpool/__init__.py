"""kvpool: paged KV-cache memory for LLM inference under tensor parallelism.

The names below load lazily (PEP 562) so that ``import kvpool`` and the planner CLI never import
torch or numpy unless a name that needs them is used. A name whose optional dependency is missing
(torch or triton after a plain ``pip install kvpool``) raises :class:`MissingDependencyError` naming
the extra to install, ``pip install "kvpool[gpu]"``.
"""
from . import _optional_deps

from .errors import (
    BlockIndexError,
    ConfigError,
    InvalidArgumentError,
    KernelError,
    KVPoolError,
    MissingDependencyError,
    OutOfBlocksError,
    PlanError,
    ProfileError,
    RankMismatchError,
    ElasticUnavailableError,
    VirtualMemoryError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    # allocator (C++ core)
    "BlockAllocator": "kvpool.allocator",
    "hash_block_tokens": "kvpool.allocator",
    # planner (pure Python, no torch)
    "ModelSpec": "kvpool.plan",
    "load_model_spec": "kvpool.plan",
    "MemoryPlan": "kvpool.plan",
    "plan_memory": "kvpool.plan",
    "TPKVCachePlanner": "kvpool.plan",
    # pages, tables and kernels (torch)
    "PagedKVCache": "kvpool.cache",
    "BlockTables": "kvpool.block_table",
    "ElasticKVPool": "kvpool.elastic",
    "write_kv": "kvpool.kernels",
    "gather_kv": "kvpool.kernels",
    "copy_blocks": "kvpool.kernels",
    "paged_decode": "kvpool.kernels",
    "paged_prefill": "kvpool.kernels",
    "paged_attention": "kvpool.kernels",
    "prefill_attention": "kvpool.kernels",
    # host-memory tier of the prefix cache
    "HostKVTier": "kvpool.tier",
    # start-up sizing (torch.distributed)
    "size_kv_pool": "kvpool.runtime",
    "PoolSize": "kvpool.runtime",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpool' has no attribute {name!r}")
    # torch or triton missing: MissingDependencyError naming the extra that installs them
    value = getattr(_optional_deps.require(module, f"kvpool.{name}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "KVPoolError",
    "InvalidArgumentError",
    "BlockIndexError",
    "OutOfBlocksError",
    "PlanError",
    "ConfigError",
    "KernelError",
    "RankMismatchError",
    "ProfileError",
    "MissingDependencyError",
    "VirtualMemoryError",
    "ElasticUnavailableError",
    *_LAZY,
]
