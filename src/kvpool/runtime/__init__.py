"""Start-up sizing of the KV pool on a live tensor-parallel server (torch.distributed).

``size_kv_pool`` measures what each rank really has free, what its forward really peaks at and what
NCCL really took, agrees with the other ranks on one block count (the MIN over the group), and returns
a ``PoolSize`` holding every rank's figures beside the planner's prediction. See ``docs/runtime.md``.
"""
from .pool_size import PoolSize, RankFigures
from .size import size_kv_pool

__all__ = ["size_kv_pool", "PoolSize", "RankFigures"]
