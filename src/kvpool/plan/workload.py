"""Check a target workload (batch B at length L) against a plan, with a recommendation when it does not fit."""
from __future__ import annotations

import math

from ..errors import KVPoolError
from .hardware import GIB
from .memory import window_aware_bytes_per_seq


def _gib(nbytes: float) -> float:
    return round(nbytes / GIB, 4)


def check_workload(plan, spec, batch: int, seq_len: int, recommend: bool = True, replan=None) -> dict:
    """Whether ``batch`` sequences of ``seq_len`` tokens fit the plan's pool, and what does when not.

    A sequence holds whole blocks: ``ceil(seq_len / block_size)`` of them. ``*_unpaged`` figures divide
    bytes by bytes-per-token directly (the seed's arithmetic), ignoring block granularity.
    """
    kv = plan.kv_cache
    bs, num_blocks = kv["block_size"], kv["num_blocks"]
    blocks_per_seq = math.ceil(seq_len / bs)
    needed = batch * blocks_per_seq
    kv_bytes = kv["kv_bytes_per_gpu"]
    stage_layers = range(*plan.stages[plan.parallel["tightest_stage"]]["layers"])
    per_layer_token = kv["bytes_per_token_per_gpu"] // len(stage_layers)
    window_seq = window_aware_bytes_per_seq(spec, per_layer_token, stage_layers, seq_len)
    out = {
        "batch": batch,
        "seq_len": seq_len,
        "blocks_per_seq": blocks_per_seq,
        "blocks_needed": needed,
        "fits": needed <= num_blocks,
        "kv_needed_gib_per_gpu": _gib(needed * kv["bytes_per_block_per_gpu"]),
        "kv_available_gib_per_gpu": plan.per_gpu["kv_cache_gib"],
        "pool_use": round(needed / num_blocks, 4) if num_blocks else None,
        "max_batch_at_seq_len": num_blocks // blocks_per_seq,
        "max_seq_len_at_batch": (num_blocks // batch) * bs,
        "tokens_per_request_unpaged": kv["tokens_unpaged"] // batch,
        "max_batch_at_seq_len_unpaged": kv["tokens_unpaged"] // seq_len,
        "fits_window_aware": batch * window_seq <= kv_bytes,
        "recommendations": [],
    }
    if seq_len > kv["max_model_len"]:
        out["recommendations"].append(
            f"seq_len {seq_len:,} is above max_model_len {kv['max_model_len']:,}: raise --max-model-len (the pool and "
            "the activation plan assume the smaller one)"
        )
    if out["fits"]:
        spare = num_blocks - needed
        out["recommendations"].append(
            f"fits: uses {needed:,} of {num_blocks:,} blocks ({100 * needed / num_blocks:.1f}%); room for "
            f"{spare // blocks_per_seq:,} more sequences of {seq_len:,} tokens"
        )
        return out
    recs = out["recommendations"]
    recs.append(
        f"does not fit: needs {needed:,} blocks ({out['kv_needed_gib_per_gpu']:.2f} GiB per GPU), the pool has "
        f"{num_blocks:,} ({out['kv_available_gib_per_gpu']:.2f} GiB)"
    )
    if recommend and replan is not None:
        tp, best = plan.parallel["tp"], None
        for new_tp in (2, 4, 8, 16, 32, 64):
            if new_tp <= tp:
                continue
            try:
                p = replan(tp=new_tp)
            except KVPoolError:
                continue
            cap = p.num_blocks // blocks_per_seq
            best = (new_tp, cap, p.num_blocks)
            if cap >= batch:
                recs.append(f"more TP: tp={new_tp} ({new_tp * plan.parallel['pp']} GPUs) holds {cap:,} sequences of "
                            f"{seq_len:,} tokens ({p.num_blocks:,} blocks)")
                break
        else:
            if best is not None:
                recs.append(f"more TP alone is not enough: even tp={best[0]} holds only {best[1]:,} sequences of "
                            f"{seq_len:,} tokens")
        if kv["kv_dtype"] != "fp8":
            try:
                p = replan(kv_dtype="fp8")
                cap = p.num_blocks // blocks_per_seq
                verdict = "fits" if cap >= batch else "still short"
                recs.append(f"fp8 KV (--kv-dtype fp8): {p.kv_cache['bytes_per_token_per_gpu']:,} B/token/GPU, "
                            f"{cap:,} sequences of {seq_len:,} tokens ({verdict})")
            except KVPoolError:
                pass
    recs.append(f"smaller batch: at {seq_len:,} tokens at most {out['max_batch_at_seq_len']:,} sequences fit")
    recs.append(f"shorter length: at batch {batch:,} each sequence can hold {out['max_seq_len_at_batch']:,} tokens "
                f"(--max-model-len {out['max_seq_len_at_batch']:,})")
    return out
