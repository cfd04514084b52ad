"""The per-GPU memory plan: weights, activations, communication, overhead, and the KV pool left over.

Two budget modes:

- ``mem_fraction`` (vLLM's ``gpu_memory_utilization``): the process may use F x total;
  KV = F x total - weights - activation peak - non-torch memory (CUDA context, NCCL, CUDA graphs).
- explicit reservations (``weights_gib``, ``activation_gib``, ``comm_gib``, ``overhead_gib``,
  ``headroom_gib``), each overriding its computed value; when any is given and ``mem_fraction`` is not,
  the budget is total - headroom (headroom defaults to 0: the seed's reservation list is the whole budget).

With pipeline parallelism each stage is planned; every rank must hold the same number of blocks (one
block table for the whole model), so the tightest stage decides.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgumentError, PlanError
from .activation import activation_bytes
from .checks import check_block_size
from .checks import check_gib as _check_gib
from .checks import check_positive_int as _check_pos_int
from .comm import NCCLSettings, nccl_buffer_bytes, staging_bytes
from .hardware import GIB, MIB, get_gpu, get_interconnect
from .kv import check_tp, kv_shard_layout, resolve_kv_dtype, serving_dtype
from .model import ModelSpec, load_model_spec
from .weights import DTYPE_BYTES, shard_weight_bytes

DEFAULT_MEM_FRACTION = 0.9  # vLLM's default gpu_memory_utilization
DEFAULT_MAX_BATCHED_TOKENS = 8192
DEFAULT_MAX_SEQS = 256
CUDA_GRAPH_MAX_BATCH = 512  # vLLM captures decode graphs up to this batch size
CUBLAS_WORKSPACE = 32 * MIB  # torch's cuBLAS workspace on Hopper (4 MiB x 8 on older cards; we take the larger)


@dataclass
class MemoryPlan:
    """A computed deployment plan. ``to_dict()`` is what ``kvpool plan --json`` prints."""

    model: str
    gpu: str
    parallel: dict
    per_gpu: dict
    kv_cache: dict
    workload: dict | None
    stages: list
    details: dict
    assumptions: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache["num_blocks"]

    @property
    def block_size(self) -> int:
        return self.kv_cache["block_size"]

    def to_dict(self) -> dict:
        out = {"model": self.model, "gpu": self.gpu, "parallel": self.parallel, "per_gpu": self.per_gpu,
               "kv_cache": self.kv_cache}
        if self.workload is not None:
            out["workload"] = self.workload
        out.update({"stages": self.stages, "details": self.details, "assumptions": self.assumptions,
                    "warnings": self.warnings})
        return out


def _gib(nbytes: float) -> float:
    return round(nbytes / GIB, 4)


def _g(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of each pipeline stage; the first ``num_layers % pp`` stages get one more."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def window_aware_bytes_per_seq(spec: ModelSpec, per_layer_token: int, layers: range, seq_len: int) -> int:
    """KV bytes of one sequence of ``seq_len`` tokens when sliding-window layers keep only their window
    (what an engine with a per-layer-type pool holds; kvpool's single pool holds every layer in full).

    ``per_layer_token`` is one layer's KV bytes per token on this shard.
    """
    total = 0
    for i in layers:
        window = spec.layer_sliding_windows[i] if spec.layer_sliding_windows else None
        total += per_layer_token * (seq_len if window is None else min(seq_len, window))
    return total


def plan_memory(
    model,
    tp: int = 1,
    pp: int = 1,
    gpu="h100-sxm",
    *,
    gpu_mem_gib: float | None = None,
    dtype: str | None = None,
    kv_dtype: str = "auto",
    fp8_scales: str = "per_token_head",
    block_size: int = 16,
    max_model_len: int | None = None,
    max_batched_tokens: int | None = None,
    max_seqs: int | None = None,
    mem_fraction: float | None = None,
    weights_gib: float | None = None,
    activation_gib: float | None = None,
    comm_gib: float | None = None,
    overhead_gib: float | None = None,
    headroom_gib: float | None = None,
    batch: int | None = None,
    seq_len: int | None = None,
    interconnect: str | None = None,
    pp_interconnect: str | None = None,
    nccl: NCCLSettings | None = None,
    cuda_graphs: bool = True,
    cuda_context_mib: int | None = None,
    recommend: bool = True,
) -> MemoryPlan:
    """Plan one model replica's memory on ``tp x pp`` GPUs.

    Parameters
    ----------
    model : str | path | dict | ModelSpec
        Preset name, config.json (or its folder), HF config dict, or a ModelSpec.
    tp, pp : int
        Tensor- and pipeline-parallel degrees (``tp x pp`` GPUs).
    gpu : str
        GPU preset (``kvpool gpus``); ``gpu_mem_gib`` overrides its memory.
    kv_dtype : str
        "auto" (the serving dtype), "fp16", "bf16", "fp8" (with per-token-head float32 scales unless
        ``fp8_scales`` says otherwise).
    max_batched_tokens, max_seqs : int
        Largest prefill step (tokens) and most sequences per step; they size the activation peak.
    mem_fraction : float in (0, 1]
        vLLM ``gpu_memory_utilization``.
    weights_gib, activation_gib, comm_gib, overhead_gib, headroom_gib : float
        Explicit per-GPU reservations overriding the computed values.
    batch, seq_len : int
        A target workload to check.

    Raises
    ------
    PlanError
        Inconsistent parallelism, or the weights (or everything but the KV pool) do not fit.
    InvalidArgumentError
        A bad number (negative memory, fraction outside (0, 1], block size not a power of two, ...).
    """
    spec = load_model_spec(model)
    gpu_preset = get_gpu(gpu)
    # each count as a plain int: a numpy integer is accepted, and never leaks into to_dict() (not JSON-able)
    tp = check_tp(spec, tp)
    pp = _check_pos_int("pp", pp, allow_none=False)
    if pp > spec.num_layers:
        raise PlanError(f"pp={pp} is larger than the {spec.num_layers} layers of {spec.name}; use pp <= {spec.num_layers}")
    block_size = check_block_size(block_size)
    max_model_len, max_batched_tokens, max_seqs, batch, seq_len, cuda_context_mib = (
        _check_pos_int(name, value) for name, value in (
            ("max_model_len", max_model_len), ("max_batched_tokens", max_batched_tokens), ("max_seqs", max_seqs),
            ("batch", batch), ("seq_len", seq_len), ("cuda_context_mib", cuda_context_mib)))
    if (batch is None) != (seq_len is None):
        raise InvalidArgumentError("give both batch and seq_len for a target workload, or neither")
    if mem_fraction is not None:
        if isinstance(mem_fraction, bool) or not isinstance(mem_fraction, (int, float)) or not 0 < mem_fraction <= 1:
            raise InvalidArgumentError(f"mem_fraction must be in (0, 1] (like vLLM's --gpu-memory-utilization), got {mem_fraction!r}")
    gpu_mem_gib = _check_gib("gpu_mem_gib", gpu_mem_gib, strictly_positive=True)
    overrides = {k: _check_gib(k, v) for k, v in (("weights_gib", weights_gib), ("activation_gib", activation_gib),
                                                   ("comm_gib", comm_gib), ("overhead_gib", overhead_gib),
                                                   ("headroom_gib", headroom_gib))}
    act_dtype = serving_dtype(spec, dtype)
    kv_name = resolve_kv_dtype(kv_dtype, act_dtype)
    elem = DTYPE_BYTES[act_dtype]
    max_model_len = max_model_len or spec.max_position_embeddings
    max_batched_tokens = max_batched_tokens or DEFAULT_MAX_BATCHED_TOKENS
    max_seqs = max_seqs or DEFAULT_MAX_SEQS
    link = get_interconnect(interconnect or gpu_preset.interconnect)
    # pipeline stages share the node's link while the deployment fits in one 8-GPU server, else InfiniBand
    pp_link = get_interconnect(pp_interconnect) if pp_interconnect else (
        link if tp * pp <= 8 else get_interconnect("ib-ndr"))
    nccl = nccl or NCCLSettings()

    total = int(gpu_mem_gib * GIB) if gpu_mem_gib is not None else gpu_preset.memory_bytes
    explicit_mode = mem_fraction is None and any(v is not None for v in overrides.values())
    if explicit_mode:
        mode, fraction = "reservations", None
        headroom = int((overrides["headroom_gib"] or 0.0) * GIB)
        budget = total - headroom
    else:
        mode, fraction = "mem_fraction", DEFAULT_MEM_FRACTION if mem_fraction is None else float(mem_fraction)
        budget = int(total * fraction) - int((overrides["headroom_gib"] or 0.0) * GIB)
        headroom = total - budget

    stages = []
    for s, layers in enumerate(stage_layers(spec.num_layers, pp)):
        first, last = s == 0, s == pp - 1
        layout = kv_shard_layout(spec, tp, kv_name, fp8_scales, num_layers=len(layers))
        weights = shard_weight_bytes(spec, tp, act_dtype, layers, embed=first, head=last)
        act = activation_bytes(spec, tp, max_batched_tokens, max_seqs, elem, last_stage=last)
        nccl_tp = nccl_buffer_bytes(tp, link, nccl)
        nccl_pp = nccl_buffer_bytes(2, pp_link, nccl)["protocol_buffers"] if pp > 1 else 0
        staging = staging_bytes(spec.hidden_size, max_seqs, elem, nccl) if tp > 1 else 0
        comm = nccl_tp["total"] + nccl_pp + staging
        context = (cuda_context_mib if cuda_context_mib is not None else gpu_preset.cuda_context_mib) * MIB
        graphs = 0
        if cuda_graphs:
            # the graph pool keeps the activations of the largest captured decode batch
            graphs = activation_bytes(spec, tp, min(max_seqs, CUDA_GRAPH_MAX_BATCH), max_seqs, elem,
                                      last_stage=False)["peak"]
        overhead = context + CUBLAS_WORKSPACE + graphs
        terms = {
            "weights": weights["total"] if overrides["weights_gib"] is None else int(overrides["weights_gib"] * GIB),
            "activation": act["peak"] if overrides["activation_gib"] is None else int(overrides["activation_gib"] * GIB),
            "comm": comm if overrides["comm_gib"] is None else int(overrides["comm_gib"] * GIB),
            "overhead": overhead if overrides["overhead_gib"] is None else int(overrides["overhead_gib"] * GIB),
        }
        kv_bytes = budget - sum(terms.values())
        stages.append({
            "stage": s, "layers": [layers.start, layers.stop], "layout": layout, "terms": terms,
            "kv_bytes": kv_bytes, "weights_parts": weights, "activation_parts": act,
            "comm_parts": {"nccl_tp": nccl_tp, "nccl_pp": nccl_pp, "staging": staging},
            "overhead_parts": {"cuda_context": context, "cublas_workspace": CUBLAS_WORKSPACE, "cuda_graphs": graphs},
        })

    for st in stages:
        st["num_blocks"] = max(0, st["kv_bytes"]) // st["layout"].bytes_per_block(block_size)
    tight = min(stages, key=lambda st: (st["num_blocks"], st["kv_bytes"]))
    terms, layout = tight["terms"], tight["layout"]

    if terms["weights"] > budget:
        raise PlanError(_weights_error(spec, tp, pp, terms["weights"], budget, gpu_preset, act_dtype))
    if tight["kv_bytes"] < layout.bytes_per_block(block_size):
        need = sum(terms.values()) + layout.bytes_per_block(block_size) - budget
        raise PlanError(
            f"no memory left for the KV cache on stage {tight['stage']}: weights {_g(terms['weights'])} + activation "
            f"{_g(terms['activation'])} + comm {_g(terms['comm'])} + overhead {_g(terms['overhead'])} "
            f"use the whole {_g(budget)} budget (short by {_g(need)}); lower --max-batched-tokens / "
            f"--max-seqs, raise --mem-fraction, or use more GPUs (--tp)"
        )

    num_blocks = tight["num_blocks"]
    bpt = layout.bytes_per_token
    bpb = layout.bytes_per_block(block_size)
    tokens = num_blocks * block_size
    kv_bytes = tight["kv_bytes"]
    window_seq = window_aware_bytes_per_seq(spec, layout.bytes_per_token // layout.num_layers,
                                            range(*tight["layers"]), max_model_len)
    per_seq_full = bpt * max_model_len
    kv_cache = {
        "kv_dtype": layout.kv_dtype,
        "bytes_per_token_per_gpu": bpt,
        "bytes_per_token_all_gpus": bpt * tp * pp if pp == 1 else sum(st["layout"].bytes_per_token for st in stages) * tp,
        "block_size": block_size,
        "bytes_per_block_per_gpu": bpb,
        "num_blocks": num_blocks,
        "tokens": tokens,
        "tokens_unpaged": kv_bytes // bpt,
        "kv_bytes_per_gpu": kv_bytes,
        "max_model_len": max_model_len,
        "max_concurrency": round(tokens / max_model_len, 2),
        "max_concurrency_window_aware": round(kv_bytes / window_seq, 2),
        "per_seq_bytes_per_gpu": per_seq_full,
        "per_seq_bytes_per_gpu_window_aware": window_seq,
        "sliding_window_layers": spec.sliding_layers,
        "kv_heads_per_gpu": layout.kv_heads,
        "unused_bytes_per_gpu": kv_bytes - num_blocks * bpb,
    }
    gpus = tp * pp
    per_gpu = {
        "total_gib": _gib(total),
        "budget_gib": _gib(budget),
        "weights_gib": _gib(terms["weights"]),
        "activation_gib": _gib(terms["activation"]),
        "comm_gib": _gib(terms["comm"]),
        "overhead_gib": _gib(terms["overhead"]),
        "kv_cache_gib": _gib(kv_bytes),
        "headroom_gib": _gib(headroom),
        "budget_mode": mode,
        "mem_fraction": fraction,
    }
    warnings = []
    if tokens < max_model_len:
        warnings.append(
            f"the pool holds {tokens:,} tokens, fewer than max_model_len={max_model_len:,}: one full-length request "
            f"does not fit; lower --max-model-len to {tokens:,} or add memory"
        )
    if spec.sliding_layers:
        warnings.append(
            f"{spec.sliding_layers} of {spec.num_layers} layers use a sliding window; kvpool's single block table "
            f"stores them at full length ({kv_cache['max_concurrency']}x concurrency); an engine with a per-layer-type "
            f"pool would reach {kv_cache['max_concurrency_window_aware']}x"
        )
    plan = MemoryPlan(
        model=spec.name,
        gpu=gpu_preset.name if gpu_mem_gib is None else f"{gpu_preset.name} ({gpu_mem_gib:g} GiB)",
        parallel={"tp": tp, "pp": pp, "gpus": gpus, "tightest_stage": tight["stage"], "interconnect": link.name},
        per_gpu=per_gpu,
        kv_cache=kv_cache,
        workload=None,
        stages=[_stage_summary(st, block_size) for st in stages],
        details={
            "dtype": act_dtype,
            "weights_total_gib": _gib(shard_weight_bytes(spec, 1, act_dtype)["total"]),
            "weights_by_part_gib": {k: _gib(v) for k, v in tight["weights_parts"].items() if k != "total"},
            "activation_bytes": tight["activation_parts"],
            "comm_bytes": tight["comm_parts"],
            "overhead_bytes": tight["overhead_parts"],
            "layout": layout.to_dict(),
            "computed_gib": _computed(tight),
            "overridden": [k for k, v in overrides.items() if v is not None],
            "max_batched_tokens": max_batched_tokens,
            "max_seqs": max_seqs,
            "parameters": spec.num_parameters,
            "model_source": spec.source,
        },
        assumptions=[
            "activation: FlashAttention-style prefill of max_batched_tokens tokens (no TxT scores), largest layer live",
            "sampler: max_seqs rows of logits (model dtype + fp32 logits + fp32 probs)",
            f"overhead: CUDA context {(cuda_context_mib or gpu_preset.cuda_context_mib)} MiB + cuBLAS workspace"
            + (" + CUDA-graph pool (decode batch activations)" if cuda_graphs else ""),
            f"comm: NCCL {nccl_buffer_bytes(tp, link, nccl)['channels']} channels x {nccl.peers} peers x "
            f"{'+'.join(nccl.protocols)} buffers" + (", NVLS" if nccl_buffer_bytes(tp, link, nccl)['nvls'] else ""),
        ],
        warnings=warnings,
    )
    if batch is not None:
        from .workload import check_workload

        plan.workload = check_workload(plan, spec, batch, seq_len, recommend=recommend, replan=_replanner(locals()))
    return plan


def _computed(stage: dict) -> dict:
    return {
        "weights": _gib(stage["weights_parts"]["total"]),
        "activation": _gib(stage["activation_parts"]["peak"]),
        "comm": _gib(sum(v["total"] if isinstance(v, dict) else v for v in stage["comm_parts"].values())),
        "overhead": _gib(sum(stage["overhead_parts"].values())),
    }


def _stage_summary(st: dict, block_size: int) -> dict:
    return {"stage": st["stage"], "layers": st["layers"],
            **{f"{k}_gib": _gib(v) for k, v in st["terms"].items()},
            "kv_cache_gib": _gib(st["kv_bytes"]), "num_blocks": st["num_blocks"],
            "bytes_per_token_per_gpu": st["layout"].bytes_per_token}


def _replanner(args: dict):
    """A function re-running this plan with some arguments changed (for recommendations)."""
    keep = {k: args[k] for k in ("gpu_mem_gib", "dtype", "fp8_scales", "block_size", "max_model_len",
                                 "max_batched_tokens", "max_seqs", "mem_fraction", "activation_gib", "comm_gib",
                                 "overhead_gib", "headroom_gib", "interconnect", "pp_interconnect", "nccl",
                                 "cuda_graphs", "cuda_context_mib")}
    spec, tp, pp, gpu, kv_dtype, weights_gib = args["spec"], args["tp"], args["pp"], args["gpu"], args["kv_dtype"], args["weights_gib"]

    def replan(**changes):
        kw = dict(keep, kv_dtype=kv_dtype, weights_gib=weights_gib)
        new_tp = changes.pop("tp", tp)
        if weights_gib is not None and new_tp != tp:
            kw["weights_gib"] = weights_gib * tp / new_tp  # an explicit shard size scales with the TP degree
        kw.update(changes)
        return plan_memory(spec, new_tp, pp, gpu, recommend=False, **kw)

    return replan


def _weights_error(spec, tp, pp, weights, budget, gpu, dtype) -> str:
    fits = []
    for new_tp in (2, 4, 8, 16, 32, 64):
        if new_tp <= tp or spec.num_attention_heads % new_tp:
            continue
        try:
            check_tp(spec, new_tp)
        except PlanError:
            continue
        w = max(shard_weight_bytes(spec, new_tp, dtype, layers)["total"] for layers in stage_layers(spec.num_layers, pp))
        if w < budget:
            fits.append(f"tp={new_tp} ({_g(w)} of weights per GPU)")
            break
    hint = f"; {fits[0]} would fit" if fits else "; use more GPUs (--tp/--pp), a larger GPU or a quantized checkpoint"
    return (f"{spec.name} weights need {_g(weights)} per GPU at tp={tp}, pp={pp} but the budget on "
            f"{gpu.name} is {_g(budget)}: over by {_g(weights - budget)}{hint}")
