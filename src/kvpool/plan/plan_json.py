"""The JSON edge of a `MemoryPlan`: ``kvpool plan --json``'s sections, figures in GiB (4 decimals), prose.

Only here (and in the command's renderer) do bytes become GiB and figures become sentences; the keys and
values are the JSON contract (pinned by ``tests/test_plan_golden.py``).
"""
from __future__ import annotations

from .activation import activation_assumptions, profile_shape
from .units import MIB, gib
from .vllm_comm import nontorch
from .weights import weights_assumptions



def kv_cache_dict(kv) -> dict:
    return {
        "kv_dtype": kv.kv_dtype,
        "bytes_per_token_per_gpu": kv.bytes_per_token_per_gpu,
        "bytes_per_token_all_gpus": kv.bytes_per_token_all_gpus,
        "block_size": kv.block_size,
        "bytes_per_block_per_gpu": kv.bytes_per_block_per_gpu,
        "num_blocks": kv.num_blocks,
        "tokens": kv.tokens,
        "tokens_unpaged": kv.tokens_unpaged,
        "kv_bytes_per_gpu": kv.kv_bytes_per_gpu,
        "max_model_len": kv.max_model_len,
        "max_concurrency": round(kv.max_concurrency, 2),
        "max_concurrency_window_aware": round(kv.max_concurrency_window_aware, 2),
        "per_seq_bytes_per_gpu": kv.per_seq_bytes_per_gpu,
        "per_seq_bytes_per_gpu_window_aware": kv.per_seq_bytes_per_gpu_window_aware,
        "sliding_window_layers": kv.sliding_window_layers,
        "kv_heads_per_gpu": kv.kv_heads_per_gpu,
        "unused_bytes_per_gpu": kv.unused_bytes_per_gpu,
        "vllm": kv.vllm.to_dict() if kv.vllm is not None else None,
        "window_freeing": kv.window.to_dict() if kv.window is not None else None,
        **({"host_tier": kv.host_tier.to_dict(kv.tokens)} if kv.host_tier is not None else {}),
    }


def parallel_dict(plan) -> dict:
    req = plan.request
    return {"tp": req.tp, "pp": req.pp, "gpus": req.tp * req.pp, "tightest_stage": plan.tightest,
            "interconnect": req.link.name}


def per_gpu_dict(plan) -> dict:
    req, tight = plan.request, plan.tight
    return {
        "total_gib": gib(req.total_bytes),
        "budget_gib": gib(plan.budget_bytes),
        **{f"{t.name}_gib": gib(t.bytes) for t in tight.terms},
        "kv_cache_gib": gib(tight.kv_bytes),
        "headroom_gib": gib(plan.headroom_bytes),
        "budget_mode": "reservations" if req.mem_fraction is None else "mem_fraction",
        "mem_fraction": req.mem_fraction,
        "before_snapshot_gib": gib(_before(plan)),
    }


def _before(plan) -> int:
    """Bytes before vLLM's start-up snapshot (0 for a plan assembled without them)."""
    return plan.before_snapshot.bytes if plan.before_snapshot is not None else 0


def stage_dict(stage) -> dict:
    return {"stage": stage.index, "layers": [stage.layers.start, stage.layers.stop],
            **{f"{t.name}_gib": gib(t.bytes) for t in stage.terms},
            "kv_cache_gib": gib(stage.kv_bytes), "num_blocks": stage.num_blocks,
            "bytes_per_token_per_gpu": stage.layout.bytes_per_token}


def details_dict(plan) -> dict:
    req, tight = plan.request, plan.tight
    reserved, comm = req.reserved, tight.term("comm").parts
    given = {"weights_gib": reserved.weights, "activation_gib": reserved.activation, "comm_gib": reserved.comm,
             "overhead_gib": reserved.overhead, "headroom_gib": reserved.headroom}
    return {
        "dtype": req.serving_dtype,
        "weights_total_gib": gib(plan.model_weight_bytes),
        "weights_by_part_gib": {k: gib(v) for k, v in tight.term("weights").parts.items() if k != "total"},
        "activation_bytes": dict(tight.term("activation").parts),
        "comm_bytes": {**comm, "nccl_tp": dict(comm["nccl_tp"])},
        "overhead_bytes": dict(tight.term("overhead").parts),
        "before_snapshot_bytes": dict(plan.before_snapshot.parts) if plan.before_snapshot is not None else {},
        "nccl_communicators": _communicators(req),
        "layout": tight.layout.to_dict(),
        "computed_gib": {t.name: gib(t.computed) for t in tight.terms},
        "overridden": [k for k, v in given.items() if v is not None],
        "max_batched_tokens": req.max_batched_tokens,
        "max_seqs": req.max_seqs,
        "parameters": req.spec.num_parameters,
        "model_source": req.spec.source,
    }


def _communicators(req) -> list[dict]:
    """The NCCL communicators vLLM 0.19 creates for this deployment, each with its bytes on one GPU."""
    nt = nontorch(req)
    return [{"name": c.name, "ranks": c.ranks, "before_snapshot": c.before_snapshot, "setup": c.setup,
             "ring": c.ring, "nvls": c.nvls} for c in nt.communicators] + (
        [{"allreduce_path": nt.allreduce_path}] if req.tp > 1 else [])


def assumptions(plan) -> list[str]:
    req = plan.request
    nccl_tp = plan.term("comm").parts["nccl_tp"]
    out = [
        *activation_assumptions(req.spec, profile_shape(req, plan.tight.index == req.pp - 1), not req.cuda_graphs),
        f"overhead: kernels loaded after vLLM's snapshot ~{plan.term('overhead').computed // MIB} MiB (vLLM's tp-1 "
        "reading on H100, an estimate elsewhere); CUDA context "
        f"{req.cuda_context_bytes // MIB} MiB after a forward, its rest before the snapshot (headroom)",
        *weights_assumptions(req.spec),
    ]
    if req.tp > 1:
        out.append(f"comm: vLLM 0.19 + NCCL 2.27 defaults: torch's NCCL comm ({nccl_tp['channels']} ring channels, "
                   "all three protocols' buffers, 2 MiB cuMem granules) created after the snapshot; "
                   "FlashInfer AR-fusion workspace at the 512 MiB multicast granularity (H100 reading); "
                   "NCCL's algorithm for the profile all-reduce (NVLS vs ring) is NCCL's tuning choice, not read")
    return out


def warnings(plan) -> list[str]:
    spec, kv, req = plan.request.spec, plan.kv_cache, plan.request
    out = []
    before = _before(plan)
    if req.mem_fraction is not None and before > plan.headroom_bytes:
        out.append(f"{gib(before)} GiB exists before vLLM's start-up snapshot (CUDA context, NCCL set-up) but the "
                   f"headroom is {gib(plan.headroom_bytes)} GiB: vLLM refuses to start when free memory is below "
                   "gpu_memory_utilization x total; lower --mem-fraction")
    if kv.requests_fit(kv.max_model_len) < 1:
        from .workload import fit  # workload builds on the typed plan, which builds on this module

        longest = fit(kv.num_blocks, kv.block_size, 1, kv.max_model_len, kv.group_windows).max_seq_len
        out.append(f"the pool holds one request of at most {longest:,} tokens, fewer than max_model_len="
                   f"{kv.max_model_len:,}: one full-length request does not fit; lower --max-model-len to "
                   f"{longest:,} or add memory")
    if kv.window is not None:
        w = kv.window
        out.append(f"{spec.sliding_layers} of {spec.num_layers} layers use a sliding window: with KV-cache groups "
                   f"(BlockTables(group_windows=...)) their blocks leave as the window moves, and "
                   f"{round(w.max_concurrency, 2)}x requests of {kv.max_model_len:,} tokens fit, "
                   f"{round(w.gain, 2)}x the {round(w.max_concurrency_full, 2)}x of one table of every layer")
    return out


def plan_dict(plan) -> dict:
    out = {"model": plan.model, "gpu": plan.gpu, "parallel": parallel_dict(plan), "per_gpu": per_gpu_dict(plan),
           "kv_cache": kv_cache_dict(plan.kv_cache)}
    if plan.workload is not None:
        out["workload"] = plan.workload.to_dict()
    out.update({"stages": [stage_dict(s) for s in plan.per_stage], "details": details_dict(plan),
                "assumptions": assumptions(plan), "warnings": warnings(plan)})
    return out


__all__ = ["plan_dict", "kv_cache_dict", "parallel_dict", "per_gpu_dict", "stage_dict", "details_dict",
           "assumptions", "warnings"]
