"""The per-GPU memory plan: weights, activations, communication, overhead, and the KV pool left over.

``plan_memory`` = `make_request` (check and resolve the arguments) → `plan_stage` for each pipeline stage →
`assemble` (the tightest stage decides the pool; a workload check when asked). Every figure is in bytes;
GiB only appear in ``MemoryPlan.to_dict()`` and the command's tables.

Two budget modes:

- ``mem_fraction`` (vLLM's ``gpu_memory_utilization``): the process may use F x total;
  KV = F x total - weights - activation peak - the non-torch memory added after vLLM's start-up snapshot
  (comm + overhead). What exists before that snapshot (CUDA context, communicator set-up) is shown as
  ``MemoryPlan.before_snapshot`` and comes out of the ``(1 - F) x total`` headroom, as in vLLM.
- explicit reservations (``weights_gib``, ``activation_gib``, ``comm_gib``, ``overhead_gib``,
  ``headroom_gib``), each overriding its computed value; when any is given and ``mem_fraction`` is not,
  the budget is total - headroom (headroom defaults to 0: the seed's reservation list is the whole budget).

With pipeline parallelism each stage is planned; every rank must hold the same number of blocks (one
block table for the whole model), so the tightest stage decides.
"""
from __future__ import annotations

from dataclasses import replace

from ..errors import PlanError
from .host_tier import HostTierCapacity, host_tier_capacity
from .kv import window_aware_bytes_per_seq
from .kv_groups import kv_groups
from .vllm_kv import vllm_kv_figures
from .window_capacity import WindowCapacity, window_capacity
from .plan_result import KVPool, MemoryPlan
from .request import PlanRequest, make_request
from .stage import StageMemory, before_snapshot_term, comm_term, overhead_term, plan_stage, stage_layers
from .parallel import larger_tps
from .units import gib_text
from .vllm_comm import nontorch
from .weights import shard_weight_bytes


def plan_memory(model, tp: int = 1, pp: int = 1, gpu="h100-sxm", **settings) -> MemoryPlan:
    """Plan one model replica's memory on ``tp x pp`` GPUs.

    Parameters
    ----------
    model : str | path | dict | ModelSpec
        Preset name, config.json (or its folder), Hugging Face repo id, HF config dict, or a ModelSpec.
    tp, pp : int
        Tensor- and pipeline-parallel degrees (``tp x pp`` GPUs).
    gpu : str
        GPU preset (``kvpool gpus``); ``gpu_mem_gib`` overrides its memory.
    **settings
        The keyword arguments of `kvpool.plan.request.make_request`:

        - ``gpu_mem_gib``: the GPU's memory instead of the preset's;
        - ``dtype`` (serving dtype, default the checkpoint's), ``kv_dtype``: "auto" (the serving dtype),
          "fp16", "bf16", "fp32", "fp8" (with per-token-head float32 scales unless ``fp8_scales`` says
          otherwise: "per_head", "per_tensor", "none");
        - ``block_size`` (16), ``max_model_len`` (the model's);
        - ``max_batched_tokens`` (8192), ``max_seqs`` (256): the largest prefill step and the most sequences
          per step; they size the activation peak;
        - ``mem_fraction`` in (0, 1]: vLLM's ``gpu_memory_utilization`` (0.9 unless reservations are given);
        - ``weights_gib``, ``activation_gib``, ``comm_gib``, ``overhead_gib``, ``headroom_gib``: explicit
          per-GPU reservations overriding the computed values;
        - ``batch``, ``seq_len``: a target workload to check (``recommend=False`` skips re-planning the
          alternatives when it does not fit);
        - ``interconnect``, ``pp_interconnect``, ``nccl`` (`NCCLSettings`), ``cuda_graphs`` (True),
          ``cuda_context_mib``: the communication and overhead terms' inputs;
        - ``host_kv_gib``: pinned host memory per GPU for the host tier; ``plan.kv_cache.host_tier`` then gives
          its blocks, tokens and bytes (`kvpool.plan.host_tier`; None without it).

    Raises
    ------
    PlanError
        Inconsistent parallelism, or the weights (or everything but the KV pool) do not fit.
    InvalidArgumentError
        A bad number (negative memory, fraction outside (0, 1], block size not a power of two, ...).

    Examples
    --------
    >>> plan = plan_memory("llama-2-70b", tp=4, gpu="a100-80gb", weights_gib=35, comm_gib=4, activation_gib=10,
    ...                    overhead_gib=3)
    >>> # 22,937 = 28 GiB // 1,310,720 B per block (16 tokens x 80 layers x 2 KV heads x (128 + 128) x 2 B)
    >>> plan.kv_cache.kv_bytes_per_gpu == 28 << 30, plan.kv_cache.bytes_per_block_per_gpu, plan.num_blocks
    (True, 1310720, 22937)
    """
    return plan_request(make_request(model, tp, pp, gpu, **settings))


def plan_request(req: PlanRequest) -> MemoryPlan:
    """The plan of a checked request: each stage planned, then assembled (see `assemble`)."""
    budget, headroom = req.budget()
    model_bytes = shard_weight_bytes(req.spec, 1, req.serving_dtype)["total"]
    nt = nontorch(req)  # vLLM's non-torch memory, split at its start-up snapshot
    shared = (comm_term(req, nt), overhead_term(req, nt))
    stages = tuple(plan_stage(req, s, layers, budget, shared, model_bytes)
                   for s, layers in enumerate(stage_layers(req.spec.num_layers, req.pp)))
    return assemble(req, stages, budget, headroom, model_bytes, before_snapshot_term(req, nt))


def assemble(req: PlanRequest, stages: tuple[StageMemory, ...], budget: int, headroom: int,
             model_bytes: int, before_snapshot=None) -> MemoryPlan:
    """The plan of ``stages``: the one with the fewest blocks decides the pool; PlanError when it holds none."""
    tight = min(stages, key=lambda st: (st.num_blocks, st.kv_bytes))
    weights = tight.term("weights").bytes
    if weights > budget:
        raise PlanError(_weights_error(req, weights, budget))
    bytes_per_block = tight.layout.pool_bytes_per_block(req.block_size)
    if tight.kv_bytes < bytes_per_block:
        terms = " + ".join(f"{t.name} {gib_text(t.bytes)}" for t in tight.terms)
        raise PlanError(
            f"no memory left for the KV cache on stage {tight.index}: {terms} use the whole {gib_text(budget)} "
            f"budget (short by {gib_text(tight.reserved_bytes + bytes_per_block - budget)}); lower "
            "--max-batched-tokens / --max-seqs, raise --mem-fraction, or use more GPUs (--tp)")
    layout, spec = tight.layout, req.spec
    windows = [spec.layer_sliding_windows[i] if spec.layer_sliding_windows else None for i in tight.layers]
    kv_cache = KVPool(
        kv_dtype=layout.kv_dtype, bytes_per_token_per_gpu=layout.bytes_per_token,
        bytes_per_token_all_gpus=sum(st.layout.bytes_per_token for st in stages) * req.tp,
        block_size=req.block_size, bytes_per_block_per_gpu=bytes_per_block, num_blocks=tight.num_blocks,
        kv_bytes_per_gpu=tight.kv_bytes, max_model_len=req.max_model_len,
        per_seq_bytes_per_gpu_window_aware=window_aware_bytes_per_seq(
            spec, layout.bytes_per_token // layout.num_layers, tight.layers, req.max_model_len),
        sliding_window_layers=spec.sliding_layers, kv_heads_per_gpu=layout.kv_heads,
        group_windows=layout.kv_groups.windows if layout.kv_groups is not None else (None,),
        vllm=vllm_kv_figures(
            windows, (layout.bytes_per_token - layout.scale_bytes_per_token) // layout.num_layers * req.block_size,
            tight.kv_bytes, req.block_size, req.max_model_len, req.max_batched_tokens),
        window=_window_capacity(req, layout, windows, tight.kv_bytes),
        host_tier=_host_tier(req, stages, layout))
    plan = MemoryPlan(req, stages, tight.index, budget, headroom, model_bytes, kv_cache,
                      before_snapshot=before_snapshot or before_snapshot_term(req))
    if req.batch is not None:
        from .workload import check_workload  # only a workload check needs it: `kvpool plan` starts faster

        plan = replace(plan, workload=check_workload(plan, replan=plan_request))
    return plan


def _host_tier(req: PlanRequest, stages, layout) -> HostTierCapacity | None:
    """The host tier ``req.host_kv_bytes`` per GPU holds (None without one): blocks of the largest stage's size."""
    if req.host_kv_bytes is None:
        return None
    per_block = max(st.layout.pool_bytes_per_block(req.block_size) for st in stages)
    groups = len(layout.kv_groups.windows) if layout.kv_groups is not None else 1
    return host_tier_capacity(req.host_kv_bytes, per_block, req.block_size, groups, req.tp * req.pp)


def _window_capacity(req: PlanRequest, layout, windows: list, kv_bytes: int) -> WindowCapacity | None:
    """Requests held with window freeing, for a stage with sliding-window layers (None without)."""
    if not any(windows):
        return None
    page = layout.bytes_per_layer_token * req.block_size  # one layer's block, scales included
    return window_capacity(kv_groups(windows), page, kv_bytes, req.max_model_len, req.block_size)


def _weights_error(req: PlanRequest, weights: int, budget: int) -> str:
    """Why the weights do not fit, by how much, and the smallest larger TP degree whose shard would."""
    spec, layers = req.spec, stage_layers(req.spec.num_layers, req.pp)
    hint = "; use more GPUs (--tp/--pp), a larger GPU or a quantized checkpoint"
    for tp in larger_tps(spec, req.tp):
        shard = max(shard_weight_bytes(spec, tp, req.serving_dtype, stage)["total"] for stage in layers)
        if shard < budget:
            hint = f"; tp={tp} ({gib_text(shard)} of weights per GPU) would fit"
            break
    return (f"{spec.name} weights need {gib_text(weights)} per GPU at tp={req.tp}, pp={req.pp} but the budget on "
            f"{req.gpu.name} is {gib_text(budget)}: over by {gib_text(weights - budget)}{hint}")


__all__ = ["plan_memory", "plan_request", "assemble", "make_request", "stage_layers", "MemoryPlan", "KVPool",
           "PlanRequest"]
