"""The issue-15 tables of the GPU report: paged prefill, the mixed batch, the eager decode table, each bar judged.

Called by ``gpu_report.build_table`` with every benchmark row (``bench_prefill.py``, ``bench_mixed.py``,
``bench_decode.py``); returns Markdown lines (none when no issue-15 row exists). A bar reads "met", "NOT met" or
"not measured" (a contender missing: its note is printed).
"""
from __future__ import annotations

EAGER_DECODE_MAX_BATCH, EAGER_DECODE_MAX_CTX = 8, 4096  # "batch 1-8, contexts <= 4K": >= 1.0x vLLM's Triton decode
LARGE_DECODE_PCT = 95.0  # "the large shapes (batch >= 64, context >= 4096) still >= 95% of the copy-ceiling roofline"


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def verdict(value, bar) -> str:
    """``"1.23 (bar 1.1): met"``; a ratio or percentage against its lower bar."""
    if value is None:
        return "not measured"
    return f"{value:.2f} (bar {bar:g}): {'met' if value >= bar else 'NOT met'}"


def _notes(rows, keys=("ours_note", "vllm_note", "sdpa_note", "two_calls_note", "peak_note")) -> list[str]:
    return [f"- {n}" for n in sorted({r[k] for r in rows for k in keys if r.get(k)})]


def prefill_table(rows) -> list[str]:
    pre = [r for r in rows if r.get("kind") == "paged_prefill"]
    if not pre:
        return []
    out = ["", (f"paged_prefill (issue 15): {pre[0].get('dtype')}, block {pre[0].get('block_size')}; SDPA = flash "
               "backend on a contiguous cache, same tokens; rel err = ||out - ref|| / ||ref|| vs kvpool's float32 "
               "reference"),
           "", ("| case | TFLOP | ours ms | ours TFLOP/s | vLLM ms | vs vLLM (>= 1.1) | SDPA ms | vs SDPA (>= 0.85) "
               "| % dense bf16 peak (>= 50) | rel err ours / vLLM / SDPA |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(pre, key=lambda r: r.get("label", "")):
        peak = r.get("pct_peak")
        peak_cell = "-" if "target_pct_peak" not in r else (
            f"{verdict(peak, r['target_pct_peak'])} ({_f(r.get('peak_tflops'), '{:.0f}')} TFLOP/s "
            f"{r.get('peak_preset') or '?'}; matmul measured {_f(r.get('matmul_tflops'), '{:.0f}')})")
        errs = " / ".join(_f(r.get(f"rel_err_{k}"), "{:.1e}") for k in ("ours", "vllm", "sdpa"))
        out.append(f"| {r['name']} | {_f(r.get('tflop'), '{:.2f}')} | {_f(r.get('ours_ms'), '{:.4f}')} | "
                   f"{_f(r.get('ours_tflops'), '{:.0f}')} | {_f(r.get('vllm_ms'), '{:.4f}')} | "
                   f"{_ratio(r, 'vllm')} | {_f(r.get('sdpa_ms'), '{:.4f}')} | {_ratio(r, 'sdpa')} | "
                   f"{peak_cell} | {errs} |")
    return out + _notes(pre)


def _ratio(r, peer) -> str:
    bar = r.get(f"target_vs_{peer}")
    ratio = r.get(f"speedup_vs_{peer}")
    if bar is None:
        return _f(ratio, "{:.2f}x")
    return verdict(ratio, bar)


def mixed_table(rows) -> list[str]:
    mixed = [r for r in rows if r.get("kind") == "paged_attention_mixed"]
    if not mixed:
        return []
    out = ["", ("paged_attention, mixed batch (issue 15): one call; two calls = paged_decode + paged_prefill; "
               "GB/s = K+V bytes / time"), "",
           ("| case | KV GB | ours ms | ours GB/s | vLLM ms | vs vLLM (>= 1.1) | two calls ms | vs two calls | "
           "rel err ours / vLLM / two calls |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in mixed:
        errs = " / ".join(_f(r.get(f"rel_err_{k}"), "{:.1e}") for k in ("ours", "vllm", "two_calls"))
        out.append(f"| {r['name']} | {_f(r.get('kv_gb'), '{:.2f}')} | {_f(r.get('ours_ms'), '{:.4f}')} | "
                   f"{_f(r.get('ours_gbps'), '{:.0f}')} | {_f(r.get('vllm_ms'), '{:.4f}')} | {_ratio(r, 'vllm')} | "
                   f"{_f(r.get('two_calls_ms'), '{:.4f}')} | {_f(r.get('speedup_vs_two_calls'), '{:.2f}x')} | {errs} |")
    return out + _notes(mixed)


def eager_decode_table(rows) -> list[str]:
    """The eager paged_decode rows of ``bench_decode.py`` against issue 15's bars (no second sweep)."""
    dec = [r for r in rows if r.get("kind") == "paged_decode"]
    small = sorted((r for r in dec if r["batch"] <= EAGER_DECODE_MAX_BATCH and r["context"] <= EAGER_DECODE_MAX_CTX),
                   key=lambda r: (r["q_heads"], r["batch"], r["context"]))
    large = [r for r in dec if r["batch"] >= 64 and r["context"] >= 4096]
    if not small and not large:
        return []
    out = ["", "eager paged_decode (issue 15 item 3 bars; rows of bench_decode.py, single calls, host path included)",
           "", "| batch | ctx | q/kv heads | ours ms | vLLM ms | vs vLLM (>= 1.0) |", "|---|---|---|---|---|---|"]
    for r in small:
        out.append(f"| {r['batch']} | {r['context']} | {r['q_heads']}/{r['kv_heads']} | {_f(r['ms'], '{:.4f}')} | "
                   f"{_f(r.get('vllm_ms'), '{:.4f}')} | {verdict(r.get('speedup_vs_vllm'), 1.0)} |")
    if large:
        worst = min(large, key=lambda r: r["pct_roofline"])
        out.append(f"- large shapes (batch >= 64, ctx >= 4096, {len(large)} rows): worst % of the copy-ceiling "
                   f"roofline {verdict(worst['pct_roofline'], LARGE_DECODE_PCT)} ({worst['name']})")
    return out + _notes(small, ("vllm_note",))


def issue15_tables(rows) -> list[str]:
    """Every issue-15 table that has rows."""
    return prefill_table(rows) + mixed_table(rows) + eager_decode_table(rows)
