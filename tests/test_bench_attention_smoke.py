"""The issue-15 GPU benchmarks run end to end on CPU (``KVPOOL_BENCH_SMOKE=1``) and the GPU report tabulates them.

``bench_prefill.py`` and ``bench_mixed.py`` run in a subprocess at interpreter size (Triton's interpreter, SDPA's
math backend, vLLM's unified attention from ``.peers/`` when fetched): every contender available is checked
against kvpool's float32 reference before it is timed, so a wrong kernel fails here, and a crash in the
scripts' own code (case building, the peer's argument mapping, the rows, the report) fails here rather than
on a GPU machine whose time is counted. kvpool's kernels that this tree does not export yet leave a skip with
the reason and a note in the row.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, KVPOOL_BENCH_SMOKE="1", KVPOOL_BENCH_ROWS=str(out / "rows.jsonl"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--benchmark-disable",
                           str(BENCH / "bench_prefill.py"), str(BENCH / "bench_mixed.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    return rows, out


def test_every_case_leaves_a_row(smoke_rows):
    rows, _ = smoke_rows
    assert sorted(r.get("label", r["kind"]) for r in rows) == ["chunk", "long", "paged_attention_mixed"]
    for r in rows:
        # each contender is either checked against the reference and timed, or carries the reason it is not
        for name in ("ours", "vllm", "sdpa", "two_calls"):
            if name == "sdpa" and r["kind"] != "paged_prefill" or name == "two_calls" and r["kind"] == "paged_prefill":
                continue
            assert (f"rel_err_{name}" in r and f"{name}_ms" in r) or r.get(f"{name}_note"), (name, r)
            assert r.get(f"rel_err_{name}", 0.0) < 1e-2


def test_report_has_the_issue15_tables(smoke_rows):
    _, out = smoke_rows
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_report.py"), "--out-dir", str(out), "--rows",
                           str(out / "rows.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    for heading in ("paged_prefill (issue 15)", "paged_attention, mixed batch (issue 15)", "vs vLLM (>= 1.1)"):
        assert heading in proc.stdout
