"""What adding GPUs buys: a roofline decode / prefill model plus the all-reduce model, per TP degree.

Decode step on one rank (batch ``b``, context ``L``):
    bytes = weights read (dense weights + the experts the batch touches) + KV read (b x L x bytes/token/GPU)
    flops = 2 x active params / tp x b + 4 x b x L x heads/tp x head_dim x layers (QK^T and PV)
    step  = max(bytes / HBM bandwidth, flops / dense bf16 rate) + all-reduces of b tokens
Prefill of one prompt of ``L`` tokens, in chunks of ``max_batched_tokens``: the same terms with
``L`` tokens and causal attention (half of L^2).

These are peak-rate (roofline) figures: real kernels reach a fraction of them, equally at every TP
degree, so the ratios (speedup, efficiency, communication share) are what to read.
"""
from __future__ import annotations

import math

from ..errors import PlanError
from .checks import check_names, check_positive_int, check_tp_degrees
from .comm import allreduce_seconds, allreduces_per_forward
from .dtypes import dtype_bytes
from .hardware import get_gpu, get_interconnect
from .memory import plan_memory
from .model import load_model_spec
from .parallel import check_pp
from .units import gib


def _moe_touched_fraction(spec, tokens: int) -> float:
    """Expected fraction of experts a batch of ``tokens`` tokens routes to (uniform routing)."""
    if not spec.is_moe:
        return 1.0
    return 1.0 - (1.0 - spec.num_experts_per_tok / spec.num_experts) ** tokens


def _attention_flops(spec, tp: int, tokens: int, context: float) -> float:
    heads = spec.num_attention_heads / tp
    qk = spec.head_dim if not spec.is_mla else spec.kv_lora_rank + spec.qk_rope_head_dim
    v = spec.v_head_dim if not spec.is_mla else spec.kv_lora_rank
    return 2.0 * tokens * context * heads * (qk + v) * spec.num_layers


def step_model(spec, plan, gpu, link, batch: int, context: int) -> dict:
    """Seconds of one decode step (``batch`` sequences at ``context`` tokens) on one rank."""
    tp, pp = plan.request.tp, plan.request.pp
    elem = dtype_bytes(plan.request.serving_dtype)
    weights = plan.term("weights")
    experts = weights.parts.get("experts", 0)  # the shard's expert weights, of which a batch reads some
    read = (weights.bytes - experts) + experts * _moe_touched_fraction(spec, batch)
    kv_read = batch * context * plan.kv_cache.bytes_per_token_per_gpu
    params = spec.parameter_counts()["active"]
    flops = 2.0 * params / (tp * pp) * batch + _attention_flops(spec, tp * pp, batch, context)
    t_mem = (read + kv_read) / (gpu.hbm_gbps * 1e9)
    t_compute = flops / (gpu.bf16_tflops * 1e12)
    comm = allreduces_per_forward(spec, tp) * allreduce_seconds(batch * spec.hidden_size * elem, tp, link)
    # pipeline: every stage runs in turn for one token; the step is pp stage-times
    step = (max(t_mem, t_compute) + comm / pp) * pp
    return {"memory_s": t_mem, "compute_s": t_compute, "comm_s": comm, "step_s": step,
            "bound": "memory" if t_mem >= t_compute else "compute"}


def prefill_seconds(spec, plan, gpu, link, prompt: int, chunk: int) -> dict:
    tp = plan.request.tp
    elem = dtype_bytes(plan.request.serving_dtype)
    params = spec.parameter_counts()["active"]
    chunks = math.ceil(prompt / chunk)
    flops = 2.0 * params / (tp * plan.request.pp) * prompt + _attention_flops(spec, tp * plan.request.pp, prompt,
                                                                                 prompt / 2)
    weights = plan.term("weights").bytes
    t = max(flops / (gpu.bf16_tflops * 1e12), chunks * weights / (gpu.hbm_gbps * 1e9))
    per_chunk = min(prompt, chunk)
    comm = chunks * allreduces_per_forward(spec, tp) * allreduce_seconds(per_chunk * spec.hidden_size * elem, tp, link)
    return {"compute_s": t, "comm_s": comm, "total_s": t + comm}


def scale(model, gpu="h100-sxm", tps=(1, 2, 4, 8), *, seq_len: int = 4096, batch: int | None = None,
          interconnect: str | None = None, pp: int = 1, **plan_kwargs) -> dict:
    """Per TP degree: memory, KV capacity, effective batch at ``seq_len``, decode rate, latencies,
    speedup and efficiency (speedup / GPUs relative to the smallest degree that fits).

    ``batch``: the batch to run (default: the largest that fits at ``seq_len``, capped by max_seqs).
    ``tps`` are taken in ascending order, each once. A degree the model cannot use (``tp`` not dividing
    its heads) or that does not fit becomes a row with its reason; a bad value (``tp=0``, ``seq_len=0``,
    ``block_size=12``, ...) raises ``InvalidArgumentError``.
    """
    tps = check_tp_degrees(tps)
    seq_len = check_positive_int("seq_len", seq_len, allow_none=False, fix="give a sequence length in tokens")
    batch = check_positive_int("batch", batch, fix="leave it unset for the largest batch that fits")
    spec = load_model_spec(model)
    gpu_preset = get_gpu(gpu)
    pp = check_pp(spec, pp)  # a bad pp is an error, not a "does not fit" row
    link = get_interconnect(interconnect or gpu_preset.interconnect)
    rows = []
    for tp in tps:
        row = {"tp": tp, "pp": pp, "gpus": tp * pp}
        try:
            plan = plan_memory(spec, tp, pp, gpu_preset, interconnect=link, **plan_kwargs)
        except PlanError as exc:  # this degree does not suit the model or does not fit; bad values propagate
            row.update({"fits": False, "reason": str(exc)})
            rows.append(row)
            continue
        capacity_batch = plan.kv_cache.requests_fit(seq_len)  # windowed groups hold only their window
        b = min(capacity_batch, plan.request.max_seqs) if batch is None else min(batch, capacity_batch)
        row.update({"fits": b > 0, "weights_gib": gib(plan.term("weights").bytes),
                    "kv_cache_gib": gib(plan.kv_cache.kv_bytes_per_gpu), "kv_tokens": plan.kv_cache.tokens,
                    "max_batch_at_seq_len": capacity_batch, "batch": b, "batch_requested": batch})
        if b <= 0:
            row["reason"] = f"no sequence of {seq_len:,} tokens fits in the KV pool"
            rows.append(row)
            continue
        step = step_model(spec, plan, gpu_preset, link, b, seq_len)
        one = step_model(spec, plan, gpu_preset, link, 1, seq_len)
        pre = prefill_seconds(spec, plan, gpu_preset, link, seq_len, plan.request.max_batched_tokens)
        row.update({
            "decode_step_ms": step["step_s"] * 1e3, "decode_tokens_per_s": b / step["step_s"],
            "token_latency_ms": one["step_s"] * 1e3, "comm_share": step["comm_s"] / step["step_s"],
            "bound": step["bound"], "prefill_ms": pre["total_s"] * 1e3,
        })
        rows.append(row)
    ok = [r for r in rows if r.get("fits")]
    if ok:
        base = ok[0]
        for r in ok:
            r["speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            r["efficiency"] = r["speedup"] / (r["gpus"] / base["gpus"])
            r["latency_speedup"] = base["token_latency_ms"] / r["token_latency_ms"]
            r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
    return {"model": spec.name, "gpu": gpu_preset.name, "interconnect": link.name, "seq_len": seq_len,
            "rows": rows, "summary": _summary(rows), "by_seq_len": _by_seq_len(spec, gpu_preset, link, ok, pp, plan_kwargs)}


def _stop_point(ok, key: str, higher_is_better: bool):
    """First step where the metric gains less than half of the GPUs added, as (prev, cur, gain, added)."""
    for prev, cur in zip(ok, ok[1:]):
        gain = cur[key] / prev[key] if higher_is_better else prev[key] / cur[key]
        added = cur["gpus"] / prev["gpus"]
        if (gain - 1) < 0.5 * (added - 1):
            return prev, cur, gain, added
    return None


def _summary(rows) -> list[str]:
    ok = [r for r in rows if r.get("fits")]
    out = []
    for r in rows:
        if not r.get("fits"):
            out.append(f"tp={r['tp']}: {r.get('reason', 'does not fit')}")
        elif r["batch_requested"] is not None and r["batch"] < r["batch_requested"]:
            out.append(f"tp={r['tp']}: batch {r['batch_requested']:,} capped at {r['batch']:,}, the sequences of this "
                       "length the KV pool holds")
    if len(ok) < 2:
        return out
    stop = _stop_point(ok, "decode_tokens_per_s", True)
    if stop:
        prev, cur, gain, added = stop
        out.append(f"throughput stops paying at tp={cur['tp']}: {added:g}x the GPUs of tp={prev['tp']} give "
                   f"{gain:.2f}x the decode tokens/s")
    else:
        out.append(f"throughput keeps paying up to tp={ok[-1]['tp']}: more GPUs also hold more KV, so the batch grows "
                   f"({ok[0]['batch']} -> {ok[-1]['batch']} sequences), efficiency {ok[-1]['efficiency']:.2f}")
    stop = _stop_point(ok, "token_latency_ms", False)
    steps = ", ".join(f"tp={b['tp']} {a['token_latency_ms'] / b['token_latency_ms']:.2f}x faster than tp={a['tp']}"
                      for a, b in zip(ok, ok[1:]))
    if stop:
        prev, cur, gain, added = stop
        out.append(f"single-token latency stops paying at tp={cur['tp']} ({steps}): communication and replicated "
                   "work eat the split")
    else:
        out.append(f"single-token latency keeps improving ({steps})")
    best = max(ok, key=lambda r: r["decode_tokens_per_s"] / r["gpus"])
    out.append(f"best tokens/s per GPU: tp={best['tp']} ({best['decode_tokens_per_s'] / best['gpus']:,.0f} tokens/s/GPU)")
    return out


def _by_seq_len(spec, gpu, link, ok, pp, plan_kwargs) -> list[dict]:
    """Throughput speedup of the largest fitting TP over the smallest, per sequence length."""
    if len(ok) < 2:
        return []
    lo, hi = ok[0]["tp"], ok[-1]["tp"]
    out = []
    try:
        p_lo = plan_memory(spec, lo, pp, gpu, interconnect=link, **plan_kwargs)
        p_hi = plan_memory(spec, hi, pp, gpu, interconnect=link, **plan_kwargs)
    except PlanError:
        return []
    for L in (512, 2048, 8192, 32768, 131072):
        if L > p_lo.kv_cache.max_model_len:
            break
        res = {}
        for name, p in (("lo", p_lo), ("hi", p_hi)):
            b = min(p.kv_cache.requests_fit(L), p.request.max_seqs)
            res[name] = b / step_model(spec, p, gpu, link, b, L)["step_s"] if b > 0 else 0.0
        if res["lo"] == 0 and res["hi"] == 0:
            continue
        out.append({"seq_len": L, f"tp{lo}_tokens_per_s": res["lo"], f"tp{hi}_tokens_per_s": res["hi"],
                    "speedup": res["hi"] / res["lo"] if res["lo"] else None})
    return out


def compare_interconnects(model, gpu="h100-sxm", tp: int = 4, links=("nvlink4", "pcie5"), *, seq_len: int = 4096,
                          batch: int = 32, **plan_kwargs) -> dict:
    """The same deployment over different links: communication share of a decode step, decode rate, ratio."""
    tp = check_positive_int("tp", tp, allow_none=False)
    seq_len = check_positive_int("seq_len", seq_len, allow_none=False, fix="give a sequence length in tokens")
    batch = check_positive_int("batch", batch, allow_none=False, fix="give the decode batch")
    links = check_names("links", links, "('nvlink4', 'pcie5')")
    spec = load_model_spec(model)
    gpu_preset = get_gpu(gpu)
    rows = []
    for key in links:
        link = get_interconnect(key)
        plan = plan_memory(spec, tp, 1, gpu_preset, interconnect=key, **plan_kwargs)
        b = min(batch, plan.kv_cache.requests_fit(seq_len))
        if b <= 0:
            raise PlanError(f"no sequence of {seq_len:,} tokens fits the KV pool at tp={tp}; lower --seq-len")
        step = step_model(spec, plan, gpu_preset, link, b, seq_len)
        one = step_model(spec, plan, gpu_preset, link, 1, seq_len)
        rows.append({"interconnect": link.name, "gbps": link.gbps, "batch": b,
                     "comm_ms": step["comm_s"] * 1e3, "step_ms": step["step_s"] * 1e3,
                     "comm_share": step["comm_s"] / step["step_s"], "decode_tokens_per_s": b / step["step_s"],
                     "token_latency_ms": one["step_s"] * 1e3})
    for r in rows:
        r["ratio_vs_first"] = r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return {"model": spec.name, "gpu": gpu_preset.name, "tp": tp, "seq_len": seq_len, "rows": rows}
