"""Shared fixtures of the GPU kernel benchmarks (bench_memory.py, bench_decode.py); torch loads lazily.

Timings are medians of CUDA-event timings from ``triton.testing.do_bench`` (L2 flushed before each
call), stored in pytest-benchmark's ``extra_info`` and, one JSON line per result as soon as it
exists, in ``$KVPOOL_BENCH_ROWS`` (default ``benchmarks/out/rows.jsonl``) so a run cut short by a
timeout still leaves its data. ``benchmarks/gpu_report.py`` turns either into a table.
"""
import json
import os
from pathlib import Path

import pytest

if os.environ.get("KVPOOL_BENCH_SMOKE") == "1":  # CPU smoke of the attention benchmarks: before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVPOOL_KERNELS", "triton")

ROWS = Path(os.environ.get("KVPOOL_BENCH_ROWS", Path(__file__).parent / "out" / "rows.jsonl"))


@pytest.fixture
def record(benchmark, request):
    """``record(row, target)``: time ``target`` with pytest-benchmark (wall clock + sync, 3 rounds) and
    store ``row`` (the CUDA-event figures) in ``extra_info`` and in the JSON-lines file."""
    import torch

    def _record(row: dict, target) -> None:
        cuda = torch.cuda.is_available()
        device = torch.cuda.get_device_name() if cuda else "cpu (KVPOOL_BENCH_SMOKE: interpreter, not figures)"
        row = {"test": request.node.name, "device": device, **row}
        benchmark.extra_info.update(row)
        ROWS.parent.mkdir(parents=True, exist_ok=True)
        with ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print("\n" + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

        def run():
            target()
            if cuda:
                torch.cuda.synchronize()
        benchmark.pedantic(run, rounds=3 if cuda else 1, iterations=1, warmup_rounds=1 if cuda else 0)
    return _record


@pytest.fixture(scope="session")
def copy_ceiling_gbps():
    """Device-to-device copy bandwidth (GB/s, bytes read + written) of a 2 x 1 GiB ``copy_``: the ceiling."""
    import torch
    from kernel_bench_util import median_ms
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    gbps = 2 * src.numel() / (ms * 1e-3) / 1e9
    del src, dst
    return gbps, ms
