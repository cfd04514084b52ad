"""The planner's prediction for the pool a rank just measured: same model, TP, KV dtype, budget."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional


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
        ``weights_bytes, activation_bytes, comm_bytes, overhead_bytes, before_snapshot_bytes, non_torch_bytes,
        kv_bytes, bytes_per_block, num_blocks`` (the plan's exact bytes) and the plan's ``to_dict()`` under ``plan``;
        or None and the planner's error message.
    """
    from ..plan.memory import make_request, plan_request
    from ..plan.units import GIB

    try:
        request = make_request(spec, tp=tp, gpu=gpu, mem_fraction=mem_fraction, kv_dtype=kv_dtype,
                               fp8_scales=fp8_scales, block_size=block_size, max_batched_tokens=max_batched_tokens,
                               max_seqs=max_seqs, cuda_graphs=False, recommend=False)
        # the measured memory and headroom in bytes, as measured (the label as a GiB figure would show it)
        request = replace(request, total_bytes=total_bytes, reserved=replace(request.reserved, headroom=headroom_bytes),
                          gpu_label=f"{request.gpu.name} ({total_bytes / GIB:g} GiB)")
        plan = plan_request(request)
    except Exception as exc:  # noqa: BLE001 - sizing never fails because the prediction does
        return None, f"{type(exc).__name__}: {exc}"
    terms = {t.name: t.bytes for t in plan.tight.terms}
    return {
        "weights_bytes": terms["weights"],
        "activation_bytes": terms["activation"],
        "comm_bytes": terms["comm"],
        "overhead_bytes": terms["overhead"],
        # what a rank measures outside torch: the plan's comm + overhead and what exists before vLLM's snapshot
        "before_snapshot_bytes": plan.before_snapshot.bytes,
        "non_torch_bytes": terms["comm"] + terms["overhead"] + plan.before_snapshot.bytes,
        "kv_bytes": plan.kv_cache.kv_bytes_per_gpu,
        "bytes_per_block": plan.kv_cache.bytes_per_block_per_gpu,
        "num_blocks": plan.num_blocks,
        "plan": plan.to_dict(),
    }, None
