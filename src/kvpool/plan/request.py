"""`PlanRequest`: everything one memory plan depends on, checked and resolved, in bytes.

`make_request` is the planner's front door: it checks every argument of ``plan_memory`` (one clear error
naming the value and the fix), resolves names to presets and canonical dtypes, fills the defaults and
turns GiB into bytes. A variant of a plan (another TP degree, fp8 KV) is
``dataclasses.replace(request, tp=8)``: no argument is found by its name as a string.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .checks import check_block_size, check_choice, check_fraction, check_gib, check_positive_int
from .comm import NCCLSettings
from .dtypes import resolve_kv_dtype, serving_dtype
from .hardware import GPU, INTERCONNECTS, Interconnect, get_gpu, get_interconnect
from .kv import FP8_SCALE_MODES
from .model import ModelSpec, load_model_spec
from .parallel import check_pp, check_tp
from .units import GIB, MIB

DEFAULT_MEM_FRACTION = 0.9  # vLLM's default gpu_memory_utilization
DEFAULT_MAX_BATCHED_TOKENS = 8192  # vLLM's `vllm serve` max_num_batched_tokens on a large GPU (see serve_defaults)
DEFAULT_MAX_SEQS = 1024  # vLLM's `vllm serve` max_num_seqs on a large GPU (see serve_defaults)
TERMS = ("weights", "activation", "comm", "overhead")  # the reservations of a per-GPU budget, in print order


@dataclass(frozen=True)
class Reservations:
    """Per-GPU bytes the caller reserved explicitly, each replacing its computed term (None: computed)."""

    weights: int | None = None
    activation: int | None = None
    comm: int | None = None
    overhead: int | None = None
    headroom: int | None = None  # memory left unused

    @property
    def any_given(self) -> bool:
        return any(v is not None for v in (self.weights, self.activation, self.comm, self.overhead, self.headroom))


@dataclass(frozen=True)
class PlanRequest:
    """The checked inputs of one plan; every memory figure in bytes, every name resolved.

    ``mem_fraction`` None means the explicit-reservations budget (total − headroom); a number is vLLM's
    ``gpu_memory_utilization`` (budget = fraction × total − headroom). ``pp_link`` None means the GPU's
    own link while the deployment fits one 8-GPU server, else InfiniBand NDR.
    """

    spec: ModelSpec
    gpu: GPU
    gpu_label: str  # the GPU's name, with the memory the caller gave when it overrides the preset's
    tp: int
    pp: int
    total_bytes: int
    mem_fraction: float | None
    reserved: Reservations
    serving_dtype: str
    kv_dtype: str
    fp8_scales: str
    block_size: int
    max_model_len: int
    max_batched_tokens: int
    max_seqs: int
    link: Interconnect
    pp_link: Interconnect | None
    nccl: NCCLSettings
    cuda_graphs: bool
    cuda_context_bytes: int
    batch: int | None = None
    seq_len: int | None = None
    recommend: bool = True
    host_kv_bytes: int | None = None  # pinned host memory per GPU for the host tier (None: no host tier)

    def budget(self) -> tuple[int, int]:
        """(budget, headroom) in bytes per GPU: what the process may use, and what it leaves unused."""
        headroom = self.reserved.headroom or 0
        if self.mem_fraction is None:
            return self.total_bytes - headroom, headroom
        # vLLM 0.19 v1/worker/utils.py request_memory: ceil(total x gpu_memory_utilization)
        budget = math.ceil(self.total_bytes * self.mem_fraction) - headroom
        return budget, self.total_bytes - budget

    def pipeline_link(self) -> Interconnect:
        """The link between pipeline stages."""
        if self.pp_link is not None:
            return self.pp_link
        return self.link if self.tp * self.pp <= 8 else INTERCONNECTS["ib-ndr"]


def serve_defaults(total_bytes: int, gpu_name: str) -> tuple[int, int]:
    """``(max_num_batched_tokens, max_num_seqs)`` that `vllm serve` picks when the command line gives none.

    vLLM 0.19 (``EngineArgs._set_default_max_num_seqs_and_batched_tokens_args``): 8,192 and 1,024 on a GPU
    with at least 70 GiB that is not an A100 (H100, H200, B200), else 2,048 and 256 (A100 excluded on
    purpose: larger batches lowered its throughput, vLLM PR #17885). Both shape the profile run vLLM
    measures: the dummy prefill of ``max_num_batched_tokens`` tokens and the sampler's warm-up of
    ``max_num_seqs`` rows.

    >>> serve_defaults(80 * GIB, "H100-SXM5-80GB"), serve_defaults(80 * GIB, "A100-SXM4-80GB")
    ((8192, 1024), (2048, 256))
    """
    if total_bytes >= 70 * GIB and "a100" not in gpu_name.lower():
        return DEFAULT_MAX_BATCHED_TOKENS, DEFAULT_MAX_SEQS
    return 2048, 256


def _bytes(name: str, gib) -> int | None:
    """A reservation given in GiB (checked: finite, >= 0) as bytes; None stays None."""
    value = check_gib(name, gib)
    return None if value is None else int(value * GIB)


def make_request(model, tp: int = 1, pp: int = 1, gpu="h100-sxm", *, gpu_mem_gib: float | None = None,
                 dtype: str | None = None, kv_dtype: str = "auto", fp8_scales: str = "per_token_head",
                 block_size: int = 16, max_model_len: int | None = None, max_batched_tokens: int | None = None,
                 max_seqs: int | None = None, mem_fraction: float | None = None, weights_gib: float | None = None,
                 activation_gib: float | None = None, comm_gib: float | None = None,
                 overhead_gib: float | None = None, headroom_gib: float | None = None, batch: int | None = None,
                 seq_len: int | None = None, interconnect: str | None = None, pp_interconnect: str | None = None,
                 nccl: NCCLSettings | None = None, cuda_graphs: bool = True, cuda_context_mib: int | None = None,
                 recommend: bool = True, host_kv_gib: float | None = None) -> PlanRequest:
    """The arguments of `kvpool.plan.plan_memory` (see there), checked and resolved into a `PlanRequest`.

    Raises
    ------
    PlanError
        Inconsistent parallelism (``tp`` not dividing the heads, ``pp`` above the layer count).
    InvalidArgumentError
        A bad number (negative memory, fraction outside (0, 1], block size not a power of two, ...).
    """
    spec = load_model_spec(model)
    gpu_preset = get_gpu(gpu)
    tp = check_tp(spec, tp)  # each count a plain int: a numpy integer is accepted and never leaks into JSON
    pp = check_pp(spec, pp)
    block_size = check_block_size(block_size)
    max_model_len, max_batched_tokens, max_seqs, batch, seq_len, cuda_context_mib = (
        check_positive_int(name, value) for name, value in (
            ("max_model_len", max_model_len), ("max_batched_tokens", max_batched_tokens), ("max_seqs", max_seqs),
            ("batch", batch), ("seq_len", seq_len), ("cuda_context_mib", cuda_context_mib)))
    if (batch is None) != (seq_len is None):
        raise InvalidArgumentError("give both batch and seq_len for a target workload, or neither")
    if mem_fraction is not None:
        mem_fraction = check_fraction("mem_fraction", mem_fraction, "it is vLLM's --gpu-memory-utilization")
    gpu_mem_gib = check_gib("gpu_mem_gib", gpu_mem_gib, strictly_positive=True)
    host_kv_gib = check_gib("host_kv_gib", host_kv_gib, strictly_positive=True)
    reserved = Reservations(*(_bytes(name, value) for name, value in (
        ("weights_gib", weights_gib), ("activation_gib", activation_gib), ("comm_gib", comm_gib),
        ("overhead_gib", overhead_gib), ("headroom_gib", headroom_gib))))
    act_dtype = serving_dtype(spec, dtype)
    if mem_fraction is None and not reserved.any_given:
        mem_fraction = DEFAULT_MEM_FRACTION
    total_bytes = gpu_preset.memory_bytes if gpu_mem_gib is None else int(gpu_mem_gib * GIB)
    default_tokens, default_seqs = serve_defaults(total_bytes, gpu_preset.name)
    max_batched_tokens = max_batched_tokens or default_tokens
    if max_seqs is not None and max_seqs > max_batched_tokens:
        raise InvalidArgumentError(
            f"max_seqs ({max_seqs}) must be at most max_batched_tokens ({max_batched_tokens}): a step schedules "
            "at least one token per sequence (vLLM refuses it too); lower --max-seqs or raise --max-batched-tokens")
    # like vLLM, the default max_num_seqs is capped at max_num_batched_tokens
    max_seqs = max_seqs or min(default_seqs, max_batched_tokens)
    return PlanRequest(
        spec=spec, gpu=gpu_preset, tp=tp, pp=pp,
        gpu_label=gpu_preset.name if gpu_mem_gib is None else f"{gpu_preset.name} ({gpu_mem_gib:g} GiB)",
        total_bytes=total_bytes,
        mem_fraction=mem_fraction,
        reserved=reserved, serving_dtype=act_dtype, kv_dtype=resolve_kv_dtype(kv_dtype, act_dtype),
        fp8_scales=check_choice("fp8_scales", fp8_scales, FP8_SCALE_MODES), block_size=block_size,
        max_model_len=max_model_len or spec.max_position_embeddings,
        max_batched_tokens=max_batched_tokens, max_seqs=max_seqs,
        link=get_interconnect(interconnect or gpu_preset.interconnect),
        pp_link=get_interconnect(pp_interconnect) if pp_interconnect else None, nccl=nccl or NCCLSettings(),
        cuda_graphs=bool(cuda_graphs), batch=batch, seq_len=seq_len, recommend=bool(recommend),
        cuda_context_bytes=(cuda_context_mib or gpu_preset.cuda_context_mib) * MIB,
        host_kv_bytes=None if host_kv_gib is None else int(host_kv_gib * GIB))


__all__ = ["PlanRequest", "Reservations", "make_request", "TERMS", "DEFAULT_MEM_FRACTION",
           "DEFAULT_MAX_BATCHED_TOKENS", "DEFAULT_MAX_SEQS", "serve_defaults"]
