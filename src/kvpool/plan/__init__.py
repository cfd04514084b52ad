"""Capacity planning for a paged KV cache under tensor parallelism (pure Python: no torch import).

>>> from kvpool.plan import plan_memory
>>> plan = plan_memory("llama-3.1-70b", tp=4, gpu="a100-80gb")
>>> plan.kv_cache.num_blocks, plan.kv_cache["num_blocks"]  # doctest: +SKIP

The names below load lazily (PEP 562), so ``kvpool plan`` imports only the modules it uses.
"""
import importlib

# public name -> the module of this package that defines it
_EXPORTS = {
    "ModelSpec": "model", "load_model_spec": "model", "list_presets": "model",
    "MemoryPlan": "plan_result", "KVPool": "plan_result",
    "plan_memory": "memory", "plan_request": "memory", "make_request": "request", "PlanRequest": "request",
    "StageMemory": "stage", "Term": "stage",
    "TPKVCachePlanner": "planner", "KVWorkloadPlan": "planner",
    "KVShardLayout": "kv", "kv_shard_layout": "kv", "shard_kv_heads": "kv",
    "GPU": "hardware", "GPUS": "hardware", "Interconnect": "hardware", "INTERCONNECTS": "hardware",
    "get_gpu": "hardware", "get_interconnect": "hardware",
    "NCCLSettings": "comm", "nccl_buffer_bytes": "comm", "allreduce_seconds": "comm", "forward_comm": "comm",
    "scale": "scaling", "compare_interconnects": "scaling",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpool.plan' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
