"""Everything ``kvpool comm`` prints: NCCL memory for the deployment and the all-reduce cost per link."""
from __future__ import annotations


from ..errors import PlanError
from .checks import check_names, check_positive_int
from .comm import allreduce_seconds, allreduces_per_forward
from .dtypes import dtype_bytes
from .hardware import INTERCONNECTS, get_gpu, get_interconnect
from .memory import plan_memory
from .model import load_model_spec
from .scaling import step_model
from .units import gib


def comm_report(model, gpu="h100-sxm", tp: int = 4, *, batch: int = 32, seq_len: int = 4096, links=None,
                interconnect=None, **plan_kwargs) -> dict:
    """NCCL buffer memory, all-reduces per forward pass, and per interconnect: time per all-reduce,
    communication per decode step, its share of the step, decode tokens/s and the ratio to the first link."""
    tp = check_positive_int("tp", tp, allow_none=False)
    batch = check_positive_int("batch", batch, allow_none=False, fix="give the decode batch")
    seq_len = check_positive_int("seq_len", seq_len, allow_none=False, fix="give a sequence length in tokens")
    if links is not None:
        links = check_names("links", links, "('nvlink4', 'pcie5')")
    spec = load_model_spec(model)
    gpu_preset = get_gpu(gpu)
    if tp < 2:
        raise PlanError(f"tp={tp}: a single GPU does no tensor-parallel communication; use --tp 2 or more")
    own = interconnect or gpu_preset.interconnect
    if links is None:
        links = tuple(dict.fromkeys([own] + [k for k, v in INTERCONNECTS.items() if not v.cross_node]))
    plan = plan_memory(spec, tp, 1, gpu_preset, interconnect=own, **plan_kwargs)
    elem = dtype_bytes(plan.request.serving_dtype)
    chunk = plan.request.max_batched_tokens
    b = min(batch, plan.kv_cache.requests_fit(seq_len))
    if b <= 0:
        raise PlanError(f"no sequence of {seq_len:,} tokens fits the KV pool at tp={tp}; lower --seq-len")
    comm = plan.term("comm")
    comm_parts = comm.parts
    rows = []
    for key in links:
        link = get_interconnect(key)
        step = step_model(spec, plan, gpu_preset, link, b, seq_len)
        rows.append({
            "interconnect": key, "name": link.name, "gbps": link.gbps,
            "allreduce_decode_us": allreduce_seconds(b * spec.hidden_size * elem, tp, link) * 1e6,
            "allreduce_prefill_us": allreduce_seconds(chunk * spec.hidden_size * elem, tp, link) * 1e6,
            "comm_per_decode_step_ms": step["comm_s"] * 1e3,
            "decode_step_ms": step["step_s"] * 1e3,
            "comm_share": step["comm_s"] / step["step_s"],
            "decode_tokens_per_s": b / step["step_s"],
        })
    for r in rows:
        r["ratio_vs_first"] = r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return {
        "model": spec.name, "gpu": gpu_preset.name, "tp": tp, "batch": b, "batch_requested": batch, "seq_len": seq_len,
        "allreduces_per_forward": allreduces_per_forward(spec, tp),
        "bytes_per_allreduce_decode": b * spec.hidden_size * elem,
        "bytes_per_allreduce_prefill": chunk * spec.hidden_size * elem,
        "memory": {
            "nccl_channels": comm_parts["nccl_tp"]["channels"],
            "nccl_protocol_buffers_bytes": comm_parts["nccl_tp"]["protocol_buffers"],
            "nccl_nvls_bytes": comm_parts["nccl_tp"]["nvls"],
            "nccl_pp_bytes": comm_parts["nccl_pp"],
            "staging_bytes": comm_parts["staging"],
            "nccl_setup_bytes": comm_parts["nccl_tp"]["setup"],
            "flashinfer_workspace_bytes": comm_parts["flashinfer_workspace"],
            "before_snapshot_bytes": plan.before_snapshot.bytes,
            "comm_gib": gib(comm.bytes),
            "settings": (plan_kwargs.get("nccl").to_dict() if plan_kwargs.get("nccl") else None),
        },
        "rows": rows,
    }
