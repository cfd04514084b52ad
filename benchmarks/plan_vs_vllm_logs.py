"""The planner's accuracy on a set of vLLM start-up logs: each log planned with its own settings, errors summarised.

    python benchmarks/plan_vs_vllm_logs.py LOG [LOG ...] [--gpu h100-sxm] [--json]

Each log is read as ``kvpool plan --vllm-log`` reads it (`kvpool.plan.vllm_log`); the GPU is not in vLLM's log,
so give ``--gpu`` (one card for the whole set). Prints one row per log (weights, KV GiB and tokens: logged,
planned, error) and the summary issue #12 sets its bars on: median and worst KV error, weights errors, and
whether every point is within 5% or 1 GiB. A log that cannot be planned (a refused config) is a row with its
error message, and counts as a miss.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from kvpool.errors import KVPoolError
from kvpool.plan import plan_memory
from kvpool.plan.units import GIB
from kvpool.plan.vllm_log import read_vllm_log

_SETTINGS = ("max_model_len", "mem_fraction", "max_seqs", "max_batched_tokens", "block_size", "kv_dtype", "dtype")


def plan_log(path: str, gpu: str, fp8_scales: str = "per_tensor") -> dict:
    """One log's row: its figures, the plan's, the errors (or the planner's refusal)."""
    log = read_vllm_log(path)
    row = {"log": path, "model": log.model, "tp": log.settings.get("tp", 1)}
    try:
        kwargs = {k: log.settings[k] for k in _SETTINGS if k in log.settings}
        plan = plan_memory(log.model, log.settings.get("tp", 1), log.settings.get("pp", 1), gpu,
                           cuda_graphs=not log.settings.get("enforce_eager", False), fp8_scales=fp8_scales,
                           **kwargs)
    except KVPoolError as exc:
        return {**row, "refused": str(exc)}
    planned_kv, planned_w = plan.tight.kv_bytes, plan.tight.term("weights").bytes
    if log.kv is not None:
        row.update(kv_logged_gib=round(log.kv / GIB, 2), kv_planned_gib=round(planned_kv / GIB, 2),
                   kv_error=(planned_kv - log.kv) / log.kv, kv_error_gib=(planned_kv - log.kv) / GIB)
    if log.weights is not None:
        row.update(weights_logged_gib=round(log.weights / GIB, 2), weights_planned_gib=round(planned_w / GIB, 2),
                   weights_error=(planned_w - log.weights) / log.weights)
    if log.kv_tokens is not None and plan.kv_cache.vllm is not None:
        row.update(tokens_logged=log.kv_tokens, tokens_planned=plan.kv_cache.vllm.tokens)
    return row


def summary(rows: list[dict]) -> dict:
    """Median and worst |KV error|, worst |weights error|, refusals, points outside 5% and 1 GiB."""
    kv = [abs(r["kv_error"]) for r in rows if "kv_error" in r]
    weights = [abs(r["weights_error"]) for r in rows if "weights_error" in r]
    outside = [r["log"] for r in rows if "kv_error" in r and abs(r["kv_error"]) > 0.05 and abs(r["kv_error_gib"]) > 1]
    return {"logs": len(rows), "refused": sum("refused" in r for r in rows),
            "kv_median_abs_error": statistics.median(kv) if kv else None, "kv_worst_abs_error": max(kv, default=None),
            "weights_worst_abs_error": max(weights, default=None), "outside_5pct_and_1gib": outside}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", metavar="LOG")
    ap.add_argument("--gpu", default="h100-sxm")
    ap.add_argument("--fp8-scales", default="per_tensor", help="fp8 KV scale layout (per_tensor: vLLM's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [plan_log(p, args.gpu, args.fp8_scales) for p in args.logs]
    out = {"rows": rows, "summary": summary(rows)}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for r in rows:
        if "refused" in r:
            print(f"{r['log']}: REFUSED {r['refused']}")
            continue
        print(f"{r['log']}: {r['model']} tp={r['tp']}  KV {r.get('kv_logged_gib')} vs {r.get('kv_planned_gib')} GiB "
              f"({r.get('kv_error', 0):+.1%}); weights {r.get('weights_logged_gib')} vs {r.get('weights_planned_gib')} "
              f"({r.get('weights_error', 0):+.1%}); tokens {r.get('tokens_logged')} vs {r.get('tokens_planned')}")
    s = out["summary"]
    print(f"summary: {s['logs']} logs, {s['refused']} refused; KV median |error| "
          f"{s['kv_median_abs_error'] if s['kv_median_abs_error'] is None else format(s['kv_median_abs_error'], '.1%')}, "
          f"worst {s['kv_worst_abs_error'] if s['kv_worst_abs_error'] is None else format(s['kv_worst_abs_error'], '.1%')}; "
          f"outside 5% and 1 GiB: {len(s['outside_5pct_and_1gib'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
