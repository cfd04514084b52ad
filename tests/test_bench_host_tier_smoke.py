"""benchmarks/bench_host_tier.py runs end to end on CPU (``KVPOOL_BENCH_SMOKE=1``) and the GPU report tabulates it.

The copy-path cases run on CPU tensors at the benchmark's own geometry (Llama-3.1-8B blocks, fewer of them), each
checking that the bytes landed where they belong before it is timed, so a crash or a wrong copy in the script
fails here rather than on a GPU machine whose time is counted. The CPU timings mean nothing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_bench_host_tier_smoke_rows_and_report(tmp_path):
    env = dict(os.environ, KVPOOL_BENCH_SMOKE="1", KVPOOL_BENCH_ROWS=str(tmp_path / "rows.jsonl"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--benchmark-disable",
                           str(BENCH / "bench_host_tier.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    names = [r["name"] for r in rows]
    assert sum("ceiling" in n for n in names) == 2
    copier = [r for r in rows if r["name"].startswith("BlockCopier.")]
    assert len(copier) == 4 and all(r["pct_ceiling"] > 0 and r["target_pct"] == 80 for r in copier)
    assert sum("baseline_ms" in r for r in copier) == 2  # the naive block x layer copies beside the consecutive cases
    sys.path.insert(0, str(BENCH))
    import gpu_report
    bench_json = tmp_path / "bench.json"  # the same rows again in pytest-benchmark's extra_info: one line each
    bench_json.write_text(json.dumps({"benchmarks": [{"name": r["name"], "extra_info": r} for r in copier]}))
    table = gpu_report.build_table(gpu_report.load_rows([bench_json], tmp_path / "rows.jsonl"), None, {})
    assert "| host tier |" in table and table.count("BlockCopier.offload") == 2  # consecutive + scattered
