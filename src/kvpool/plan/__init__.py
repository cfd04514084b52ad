"""Capacity planning for a paged KV cache under tensor parallelism (pure Python: no torch import).

>>> from kvpool.plan import plan_memory
>>> plan = plan_memory("llama-3.1-70b", tp=4, gpu="a100-80gb")
>>> plan.kv_cache["num_blocks"]  # doctest: +SKIP
"""
from .comm import NCCLSettings, allreduce_seconds, forward_comm, nccl_buffer_bytes
from .hardware import GPUS, INTERCONNECTS, GPU, Interconnect, get_gpu, get_interconnect
from .kv import KVShardLayout, kv_shard_layout, shard_kv_heads
from .memory import MemoryPlan, plan_memory
from .model import ModelSpec, list_presets, load_model_spec
from .planner import TPKVCachePlanner, KVWorkloadPlan
from .scaling import compare_interconnects, scale

__all__ = [
    "ModelSpec", "load_model_spec", "list_presets",
    "MemoryPlan", "plan_memory", "TPKVCachePlanner", "KVWorkloadPlan",
    "KVShardLayout", "kv_shard_layout", "shard_kv_heads",
    "GPU", "GPUS", "Interconnect", "INTERCONNECTS", "get_gpu", "get_interconnect",
    "NCCLSettings", "nccl_buffer_bytes", "allreduce_seconds", "forward_comm",
    "scale", "compare_interconnects",
]
