"""Collect the GPU check's results into one JSON file and a short Markdown table.

Inputs: pytest-benchmark JSON files (``--benchmark-json``; figures in each benchmark's
``extra_info``), the JSON-lines rows the benchmarks append as they go (kept when a stage timed
out before pytest wrote its JSON), the sanitizer summary and the test logs.

    python benchmarks/gpu_report.py --out-dir benchmarks/out --bench-json out/bench_*.json \
        --rows out/rows.jsonl --sanitizer out/sanitizer.json --tests-log out/tests_gpu.log
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from report_issue15 import issue15_tables


def load_rows(bench_jsons, rows_file) -> list[dict]:
    rows: dict[str, dict] = {}
    if rows_file and Path(rows_file).exists():
        for line in Path(rows_file).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row.get("test", str(len(rows)))] = row
    for path in bench_jsons or []:
        try:
            benches = json.loads(Path(path).read_text()).get("benchmarks", [])
        except (OSError, ValueError):  # missing, or cut short by a timeout: rows.jsonl has the figures
            continue
        for bench in benches:
            info = bench.get("extra_info") or {}
            if info:
                rows[info.get("test", bench["name"])] = info
    return list(rows.values())


def test_summary(log) -> str:
    if not log or not Path(log).exists():
        return "not run"
    lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error|skipped)", line):
            return line.strip("= ").strip()
    return "no pytest summary (timed out or crashed): see " + str(log)


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def build_table(rows, sanitizer, tests) -> str:
    out = []
    device = next((r.get("device") for r in rows if r.get("device")), "unknown GPU")
    out.append(f"## kvpool GPU check: {device}")
    for name, summary in tests.items():
        out.append(f"- tests `{name}`: {summary}")
    ceiling = [r for r in rows if r.get("kind") == "ceiling"]
    if ceiling:
        out.append(f"- copy ceiling (d2d copy_, read+write): {ceiling[0]['gbps']:.0f} GB/s")
    mem = [r for r in rows if r.get("kind") in ("gather_kv", "write_kv", "copy_blocks")]
    if mem:
        out += ["", "| kernel | ms | GB/s | % ceiling (target) | torch indexing ms | speedup |",
                "|---|---|---|---|---|---|"]
        for r in mem:
            target = f" (>= {r['target_pct']:.0f})" if r.get("target_pct") else ""
            out.append(f"| {r['name']} | {_f(r['ms'])} | {r['gbps']:.0f} | {r['pct_ceiling']:.1f}{target} | "
                       f"{_f(r.get('baseline_ms'))} | {_f(r.get('speedup'), '{:.2f}x')} |")
    dec = sorted((r for r in rows if r.get("kind") == "paged_decode"),
                 key=lambda r: (r["q_heads"], r["batch"], r["context"]))
    if dec:
        out += ["", "paged_decode, head_dim 128, bf16, block 16 (vLLM: num_kv_splits=8; roofline = KV bytes / ceiling)",
                "eager: single calls, L2 flushed, host launch path included; graph: GPU time per call in CUDA-graph replay",
                "", "| batch | ctx | q/kv heads | ours ms | % roofline | vLLM ms | vs vLLM | ours graph ms | vLLM graph ms "
                "| vs vLLM (graph) | SDPA ms | vs SDPA |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        notes = set()
        for r in dec:
            pct = f"{r['pct_roofline']:.0f}" + (f" (>= {r['target_pct']:.0f})" if r.get("target_pct") else "")
            out.append(f"| {r['batch']} | {r['context']} | {r['q_heads']}/{r['kv_heads']} | {_f(r['ms'], '{:.4f}')} | "
                       f"{pct} | {_f(r.get('vllm_ms'), '{:.4f}')} | {_f(r.get('speedup_vs_vllm'), '{:.2f}x')} | "
                       f"{_f(r.get('graph_ms'), '{:.4f}')} | {_f(r.get('vllm_graph_ms'), '{:.4f}')} | "
                       f"{_f(r.get('speedup_vs_vllm_graph'), '{:.2f}x')} | "
                       f"{_f(r.get('sdpa_ms'), '{:.4f}')} | {_f(r.get('speedup_vs_sdpa'), '{:.2f}x')} |")
            notes.update(r[k] for k in ("vllm_note", "sdpa_note") if r.get(k))
        out += [f"- {n}" for n in sorted(notes)]
    out += issue15_tables(rows)
    out += _host_tier_table(rows)
    elastic = [r for r in rows if r.get("kind") == "elastic"]  # issue 16: one line per figure
    if elastic:
        out += ["", "elastic pool (issue 16; bars: grow 1 GiB <= 10 ms, wake 40 GiB <= 200 ms, kernels <= 1.01x):"]
        out += ["- " + ", ".join(f"{k}={_f(v, '{:.4g}') if isinstance(v, float) else v}" for k, v in r.items()
                                 if k not in ("kind", "device")) for r in elastic]
    if sanitizer:
        out += ["", "compute-sanitizer memcheck: " + sanitizer.get("summary", "?")]
    if not rows:
        out.append("- no benchmark rows (benchmarks not run or failed early)")
    return "\n".join(out)


def _host_tier_table(rows) -> list[str]:
    """The host tier's copy path against the pinned copy ceiling (bench_host_tier.py), and its miss cost."""
    tier = [r for r in rows if r.get("kind") == "host_tier"]
    if not tier:
        return []
    out = ["", "| host tier | ms | GB/s | % pinned ceiling (target) | naive ms | speedup |", "|---|---|---|---|---|---|"]
    for r in tier:
        if "gbps" in r:
            target = f" (>= {r['target_pct']:.0f})" if r.get("target_pct") else ""
            out.append(f"| {r['name']} | {_f(r['ms'])} | {r['gbps']:.1f} | {r['pct_ceiling']:.1f}{target} | "
                       f"{_f(r.get('baseline_ms'))} | {_f(r.get('speedup'), '{:.1f}x')} |")
        else:
            out.append(f"| {r['name']} | {_f(r['ms'], '{:.4f}')} | - | on/off {r['ratio']:.4f} (<= 1.02) | "
                       f"{_f(r.get('baseline_ms'), '{:.4f}')} | host us {r['host_us_on']:.1f} / {r['host_us_off']:.1f} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--bench-json", nargs="*", default=[])
    ap.add_argument("--rows")
    ap.add_argument("--sanitizer")
    ap.add_argument("--tests-log", nargs="*", default=[])
    args = ap.parse_args(argv)
    rows = load_rows(args.bench_json, args.rows)
    sanitizer = None
    if args.sanitizer and Path(args.sanitizer).exists():
        sanitizer = json.loads(Path(args.sanitizer).read_text())
    tests = {Path(p).stem: test_summary(p) for p in args.tests_log}
    table = build_table(rows, sanitizer, tests)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_report.json").write_text(json.dumps(
        {"rows": rows, "sanitizer": sanitizer, "tests": tests}, indent=1))
    (out_dir / "gpu_report.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
