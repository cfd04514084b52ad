"""The planner's prediction for the pool a rank just measured: same model, TP, KV dtype, budget."""
from __future__ import annotations

from typing import Any, Optional

from .pool_size import GiB


def predict(spec: Any, *, tp: int, total_bytes: int, mem_fraction: float, headroom_bytes: int, kv_dtype: str,
            fp8_scales: str, block_size: int, max_batched_tokens: int, max_seqs: int,
            gpu: str) -> tuple[Optional[dict], Optional[str]]:
    """``kvpool.plan.plan_memory`` for these settings, in bytes, or ``(None, why)`` when it cannot plan them.

    The planner computes every term itself (weights, activation, comm, overhead) for a GPU whose total
    memory is the measured ``total_bytes``; nothing measured is fed to it, so the comparison shows where
    the plan differs from reality. CUDA graphs are left out of the plan (``cuda_graphs=False``) because
    the sizing call runs before a server captures any: their pool must fit in the headroom.

    Returns
    -------
    (dict or None, str or None)
        ``weights_bytes, activation_bytes, comm_bytes, overhead_bytes, non_torch_bytes, kv_bytes,
        bytes_per_block, num_blocks`` and the plan's ``to_dict()`` under ``plan``; or None and the
        planner's error message.
    """
    from ..plan.memory import plan_memory

    try:
        plan = plan_memory(
            spec, tp=tp, gpu=gpu, gpu_mem_gib=total_bytes / GiB, mem_fraction=mem_fraction,
            headroom_gib=headroom_bytes / GiB, kv_dtype=kv_dtype, fp8_scales=fp8_scales, block_size=block_size,
            max_batched_tokens=max_batched_tokens, max_seqs=max_seqs, cuda_graphs=False, recommend=False,
        ).to_dict()
    except Exception as exc:  # noqa: BLE001 - sizing never fails because the prediction does
        return None, f"{type(exc).__name__}: {exc}"
    per_gpu, kv = plan["per_gpu"], plan["kv_cache"]

    def b(key: str) -> int:
        return int(round(per_gpu[key] * GiB))

    return {
        "weights_bytes": b("weights_gib"),
        "activation_bytes": b("activation_gib"),
        "comm_bytes": b("comm_gib"),
        "overhead_bytes": b("overhead_gib"),
        "non_torch_bytes": b("comm_gib") + b("overhead_gib"),
        "kv_bytes": b("kv_cache_gib"),
        "bytes_per_block": int(kv["bytes_per_block_per_gpu"]),
        "num_blocks": int(kv["num_blocks"]),
        "plan": plan,
    }, None
