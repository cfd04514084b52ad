"""kvpool.paged_prefill against vLLM's unified attention and SDPA-flash on a contiguous cache (issue 15).

Shapes (the issue's targets, bf16, block size 16, shuffled block tables):

- chunk: 8 sequences x (4,096 cached + 1,024 new) tokens, q/kv heads 32/8, head_dim 128: **>= 1.1x vLLM's unified
  attention** (``../shared/peers/vllm_unified_attention.py``, fetched into ``.peers/``) and **>= 0.85x SDPA**
  (``scaled_dot_product_attention``, flash backend, the same tokens in a contiguous ``[batch, len, heads, d]``
  cache, causal aligned bottom-right).
- long: 1 sequence x 16,384 new tokens: **>= 50% of the card's dense bf16 peak** (``kvpool.plan.hardware``'s
  preset for the card; the measured rate of a large bf16 matmul is printed beside it). FLOPs count causal
  (query, key) pairs exactly: ``4 * head_dim * q_heads * pairs``.

Before timing, every contender's output is checked against kvpool's float32 torch reference (gather + causal
attention) on a subset of its rows (``||out - ref|| / ||ref|| < 1e-2``). Times are medians of CUDA-event timings
(``triton.testing.do_bench``, L2 flushed); every ratio comes from one run. Rows go to ``$KVPOOL_BENCH_ROWS``
(``benchmarks/gpu_report.py`` tabulates them).

    python -m pytest benchmarks/bench_prefill.py -s                          # a GPU, .peers/ fetched
    KVPOOL_BENCH_SMOKE=1 python -m pytest benchmarks/bench_prefill.py -s      # CPU smoke: tiny shapes, interpreter

The smoke (``tests/test_bench_attention_smoke.py`` runs it) proves the code paths and the checks, not speed.
"""
import pytest
import torch
from attention_cases import dense_bf16_peak, make_case
from attention_runs import (
    DEVICE,
    SMOKE,
    check,
    ours_runner,
    run_all,
    sdpa_runner,
    time_ms,
    vllm_runner,
)
from kernel_bench_util import HAS_CUDA

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA and not SMOKE,
                                 reason="GPU benchmark: needs a CUDA device (KVPOOL_BENCH_SMOKE=1: the CPU smoke)")]

# (batch, cached, new), (q_heads, kv_heads), head_dim; the smoke keeps the structure at interpreter size
CHUNK = ((2, 24, 8), (4, 2), 64) if SMOKE else ((8, 4096, 1024), (32, 8), 128)
LONG = ((1, 0, 40), (4, 2), 64) if SMOKE else ((1, 0, 16384), (32, 8), 128)
BLOCK = 16
# the interpreter's tl.dot is wrong on bf16 tiles (tests/test_peer_unified_attention.py): fp16 in the smoke
DTYPE = torch.float16 if SMOKE else torch.bfloat16
REF_ROWS = 8 if SMOKE else 256  # reference rows per checked sequence (its last queries: the longest rows)
TARGETS = {"chunk": {"vllm": 1.1, "sdpa": 0.85}, "long": {"pct_peak": 50.0}}


def _matmul_tflops() -> float:
    """Measured bf16 rate of an 8192^3 matmul (TFLOP/s, random data): the card's practical ceiling."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    ms = time_ms(lambda: a @ b)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def measure(shape, label: str) -> tuple[dict, object]:
    """One shape: check every contender, time it, the ratios; returns ``(row, kvpool's run or a peer's)``."""
    (batch, cached, new), (q_heads, kv_heads), head_dim = shape
    case = make_case([new] * batch, [cached + new] * batch, q_heads, kv_heads, head_dim, BLOCK, DTYPE, DEVICE)
    row = {"kind": "paged_prefill", "name": f"prefill {label} {batch}x({cached}+{new}) h{q_heads}/{kv_heads} "
                                            f"d{head_dim}", "label": label, "batch": batch, "cached": cached,
           "new": new, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim, "block_size": BLOCK,
           "dtype": str(DTYPE).removeprefix("torch."), "tflop": case.flops() / 1e12}
    runners = {"ours": ours_runner("paged_prefill", case), "vllm": vllm_runner(case), "sdpa": sdpa_runner(case)}
    runs, outputs, notes = run_all(runners)
    row.update(notes)
    if "sdpa" in runs:
        row["sdpa_backend"] = runners["sdpa"][2]
    row.update(check(case, outputs, sorted({0, batch - 1}), REF_ROWS))
    for name, run in runs.items():
        row[f"{name}_ms"] = time_ms(run)
        row[f"{name}_tflops"] = case.flops() / (row[f"{name}_ms"] * 1e-3) / 1e12
    for peer in ("vllm", "sdpa"):
        if "ours_ms" in row and f"{peer}_ms" in row:
            row[f"speedup_vs_{peer}"] = row[f"{peer}_ms"] / row["ours_ms"]
    row.update({f"target_vs_{k}" if k != "pct_peak" else "target_pct_peak": v for k, v in TARGETS[label].items()})
    return row, runs.get("ours") or next(iter(runs.values()))


def test_prefill_chunk(record):
    """8 x (4,096 cached + 1,024 new): vs vLLM (>= 1.1x) and SDPA-flash (>= 0.85x)."""
    row, target = measure(CHUNK, "chunk")
    record(row, target)
    if "ours_note" in row:
        pytest.skip(row["ours_note"])


def test_prefill_long(record):
    """1 x 16,384 new tokens: % of the card's dense bf16 peak (>= 50)."""
    row, target = measure(LONG, "long")
    if DEVICE == "cuda":
        name = torch.cuda.get_device_name()
        peak, preset = dense_bf16_peak(name)
        row.update(peak_tflops=peak, peak_preset=preset, matmul_tflops=_matmul_tflops())
        if "ours_tflops" in row:
            row["pct_matmul"] = 100 * row["ours_tflops"] / row["matmul_tflops"]
            if peak:
                row["pct_peak"] = 100 * row["ours_tflops"] / peak
            else:
                row["peak_note"] = f"no dense bf16 peak preset for {name!r} in kvpool.plan.hardware"
    record(row, target)
    if "ours_note" in row:
        pytest.skip(row["ours_note"])
