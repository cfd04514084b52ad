"""One pipeline stage's per-GPU memory: the four reserved terms, each with how it was computed, and the KV rest.

Every TP rank of a stage holds the same bytes, so one `StageMemory` describes each of its GPUs. The
terms are in bytes; ``Term.how`` is the planner's own one-line account of a term, so a reader never
re-derives what is split and what is replicated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .activation import activation_bytes, peak_parts, profile_run_peak, profile_shape
from .comm import staging_bytes
from .dtypes import DTYPES
from .kv import KVShardLayout, kv_shard_layout
from .request import PlanRequest
from .units import GIB
from .nccl_buffers import connection_bytes
from .vllm_comm import NonTorch, coll_channels, nontorch
from .weights import shard_weight_bytes

CUDA_GRAPH_MAX_BATCH = 512  # vLLM captures decode graphs up to this batch size
# torch's cuBLAS(Lt) workspace is allocated by torch's caching allocator, so vLLM counts it in its torch peak:
# it is part of the activation term (`activation.cublas_workspace_bytes`), not of the overhead.


@dataclass(frozen=True)
class Term:
    """One reservation of a GPU's budget.

    Attributes
    ----------
    name : str
        "weights", "activation", "comm" or "overhead".
    bytes : int
        What the plan reserves: the caller's figure when ``given``, else ``computed``.
    how : str
        How the planner computed it, one line (figures in GiB with two decimals).
    computed : int
        The planner's own figure.
    given : bool
        Whether the caller reserved ``bytes`` explicitly (``weights_gib=``, ...).
    parts : dict
        The computed figure's parts in bytes (weights by part, activation phases, NCCL buffers, ...).
    """

    name: str
    bytes: int
    how: str
    computed: int
    given: bool = False
    parts: dict = field(default_factory=dict, compare=False)


def _term(name: str, computed: int, how: str, parts: dict, given: int | None) -> Term:
    return Term(name, computed if given is None else given, how, computed, given is not None, parts)


@dataclass(frozen=True)
class StageMemory:
    """The per-GPU memory of one pipeline stage (each of its ``tp`` GPUs holds the same)."""

    index: int
    layers: range
    layout: KVShardLayout
    terms: tuple[Term, ...]  # weights, activation, comm, overhead
    kv_bytes: int  # budget − the terms (negative when they overflow it)
    num_blocks: int  # whole KV blocks in kv_bytes

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    @property
    def reserved_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of each pipeline stage; the first ``num_layers % pp`` stages get one more.

    >>> stage_layers(126, 4)  # 126 = 2 x 32 + 2 x 31
    [range(0, 32), range(32, 64), range(64, 95), range(95, 126)]
    """
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def weights_term(req: PlanRequest, layers: range, first: bool, last: bool, model_bytes: int) -> Term:
    """This stage's shard of the weights (the embedding on the first stage, the LM head on the last)."""
    spec, tp = req.spec, req.tp
    parts = shard_weight_bytes(spec, tp, req.serving_dtype, layers, embed=first, head=last)
    dtype = (f"{spec.quant_method} {spec.weight_bits}-bit linear layers, {req.serving_dtype} rest"
             if spec.quant_method else req.serving_dtype)
    if spec.quant_method == "mxfp4":
        dtype = f"MXFP4 experts in vLLM's Hopper layout, {req.serving_dtype} rest"
    how = f"1/{tp} of {model_bytes / GIB:.2f} GiB ({dtype}) + replicated norms"
    how += (", router" if spec.is_moe else "") + (", KV heads" if spec.num_kv_heads < tp and not spec.is_mla else "")
    how += f", rope cache {parts['rope_cache'] / GIB:.2f}" if parts["rope_cache"] else ""
    how += f", vision tower {parts['vision'] / GIB:.2f}" if parts.get("vision") else ""
    if req.pp > 1:
        how += f", layers {layers.start}–{layers.stop - 1}"
    return _term("weights", parts["total"], how, parts, req.reserved.weights)


def activation_term(req: PlanRequest, last: bool) -> Term:
    """vLLM's ``torch_peak_increase``: the largest moment of its profile run (`kvpool.plan.activation`)."""
    peak = profile_run_peak(req.spec, profile_shape(req, last))
    phases = ", ".join(f"{p.name} {a / GIB:.2f}" for p, a in zip(peak.phases, peak.at))
    how = f"profile run: {phases}; peak in {peak.deciding.name}: {peak.deciding.moment}"
    return _term("activation", peak.bytes, how, peak_parts(peak), req.reserved.activation)


def comm_term(req: PlanRequest, nt: NonTorch | None = None) -> Term:
    """Communication memory vLLM 0.19 allocates AFTER its start-up snapshot (`kvpool.plan.vllm_comm`): torch's
    NCCL communicator of the TP group, NVLS buffers, FlashInfer's all-reduce fusion workspace."""
    nt = nt or nontorch(req)
    after = nt.after_comm
    torch_comm = next((c for c in nt.communicators if not c.before_snapshot), None)
    staging = staging_bytes(req.spec.hidden_size, req.max_seqs, DTYPES[req.serving_dtype].bytes, req.nccl)
    staging = staging if req.tp > 1 else 0
    if torch_comm is None:
        how = "no TP communicator (one GPU per stage); pipeline communicators exist before vLLM's snapshot"
        nccl_tp = {"channels": 0, "setup": 0, "protocol_buffers": 0, "nvls": 0, "total": 0}
    else:
        channels = coll_channels(req)
        nccl_tp = {"channels": channels, "setup": torch_comm.setup, "protocol_buffers": torch_comm.ring,
                   "nvls": after["nvls_buffers"], "total": torch_comm.total + after["nvls_buffers"]}
        how = (f"torch's NCCL comm {torch_comm.total / GIB:.2f} (set-up {torch_comm.setup / GIB:.2f} + ring "
               f"{channels} ch × {_pair(req) >> 20} MiB of LL+LL128+Simple)"
               + (f", NVLS {after['nvls_buffers'] / GIB:.2f}" if after["nvls_buffers"] else "")
               + (f", FlashInfer AR-fusion workspace {after['flashinfer_workspace'] / GIB:.2f}"
                  if after["flashinfer_workspace"] else "")
               + (f", staging {staging / GIB:.3f}" if staging else ""))
    parts = {"nccl_tp": nccl_tp, "nccl_pp": 0, "staging": staging, "nvls_buffers": after["nvls_buffers"],
             "flashinfer_workspace": after["flashinfer_workspace"]}
    return _term("comm", nt.after_comm_bytes + staging, how, parts, req.reserved.comm)


def _pair(req: PlanRequest) -> int:
    """One ring channel's receive + send connection on this GPU."""
    read = req.gpu.compute_capability == "8.0" and req.link.name.startswith("NVLink")
    return connection_bytes(req.nccl.buffer_sizes(read)).pair * (req.nccl.peers // 2)


def overhead_term(req: PlanRequest, nt: NonTorch | None = None) -> Term:
    """Memory outside torch that vLLM's profile run adds besides communication: lazily loaded kernels and
    library handles. The CUDA context exists before vLLM's snapshot (`before_snapshot_term`); CUDA graphs are
    captured after the KV cache is sized; cuBLAS's workspace is torch memory (the activation term)."""
    nt = nt or nontorch(req)
    graphs = 0
    if req.cuda_graphs:  # shown only: the graph pool comes out of the headroom after the KV cache is allocated
        graphs = activation_bytes(req.spec, req.tp, min(req.max_seqs, CUDA_GRAPH_MAX_BATCH), req.max_seqs,
                                  DTYPES[req.serving_dtype].bytes, last_stage=False)["peak"]
    parts = {"lazy_kernels": nt.after_kernels, "cuda_context": 0, "cublas_workspace": 0, "cuda_graphs": 0,
             "cuda_graphs_after_kv_estimate": graphs}
    how = (f"kernels and library handles the profile run loads {nt.after_kernels / GIB:.2f} (vLLM's tp-1 "
           "reading); graphs come after the KV cache")
    return _term("overhead", nt.after_kernels, how, parts, req.reserved.overhead)


def before_snapshot_term(req: PlanRequest, nt: NonTorch | None = None) -> Term:
    """What exists before vLLM's start-up snapshot (CUDA context, communicator set-up): shown, never subtracted
    (vLLM's KV arithmetic measures from that snapshot, so it sits in the ``1 - util`` headroom)."""
    nt = nt or nontorch(req)
    b = nt.before
    how = f"CUDA context {b['cuda_context'] / GIB:.2f}"
    if b["nccl_communicators"]:
        names = ", ".join(c.name for c in nt.communicators if c.before_snapshot)
        how += f" + NCCL {b['nccl_communicators'] / GIB:.2f} ({names}: set-up + ring)"
    for key, label in (("custom_allreduce", "custom all-reduce"), ("symm_mem", "symmetric memory")):
        how += f" + {label} {b[key] / GIB:.2f}" if b[key] else ""
    return Term("before_snapshot", nt.before_bytes, how, nt.before_bytes, False, dict(b))


def plan_stage(req: PlanRequest, index: int, layers: range, budget: int, shared: tuple[Term, Term],
               model_bytes: int) -> StageMemory:
    """Stage ``index`` (holding ``layers``): its terms, and the whole KV blocks its ``budget`` has left.

    ``shared`` are the terms every stage has alike (comm, overhead); ``model_bytes`` the whole model's
    weights, for the weights term's account.
    """
    first, last = index == 0, index == req.pp - 1
    layout = kv_shard_layout(req.spec, req.tp, req.kv_dtype, req.fp8_scales, layers=layers)
    terms = (weights_term(req, layers, first, last, model_bytes), activation_term(req, last), *shared)
    kv_bytes = budget - sum(t.bytes for t in terms)
    # the blocks PagedKVCache holds: a hybrid model's block spans its group_size slots, not every layer
    return StageMemory(index, layers, layout, terms, kv_bytes,
                       max(0, kv_bytes) // layout.pool_bytes_per_block(req.block_size))


__all__ = ["Term", "StageMemory", "stage_layers", "plan_stage", "weights_term", "activation_term", "comm_term",
           "overhead_term", "before_snapshot_term", "CUDA_GRAPH_MAX_BATCH"]
